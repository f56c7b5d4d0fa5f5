"""The agents' listener: an agent's HTTP call becomes an ``AgentCall`` for the payment service, and its
``Outcome`` becomes the HTTP answer (a passthrough's answer relayed from the provider as it arrives)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.errors import RequestRefused, RequestTimeout, UpstreamUnavailable
from proxy.listeners.server import refuse_encoded_body
from proxy.payments.calls import AgentCall, Outcome
from proxy.payments.service import PaymentService
from proxy.payments.x402 import X402Payments
from proxy.upstream import Upstream


class AgentListener:
    def __init__(
        self,
        payments: PaymentService,
        upstream: Upstream,
        max_body_bytes: int,
        body_timeout: float = 10.0,
        x402: X402Payments | None = None,
    ) -> None:
        self.payments, self.upstream, self.x402 = payments, upstream, x402
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        if self.x402 is not None:
            app.router.add_route("*", "/x402/{tail:.*}", self.handle_x402)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        outcome = await self.payments.agent_call(self._call(request))
        if outcome.stream is None:
            return web.Response(status=outcome.status, body=outcome.body, headers=outcome.headers)
        return await self._relay(request, outcome)

    async def handle_x402(self, request: web.Request) -> web.StreamResponse:
        """A paid HTTP resource: ``/x402/<url-encoded URL>`` (see ``proxy.payments.x402``)."""
        assert self.x402 is not None
        outcome = await self.x402.call(self._call(request))
        return web.Response(status=outcome.status, body=outcome.body, headers=outcome.headers)

    def _call(self, request: web.Request) -> AgentCall:
        return AgentCall(
            method=request.method,
            path=request.path,
            raw_path=request.raw_path,
            target=request.rel_url.raw_path_qs,
            query=request.query,
            headers=request.headers,
            content_type=request.content_type,
            remote=request.remote,
            read_body=lambda: self._read(request),
        )

    async def _read(self, request: web.Request) -> bytes:
        refuse_encoded_body(request.headers)  # decoded by aiohttp, it would go on labelled encoded
        try:
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.body_timeout:g} s; nothing was done"
            ) from None
        except web.HTTPException as exc:  # aiohttp's own refusals: body too large, bad framing
            raise RequestRefused(f"PaySentry refused the request: {exc.reason}", exc.status) from exc

    async def _relay(self, request: web.Request, outcome: Outcome) -> web.StreamResponse:
        """A call that moves no money: the provider's answer streamed back as it arrives."""
        assert outcome.stream is not None
        try:
            async with self.upstream.stream(outcome.stream) as reply:
                out = web.StreamResponse(status=reply.status, headers=reply.headers)
                if reply.content_length is not None:
                    out.content_length = reply.content_length
                await out.prepare(request)
                async for chunk in reply.chunks:
                    await out.write(chunk)
                await out.write_eof()
                return out
        except UpstreamUnavailable:  # the answer the service prepared for an unreachable provider
            return web.Response(status=outcome.status, body=outcome.body, headers=outcome.headers)
