"""The one seam toward payment providers: "send this request upstream", in the spirit of httpx's transport.

    Upstream (protocol)     send(request) -> UpstreamReply; stream(request) for answers relayed as they come
    ├── AiohttpUpstream     one shared aiohttp ClientSession with keep-alive (production)
    └── FakeUpstream        built from a plain function: the payment service is unit tested without sockets

``provider_request`` is the one place where the headers toward a provider are built: the agent's own
credentials, cookies, forwarding and hop-by-hop headers never reach the provider; the owner's credentials
(from the agent's connection, placed by the provider's adapter), the idempotency key and PaySentry's own
trace context are added. Bodies are passed byte for byte.

A failure says whether the request may have reached the provider (``UpstreamUnavailable.maybe_sent``): a
refused connection moved no money; a timeout or a connection lost after sending leaves the outcome unknown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from adapters.base import Adapter
from proxy.errors import UpstreamUnavailable

W3C = TraceContextTextMapPropagator()
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "traceparent",  # replaced by PaySentry's own span context
    "tracestate",
}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "set-cookie"}
MAX_PAYMENT_RESPONSE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass(frozen=True, slots=True)
class StreamedReply:
    """An answer relayed as it arrives: status and headers first, then ``chunks``."""

    status: int
    headers: CIMultiDict[str]
    chunks: AsyncIterator[bytes]
    content_length: int | None = None


class Upstream(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        """The whole answer (a payment call's answer is small JSON, recorded before it is relayed)."""
        ...

    def stream(self, request: UpstreamRequest) -> contextlib.AbstractAsyncContextManager[StreamedReply]:
        """A call that moves no money: the answer relayed as it arrives."""
        ...


def provider_request(
    adapter: Adapter,
    credentials: Mapping[str, str],
    method: str,
    url: str,
    incoming: Mapping[str, str],
    body: bytes,
    idempotency_key: str | None = None,
) -> UpstreamRequest:
    """The request PaySentry sends the provider for an agent's call (or for its own, with ``incoming``
    empty but for a content type)."""
    inject = adapter.credential_headers(credentials)
    if idempotency_key is not None:
        inject[adapter.idempotency_header] = idempotency_key
    # by name as a lenient server reads it (Idempotency_Key is Idempotency-Key to some): what PaySentry
    # sets itself, or drops, never travels beside it under another spelling
    injected = {_lenient(name) for name in inject}
    headers = CIMultiDict(
        (k, v)
        for k, v in incoming.items()
        if (name := _lenient(k)) not in DROP_REQUEST and name not in injected
    )
    for name, value in inject.items():
        headers[name] = value
    W3C.inject(headers)  # the provider sees the current span as the parent
    return UpstreamRequest(method, url, headers, body)


def _lenient(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class AiohttpUpstream:
    def __init__(self, timeout: float, connections: int = 256) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._connections, limit_per_host=self._connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request(self, request: UpstreamRequest) -> aiohttp.client._RequestContextManager:
        assert self._session is not None, "upstream not started"
        return self._session.request(
            request.method,
            request.url,
            data=request.body or None,
            headers=request.headers,
            allow_redirects=False,
        )

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        request.headers["Accept-Encoding"] = "identity"
        try:
            async with self._request(request) as resp:
                payload = await resp.content.read(MAX_PAYMENT_RESPONSE + 1)
                if len(payload) > MAX_PAYMENT_RESPONSE:
                    raise UpstreamUnavailable("the provider's answer is larger than PaySentry accepts")
                return UpstreamReply(resp.status, _response_headers(resp.headers), payload)
        except aiohttp.ClientConnectorError as exc:  # never connected: the request was not sent
            raise UpstreamUnavailable(
                f"the provider could not be reached: {type(exc).__name__}", maybe_sent=False
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"the provider could not be reached: {type(exc).__name__}") from exc

    @contextlib.asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamedReply]:
        try:
            async with self._request(request) as resp:
                length = resp.headers.get("Content-Length")
                yield StreamedReply(
                    resp.status,
                    _response_headers(resp.headers),
                    resp.content.iter_any(),
                    int(length) if length and length.isdigit() else None,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"the provider could not be reached: {type(exc).__name__}") from exc


Handler = Callable[[UpstreamRequest], Awaitable[UpstreamReply]]


class FakeUpstream:
    """An upstream answered by ``handler`` (a plain async function): no socket. Keeps what it was sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sent: list[UpstreamRequest] = []

    async def send(self, request: UpstreamRequest) -> UpstreamReply:
        self.sent.append(request)
        return await self.handler(request)

    @contextlib.asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamedReply]:
        reply = await self.send(request)

        async def chunks() -> AsyncIterator[bytes]:
            yield reply.body

        yield StreamedReply(reply.status, reply.headers, chunks(), len(reply.body))


def _response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in DROP_RESPONSE)
