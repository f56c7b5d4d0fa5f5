"""The HTTP server under every listener: aiohttp's, with what it lacks for a hostile network.

- **Header timeout.** aiohttp bounds neither how long a request's head (request line and headers) may
  take to arrive nor, before the first request, anything but its keep-alive timer. A connection whose
  head has not fully arrived ``header_timeout`` seconds after its first byte (or after it opened) is
  answered 408 and closed: a slowloris holds nothing for long.
- **Connections per client.** A client address holds at most ``max_connections_per_client``
  connections. A new one past that closes the client's oldest *idle* connection (no request in progress:
  one still sending its head, or a keep-alive one between requests), so a flood of idle connections never
  shuts out a real request from the same address (in sidecar mode every agent, and often the probes, come
  from 127.0.0.1); only when all of them are busy is the new one refused.
- **Errors that say nothing.** aiohttp answers a malformed request (a control character in a header, a
  header longer than the limit) with a 400 whose body, and its "Error handling request" log line, quote
  the offending bytes: an ``Authorization`` header's token with them. Here the answer names only the kind
  of problem and the log line only the exception's class; ``StripExceptionText`` does the same for any
  other aiohttp log line.
- **Encoded bodies.** A body with a ``Content-Encoding`` other than ``identity`` is refused (415) by
  ``refuse_encoded_body``: aiohttp would decode it and the sidecar would forward the decoded body still
  labelled gzip; no provider API PaySentry fronts takes compressed requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from multidict import CIMultiDictProxy

from proxy.errors import RequestRefused

log = logging.getLogger("paysentry.server")
TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 46\r\n\r\nthe request headers did not arrive in time.\r\n\r\n"
)


class ConnectionGuard:
    """The connections of one listener, by client address, oldest idle first."""

    def __init__(self, header_timeout: float, per_client: int) -> None:
        self.header_timeout, self.per_client = header_timeout, per_client
        self._clients: dict[str, OrderedDict[GuardedHandler, None]] = {}
        self.evicted = self.refused = self.timed_out = 0

    def opened(self, handler: GuardedHandler) -> bool:
        """Admit a new connection (closing the client's oldest idle one if it is at its cap), or refuse."""
        conns = self._clients.setdefault(handler.peer, OrderedDict())
        if len(conns) >= self.per_client:
            idle = next((h for h in conns if not h.busy), None)
            if idle is None:
                self.refused += 1
                return False
            self.evicted += 1
            self.closed(idle)
            idle.force_close()
        conns[handler] = None
        return True

    def closed(self, handler: GuardedHandler) -> None:
        conns = self._clients.get(handler.peer)
        if conns is not None:
            conns.pop(handler, None)
            if not conns:
                del self._clients[handler.peer]

    def active(self, handler: GuardedHandler) -> None:
        conns = self._clients.get(handler.peer)
        if conns is not None and handler in conns:
            conns.move_to_end(handler)  # the oldest idle is found first


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a deadline on request heads, a place in the guard, and error
    answers and log lines that never quote what the client sent."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.peer = ""
        self.busy = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple | list) and peer else ""
        super().connection_made(transport)
        if not self.guard.opened(self):
            self.peer = ""
            self.force_close()
            return
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._deadline is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    async def _handle_request(self, request: BaseRequest, *args: Any, **kwargs: Any) -> Any:
        self._disarm()  # the head has arrived; the body has its own timeout (body_timeout)
        self.busy = True
        try:
            return await super()._handle_request(request, *args, **kwargs)
        finally:
            self.busy = False
            self.guard.active(self)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(self.guard.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.busy:
            return
        self.guard.timed_out += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(TIMEOUT_ANSWER)
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """A request aiohttp could not parse (or a handler that failed): the answer and the log line name
        the kind of problem, never the bytes (a malformed header may carry a token)."""
        kind = type(exc).__name__ if exc is not None else "error"
        fields = {"status": status, "problem": kind}
        if status >= 500:
            log.error("a request failed in the HTTP server", extra={"fields": fields})
        else:
            log.warning("refused a malformed request", extra={"fields": fields})
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already under way")
        text = (
            f"{status} {_reason(status)}: PaySentry could not read this request ({kind}); nothing was done.\n"
        )
        resp = web.Response(status=status, text=text, content_type="text/plain")
        resp.force_close()
        return resp


def _reason(status: int) -> str:
    return {400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}.get(
        status, "Error"
    )


class GuardedServer(web.Server):
    guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose server makes ``GuardedHandler`` connections."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same state, one method more: the handler it makes
        server.guard = self.guard  # type: ignore[attr-defined]
        return server


class StripExceptionText(logging.Filter):
    """On aiohttp's own loggers: keep the line, drop the exception's text and traceback (they quote what
    the client sent), keep its class."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_aiohttp_errors() -> None:
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "aiohttp.client"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, StripExceptionText) for f in logger.filters):
            logger.addFilter(StripExceptionText())


def refuse_encoded_body(headers: CIMultiDictProxy[str]) -> None:
    """Refuse a compressed (or otherwise encoded) request body: 415, before anything reads it."""
    encodings = [e.strip().lower() for v in headers.getall("Content-Encoding", []) for e in v.split(",")]
    if any(e and e != "identity" for e in encodings):
        raise RequestRefused(
            "PaySentry does not accept a Content-Encoding on requests: send the body uncompressed", 415
        )
