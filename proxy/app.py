"""The running sidecar: applies the declared state (if any), starts the listeners of the graph
``proxy.bootstrap`` builds (each with TLS when it has a certificate), sweeps held and
expired work in the background, reconciles with the providers' records on its own schedule, and drains
on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from adapters.mock import MockProvider
from proxy import __version__
from proxy.bootstrap import bootstrap
from proxy.config import Settings, split_address
from proxy.decide import period_of
from proxy.listeners.server import ConnectionGuard, GuardedRunner, quiet_aiohttp_errors
from proxy.listeners.tls import ReloadingTLS
from proxy.payments.service import RESOLVE_BATCH
from proxy.policy.model import Limit
from proxy.upstream import AiohttpUpstream
from proxy.windows import is_rolling

log = logging.getLogger("paysentry")
PRUNE_INTERVAL = 600.0  # seconds between deletions of rolling-window buckets no check sums any more


class Sidecar:
    """A running PaySentry: the graph ``bootstrap`` builds, its listeners, and its background work."""

    def __init__(
        self, settings: Settings, tracer_provider: TracerProvider | None = None, **parts: Any
    ) -> None:
        self.settings = settings
        self.gateway = bootstrap(settings, tracer_provider=tracer_provider, **parts)
        self.store = self.gateway.store
        self._runners: dict[str, web.AppRunner] = {}
        self._pruned_at = 0.0
        self.guards: dict[str, ConnectionGuard] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the store and the clients, apply the declared state, then listen. A start that fails (an
        invalid policy set or state file, a port in use) closes what it opened before it raises."""
        try:
            await self._start()
        except BaseException:
            for runner in self._runners.values():
                await runner.cleanup()
            self._runners.clear()
            await self._close_clients()
            raise

    async def _start(self) -> None:
        g = self.gateway
        quiet_aiohttp_errors()
        await self.store.open()
        if isinstance(g.upstream, AiohttpUpstream):
            await g.upstream.start()
        await g.holds.start()
        s = self.settings
        if g.state is not None:  # before the listeners: a fresh volume serves the declared agents at once
            await g.state.start()
        tls = {
            "agents": self._tls("agents", s.tls_cert_file, s.tls_key_file),
            "owner": self._tls("owner", s.admin_tls_cert_file, s.admin_tls_key_file),
        }
        if s.mock_provider_listen:
            await self._listen("mock", MockProvider().app(), s.mock_provider_listen)
        await self._listen("agents", g.agent_listener.app(), s.listen, tls["agents"])
        await self._listen("owner", g.owner_api.app(), s.admin_listen, tls["owner"])
        watched = [g.policies.holder.watch(s.policy_poll_interval)]
        watched += [t.watch(s.policy_poll_interval) for t in tls.values() if t is not None]
        if g.state is not None:
            watched.append(g.state.watch(s.policy_poll_interval))
        self._tasks = [
            asyncio.create_task(self._sweep()),
            asyncio.create_task(self._resolve()),
            *(asyncio.create_task(w) for w in watched),
        ]
        if self.settings.reconcile_interval > 0:  # its own task: never delays the sweep or a payment
            self._tasks.append(asyncio.create_task(self._reconcile()))
        if g.holds.webhooks and _loopback(g.holds.public_url):
            log.warning(
                "notifications are on but public_url points at loopback: receivers elsewhere get console "
                "links they cannot open; set public_url to the owner listener's public address",
                extra={"fields": {"public_url": g.holds.public_url}},
            )
        log.info(
            "paysentry started",
            extra={
                "fields": {
                    "version": __version__,
                    "policy_revision": g.policies.holder.current.revision,
                    "config": self.settings.summary(),
                }
            },
        )

    def _tls(self, listener: str, cert_file: str, key_file: str) -> ReloadingTLS | None:
        if not cert_file:
            return None
        return ReloadingTLS(listener, cert_file, key_file, self.gateway.metrics)

    async def _listen(
        self, name: str, app: web.Application, address: str, tls: ReloadingTLS | None = None
    ) -> None:
        guard = ConnectionGuard(self.settings.header_timeout, self.settings.max_connections_per_client)
        runner = GuardedRunner(
            app,
            guard,
            access_log=None,
            keepalive_timeout=self.settings.keepalive_timeout,
            shutdown_timeout=self.settings.shutdown_grace,
            max_line_size=self.settings.max_header_bytes,
            max_field_size=self.settings.max_header_bytes,
            max_headers=self.settings.max_headers,
        )
        await runner.setup()
        host, port = split_address(address)
        context = tls.context if tls is not None else None
        await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=context).start()
        self._runners[name] = runner
        self.guards[name] = guard

    async def _sweep(self) -> None:
        """Expire holds (releasing their spend) and release what the Redis gate reserved for decisions
        never recorded; refresh the gauges."""
        while True:
            try:
                now = time.time()
                expired = await self.store.expire_holds(now)
                expired += await self.store.expire_approved(now - self.settings.approval_retry_window, now)
                unrecorded = await self.store.release_unrecorded(now)
                await self._refresh_gauges()
                pruned = 0
                if now - self._pruned_at >= PRUNE_INTERVAL:
                    rolling = [(n, p) for n, (_, p) in self._limit_periods().items() if is_rolling(p)]
                    pruned, self._pruned_at = await self.store.prune_spend(rolling), now
                if expired or unrecorded or pruned:
                    fields = {"expired_holds": expired, "unrecorded_released": unrecorded, "pruned": pruned}
                    log.info("sweep", extra={"fields": fields})
            except Exception:  # the sweep must outlive a passing store failure
                self.gateway.metrics.inc("paysentry_store_errors_total", where="sweep")
                log.exception("sweep failed")
            await asyncio.sleep(self.settings.sweep_interval)

    async def _resolve(self) -> None:
        """Resolve calls whose outcome is unknown by asking the provider, a small batch at a time, in a
        task of its own: a slow provider delays neither the sweep nor other replicas' claims. A full
        batch is followed at once by the next; otherwise it waits a sweep interval."""
        while True:
            try:
                resolved = await self.gateway.payments.resolve_unresolved(RESOLVE_BATCH)
                if resolved:
                    log.info("resolution", extra={"fields": {"resolved": resolved}})
            except Exception:  # outlive a passing store failure: what was claimed is claimed again later
                self.gateway.metrics.inc("paysentry_store_errors_total", where="resolution")
                log.exception("resolution failed")
                resolved = {}
            if sum(resolved.values()) < RESOLVE_BATCH:
                await asyncio.sleep(self.settings.sweep_interval)

    async def _reconcile(self) -> None:
        """Every ``reconcile_interval``, compare each connection's last ``reconcile_window`` with the
        provider's records and fix what they prove. Every replica may run it: each fix is a conditional
        transition, so two runs at once never apply one twice."""
        reconciler = self.gateway.reconciler
        with contextlib.suppress(Exception):
            await reconciler.refresh_gauges()  # the drift the latest runs left, before this replica's first
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            try:
                reports = await reconciler.run(time.time() - self.settings.reconcile_window)
                fixed = sum(len(r.fixed) for r in reports)
                unexplained = sum(len(r.unexplained) for r in reports)
                if fixed or unexplained:
                    log.info("reconcile", extra={"fields": {"fixed": fixed, "unexplained": unexplained}})
            except Exception:  # like the sweep: outlive a passing store or provider failure
                self.gateway.metrics.inc("paysentry_store_errors_total", where="reconcile")
                log.exception("reconciliation failed")

    def _limit_periods(self) -> dict[str, tuple[Limit, str]]:
        """Each windowed limit of the policy set in force, with its current period."""
        now = datetime.now(UTC)
        limits: dict[str, tuple[Limit, str]] = {}
        for policy in self.gateway.policies.holder.current.policies:
            for lim in policy.limits:
                if lim.window != "payment":
                    limits[lim.name] = (lim, period_of(lim.window, now, policy.timezone))
        return limits

    async def _refresh_gauges(self) -> None:
        """Pending holds, and each agent's spend in the current window of every limit against its maximum
        (the 1000 largest: a scrape stays small with many agents)."""
        limits = self._limit_periods()
        rows = await self.store.current_spend([(name, period) for name, (_, period) in limits.items()], 1000)
        per_agent = self.settings.metrics_agent_labels  # names and ids only where the operator opts in
        amounts: dict[tuple[tuple[str, str], ...], float] = {}
        ratios: dict[tuple[tuple[str, str], ...], float] = {}
        for agent_id, agent, name, currency, amount, count in rows:
            lim = limits[name][0]
            labels = {"limit": name, "window": lim.window}
            if per_agent:
                labels |= {"agent": agent, "agent_id": agent_id}
            key = tuple(sorted(labels.items()))
            money = tuple(sorted({**labels, "currency": currency}.items()))
            amounts[money] = amounts.get(money, 0) + amount  # without agents: summed over them
            used = [
                amount / lim.max_amount if lim.max_amount else 0.0,
                count / lim.max_count if lim.max_count else 0.0,
            ]
            ratios[key] = max(ratios.get(key, 0.0), *used)  # without agents: the highest
        metrics = self.gateway.metrics
        metrics.set_all("paysentry_spend_amount", [(dict(k), v) for k, v in amounts.items()])
        metrics.set_all("paysentry_spend_limit_ratio", [(dict(k), v) for k, v in ratios.items()])
        metrics.set_all("paysentry_holds_pending", [({}, await self.store.count_pending_holds())])
        metrics.set_all(
            "paysentry_authorizations_in_doubt", [({}, await self.store.count_unresolved(time.time()))]
        )

    async def stop(self) -> None:
        """Drain: /readyz fails at once, the agent listener stops accepting, and calls in flight get up to
        ``shutdown_grace`` to finish (their spend committed or released as usual; a call still running at
        the deadline is cancelled and releases its reservation). Then the owner listener, the background
        tasks, and the store."""
        g = self.gateway
        g.owner_api.draining = True
        log.info("draining", extra={"fields": {"grace_seconds": self.settings.shutdown_grace}})
        agents = self._runners.pop("agents", None)
        if agents is not None:
            for site in list(agents.sites):
                await site.stop()  # no new connections
            cut = await g.payments.drain(self.settings.shutdown_grace)
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
        await self._close_clients()
        g.metrics.shutdown()  # pushes the last OTLP export

    async def _close_clients(self) -> None:
        g = self.gateway
        await g.holds.close()  # closes the approval bus too
        if isinstance(g.upstream, AiohttpUpstream):
            await g.upstream.close()
        if g.redis is not None:
            await g.redis.limiter.close()
        await self.store.close()


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
