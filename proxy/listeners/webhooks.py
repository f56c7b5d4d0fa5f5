"""Inbound provider webhooks at ``POST /v1/webhooks/{connection id}`` (on the owner listener): the
signature is the credential; ``proxy.payments.events`` verifies and handles each delivery."""

from __future__ import annotations

from aiohttp import web

from proxy.payments.events import ProviderEvents

PREFIX = "/v1/webhooks/"


class WebhookListener:
    def __init__(self, events: ProviderEvents) -> None:
        self.events = events

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PREFIX + "{connection}", self.receive)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        reply = await self.events.receive(request.match_info["connection"], request.headers, body)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
