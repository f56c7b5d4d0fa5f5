"""The composition root: builds the store, policies, authenticators, pipeline and listeners from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import UTC, datetime

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from adapters import get_adapter
from adapters.mock import MockProvider
from proxy import __version__
from proxy.admin import OwnerApi
from proxy.auth import TokenAuthenticator
from proxy.config import Settings, split_address
from proxy.connections import ConnectionCache
from proxy.decide import period_of
from proxy.forwarder import Forwarder
from proxy.holds import HoldCoordinator
from proxy.metrics import Metrics
from proxy.owners import OwnerService
from proxy.pipeline import Pipeline
from proxy.policy.engine import make_engine
from proxy.policy.model import Limit
from proxy.policy.reload import PolicyHolder
from proxy.ratelimit import Limiter, RateLimiter
from proxy.realtime import CardAuthorizer
from proxy.secrets import AGENT_PREFIX, OWNER_PREFIX, Sealer, load_keys
from proxy.store import AgentRecord, OwnerRecord, open_store
from proxy.store.redis_spend import ApprovalBus, RedisRateLimiter
from proxy.telemetry import TRACER_NAME
from proxy.webhooks import WebhookReceiver

log = logging.getLogger("paysentry")


class Sidecar:
    def __init__(self, settings: Settings, tracer_provider: TracerProvider) -> None:
        self.settings = settings
        self.store = open_store(
            settings.store, settings.sqlite_synchronous, settings.store_timeout, settings.redis_url
        )
        self.sealer = Sealer(load_keys(settings.encryption_key_file))
        self.engine = make_engine(settings.engine)
        self.metrics = Metrics()
        self.policies = PolicyHolder(settings.policies, self.engine, self.metrics)
        self.service = OwnerService(self.store, self.sealer, settings.bcrypt_rounds)
        self.agents: TokenAuthenticator[AgentRecord] = TokenAuthenticator(
            AGENT_PREFIX,
            "agt",
            self.store.get_agent,
            lambda a: a.token_hash,
            lambda a: a.revoked_at is None,
            cache_ttl=settings.token_cache_ttl,
        )
        self.owners: TokenAuthenticator[OwnerRecord] = TokenAuthenticator(
            OWNER_PREFIX,
            "own",
            self.store.get_owner,
            lambda o: o.token_hash,
            lambda o: True,
            cache_ttl=settings.token_cache_ttl,
        )
        self.forwarder = Forwarder(settings.upstream_timeout)
        self.holds = HoldCoordinator(
            self.store,
            [u.strip() for u in settings.notify_webhooks.split(",") if u.strip()],
            settings.notify_secret.encode() or os.urandom(32),
            settings.public_url or f"http://{settings.admin_listen}",
            bus=ApprovalBus(settings.redis_url, settings.store_timeout) if settings.redis_url else None,
        )
        connections = ConnectionCache(self.store, self.sealer)
        self.limiter: Limiter = (
            RedisRateLimiter(
                settings.redis_url,
                settings.agent_rate_limit,
                settings.agent_rate_burst,
                settings.store_timeout,
            )
            if settings.redis_url
            else RateLimiter(settings.agent_rate_limit, settings.agent_rate_burst)
        )
        tracer = tracer_provider.get_tracer(TRACER_NAME, __version__)
        self.pipeline = Pipeline(
            self.store,
            self.engine,
            self.policies,
            self.agents,
            connections,
            self.forwarder,
            self.sealer,
            get_adapter("stripe"),
            tracer,
            settings.reservation_lease,
            self.metrics,
            self.holds,
            self.limiter,
            settings.body_timeout,
        )
        self.owner_api = OwnerApi(
            self.store,
            self.service,
            self.owners,
            self.policies,
            lambda agent_id: self.agents.forget(lambda a: a.id == agent_id),
            self.metrics,
            self.holds,
            WebhookReceiver(
                self.store,
                connections,
                CardAuthorizer(
                    self.store,
                    self.engine,
                    self.policies,
                    self.forwarder,
                    self.sealer,
                    self.metrics,
                    tracer,
                    settings.reservation_lease,
                    settings.card_authorization_deadline,
                ),
                self.metrics,
                settings.webhook_tolerance,
            ),
        )
        self._runners: dict[str, web.AppRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def agent_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.pipeline.handle)
        return app

    async def start(self) -> None:
        await self.store.open()
        await self.forwarder.start()
        await self.holds.start()
        if self.settings.mock_provider_listen:
            await self._listen("mock", MockProvider().app(), self.settings.mock_provider_listen)
        await self._listen("agents", self.agent_app(), self.settings.listen)
        await self._listen("owner", self.owner_api.app(), self.settings.admin_listen)
        self._tasks = [
            asyncio.create_task(self._sweep()),
            asyncio.create_task(self.policies.watch(self.settings.policy_poll_interval)),
        ]
        log.info(
            "paysentry started",
            extra={
                "fields": {
                    "version": __version__,
                    "policy_revision": self.policies.current.revision,
                    "config": self.settings.summary(),
                }
            },
        )

    async def _listen(self, name: str, app: web.Application, address: str) -> None:
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=self.settings.shutdown_grace,
            max_line_size=self.settings.max_header_bytes,
            max_field_size=self.settings.max_header_bytes,
            max_headers=self.settings.max_headers,
        )
        await runner.setup()
        host, port = split_address(address)
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        self._runners[name] = runner

    async def _sweep(self) -> None:
        """Expire holds and reclaim reservations whose sidecar stopped mid-call, releasing their spend."""
        while True:
            try:
                now = time.time()
                expired = await self.store.expire_holds(now)
                reclaimed = await self.store.reclaim_leases(now)
                await self._refresh_gauges()
                if expired or reclaimed:
                    log.info(
                        "released spend",
                        extra={"fields": {"expired_holds": expired, "reclaimed_reservations": reclaimed}},
                    )
            except Exception:  # the sweep must outlive a passing store failure
                self.metrics.inc("paysentry_store_errors_total", where="sweep")
                log.exception("sweep failed")
            await asyncio.sleep(self.settings.sweep_interval)

    async def _refresh_gauges(self) -> None:
        """Pending holds, and each agent's spend in the current window of every limit against its maximum
        (the 1000 largest: a scrape stays small with many agents)."""
        now = datetime.now(UTC)
        limits: dict[str, tuple[Limit, str]] = {}
        for policy in self.policies.current.policies:
            for lim in policy.limits:
                if lim.window != "payment":
                    limits[lim.name] = (lim, period_of(lim.window, now, policy.timezone))
        rows = await self.store.current_spend([(name, period) for name, (_, period) in limits.items()], 1000)
        amounts, ratios = [], []
        for agent_id, agent, name, currency, amount, count in rows:
            lim = limits[name][0]
            labels = {"agent": agent, "agent_id": agent_id, "limit": name, "window": lim.window}
            amounts.append(({**labels, "currency": currency}, amount))
            used = [
                amount / lim.max_amount if lim.max_amount else 0.0,
                count / lim.max_count if lim.max_count else 0.0,
            ]
            ratios.append((labels, max(used)))
        self.metrics.set_all("paysentry_spend_amount", amounts)
        self.metrics.set_all("paysentry_spend_limit_ratio", ratios)
        self.metrics.set_all("paysentry_holds_pending", [({}, await self.store.count_pending_holds())])

    async def stop(self) -> None:
        """Drain: /readyz fails at once, the agent listener stops accepting, and calls in flight get up to
        ``shutdown_grace`` to finish (their spend committed or released as usual; a call still running at
        the deadline is cancelled and releases its reservation). Then the owner listener, the background
        tasks, and the store."""
        self.owner_api.draining = True
        log.info("draining", extra={"fields": {"grace_seconds": self.settings.shutdown_grace}})
        agents = self._runners.pop("agents", None)
        if agents is not None:
            for site in list(agents.sites):
                await site.stop()  # no new connections
            cut = await self.pipeline.drain(self.settings.shutdown_grace)
            if cut:
                log.warning("calls cut off at the end of the grace period", extra={"fields": {"calls": cut}})
            await agents.cleanup()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name in ("owner", "mock"):  # the in-process mock provider last: drained calls may use it
            if name in self._runners:
                await self._runners.pop(name).cleanup()
        await self.holds.close()
        await self.forwarder.close()
        if isinstance(self.limiter, RedisRateLimiter):
            await self.limiter.close()
        await self.store.close()
        self.metrics.shutdown()  # pushes the last OTLP export
