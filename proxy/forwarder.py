"""Sending a call upstream: one shared aiohttp ClientSession with keep-alive, credentials injected.

The agent's own credentials and hop-by-hop headers never reach the provider; the owner's credentials,
from the agent's connection, are added by the provider's adapter. Bodies are passed byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import UpstreamUnavailable

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
class UpstreamReply:
    status: int
    headers: CIMultiDict[str]
    body: bytes


class Forwarder:
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

    @staticmethod
    def request_headers(incoming: Mapping[str, str], inject: Mapping[str, str]) -> CIMultiDict[str]:
        headers = CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in DROP_REQUEST)
        for name, value in inject.items():
            headers[name] = value
        return headers

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes) -> UpstreamReply:
        """A payment call: the answer is read whole (small JSON), to be recorded and then relayed."""
        assert self._session is not None, "forwarder not started"
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._session.request(
                method, url, data=body or None, headers=headers, allow_redirects=False
            ) as resp:
                payload = await resp.content.read(MAX_PAYMENT_RESPONSE + 1)
                if len(payload) > MAX_PAYMENT_RESPONSE:
                    raise UpstreamUnavailable("the provider's answer is larger than PaySentry accepts")
                return UpstreamReply(resp.status, _response_headers(resp.headers), payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"the provider could not be reached: {type(exc).__name__}") from exc

    async def stream(
        self, request: web.Request, method: str, url: str, headers: CIMultiDict[str], body: bytes
    ) -> web.StreamResponse:
        """A call that moves no money: the provider's answer is streamed back as it arrives."""
        assert self._session is not None, "forwarder not started"
        try:
            async with self._session.request(
                method, url, data=body or None, headers=headers, allow_redirects=False
            ) as resp:
                out = web.StreamResponse(status=resp.status, headers=_response_headers(resp.headers))
                if resp.headers.get("Content-Length"):
                    out.content_length = int(resp.headers["Content-Length"])
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"the provider could not be reached: {type(exc).__name__}") from exc


def _response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in DROP_RESPONSE)
