"""The one composition root: every dependency of PaySentry is chosen here, and only here.

``bootstrap(settings)`` builds the real parts from the settings; a test passes its own (``store=``,
``upstream=``, ``clock=``, ``tracer_provider=``, ``adapters=``) and gets the same graph around them.
Each part is built (and its module imported) on first use, so the CLI, which needs only the store and the
owner service, neither loads policies nor imports the serving parts. ``serve`` runs the graph with ``proxy.app.Sidecar``.

    settings ─► store (SQLite | PostgreSQL | PostgreSQL + Redis gate)      RedisServices (once, or none)
             ─► sealer, policies (engine + holder), token authenticators, connections (+ adapters)
             ─► upstream ─► PaymentService ─► CardAuthorizer, ProviderEvents (─► Reconciler), X402Payments
             ─► Reconciler (provider lists vs. the store: paysentry reconcile, the periodic job)
             ─► state (the declared state file's watcher: owners, connections, agents, approvers)
             ─► listeners: AgentListener | OwnerApi (+ WebhookListener, LinkPages on its port)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from adapters import DEFAULT_PROVIDER, REGISTRY
from adapters.base import Adapters
from proxy import __version__
from proxy.auth import TokenAuthenticator
from proxy.config import Settings
from proxy.connections import ConnectionCache
from proxy.metrics import Metrics
from proxy.owners import OwnerService
from proxy.principals import Principals
from proxy.ratelimit import Limiter, RateLimiter
from proxy.secrets import AGENT_PREFIX, APPROVER_PREFIX, OWNER_PREFIX, Sealer, load_keys
from proxy.store import AgentRecord, ApproverRecord, OwnerRecord, Store
from proxy.telemetry import TRACER_NAME
from proxy.upstream import AiohttpUpstream, Upstream

if TYPE_CHECKING:  # imported where built: the CLI's store commands load none of the serving parts
    from proxy.holds import HoldCoordinator
    from proxy.listeners.agents import AgentListener
    from proxy.listeners.owner_api import OwnerApi
    from proxy.payments.cards import CardAuthorizer
    from proxy.payments.events import ProviderEvents
    from proxy.payments.reconcile import Reconciler
    from proxy.payments.service import PaymentService, Policies
    from proxy.payments.x402 import X402Payments
    from proxy.state import StateWatcher
    from proxy.store.redis_spend import ApprovalBus, RedisRateLimiter


def open_store(url: str, synchronous: str = "NORMAL", timeout: float = 5.0, redis_url: str = "") -> Store:
    """The store a URL names: ``sqlite:///path`` (embedded), ``postgresql://...``, and with ``redis_url``
    PostgreSQL with the Redis spend gate in front."""
    if url.startswith("sqlite:///"):
        from proxy.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), synchronous=synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        if redis_url:
            from proxy.store.redis_spend import PostgresRedisStore

            return PostgresRedisStore(url, redis_url, timeout=timeout)
        from proxy.store.postgres import PostgresStore

        return PostgresStore(url, timeout=timeout)
    raise ValueError(
        f"unsupported store URL {url!r}: use sqlite:///path/to/file.db or postgresql://user@host:port/db"
    )


@dataclass(frozen=True, slots=True)
class RedisServices:
    """What Redis does for a fleet besides the spend gate: shared rate limits and approval wake-ups."""

    limiter: RedisRateLimiter
    approvals: ApprovalBus


class Gateway:
    """The object graph of one PaySentry process."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        upstream: Upstream | None = None,
        adapters: Adapters = REGISTRY,
        tracer_provider: TracerProvider | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.adapters, self.clock = settings, adapters, clock
        self._store, self._upstream, self._tracer_provider = store, upstream, tracer_provider

    @cached_property
    def store(self) -> Store:
        s = self.settings
        return self._store or open_store(s.store, s.sqlite_synchronous, s.store_timeout, s.redis_url)

    @cached_property
    def redis(self) -> RedisServices | None:
        s = self.settings
        if not s.redis_url:
            return None
        from proxy.store.redis_spend import ApprovalBus, RedisRateLimiter

        return RedisServices(
            RedisRateLimiter(s.redis_url, s.agent_rate_limit, s.agent_rate_burst, s.store_timeout),
            ApprovalBus(s.redis_url, s.store_timeout),
        )

    @cached_property
    def sealer(self) -> Sealer:
        return Sealer(load_keys(self.settings.encryption_key_file))

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics()

    @cached_property
    def policies(self) -> Policies:
        from proxy.payments.service import Policies
        from proxy.policy.engine import make_engine
        from proxy.policy.reload import PolicyHolder

        engine = make_engine(self.settings.engine)
        holder = PolicyHolder(
            self.settings.policies, engine, self.metrics, operations=self.adapters.operations
        )
        return Policies(holder, engine)

    @cached_property
    def owner_service(self) -> OwnerService:
        return OwnerService(self.store, self.sealer, self.settings.bcrypt_rounds, adapters=self.adapters)

    @cached_property
    def agent_tokens(self) -> TokenAuthenticator[AgentRecord]:
        return TokenAuthenticator(
            AGENT_PREFIX,
            "agt",
            self.store.get_agent,
            lambda a: a.token_hash,
            lambda a: a.revoked_at is None,
            cache_ttl=self.settings.token_cache_ttl,
        )

    @cached_property
    def owner_tokens(self) -> TokenAuthenticator[OwnerRecord]:
        return TokenAuthenticator(
            OWNER_PREFIX,
            "own",
            self.store.get_owner,
            lambda o: o.token_hash,
            lambda o: True,
            cache_ttl=self.settings.token_cache_ttl,
        )

    @cached_property
    def approver_tokens(self) -> TokenAuthenticator[ApproverRecord]:
        return TokenAuthenticator(
            APPROVER_PREFIX,
            "apv",
            self.store.get_approver,
            lambda a: a.token_hash,
            lambda a: a.revoked_at is None,
            cache_ttl=self.settings.token_cache_ttl,
        )

    @cached_property
    def principals(self) -> Principals:
        return Principals(self.store, self.owner_tokens, self.approver_tokens)

    @cached_property
    def upstream(self) -> Upstream:
        return self._upstream or AiohttpUpstream(self.settings.upstream_timeout)

    @cached_property
    def connections(self) -> ConnectionCache:
        return ConnectionCache(self.store, self.sealer, adapters=self.adapters)

    @cached_property
    def limiter(self) -> Limiter:
        if self.redis is not None:
            return self.redis.limiter
        return RateLimiter(self.settings.agent_rate_limit, self.settings.agent_rate_burst)

    @cached_property
    def holds(self) -> HoldCoordinator:
        from proxy.holds import HoldCoordinator

        s = self.settings
        return HoldCoordinator(
            self.store,
            [u.strip() for u in s.notify_webhooks.split(",") if u.strip()],
            s.notify_secret.encode() or os.urandom(32),
            s.public_url or f"{'https' if s.admin_tls_cert_file else 'http'}://{s.admin_listen}",
            clock=self.clock,
            bus=self.redis.approvals if self.redis is not None else None,
            metrics=self.metrics,
            give_up=s.notify_give_up,
            retry_max=s.notify_retry_max,
        )

    @cached_property
    def tracer(self) -> trace.Tracer:
        provider = self._tracer_provider or trace.get_tracer_provider()
        return provider.get_tracer(TRACER_NAME, __version__)

    @cached_property
    def payments(self) -> PaymentService:
        from proxy.payments.service import PaymentService

        return PaymentService(
            store=self.store,
            policies=self.policies,
            agents=self.agent_tokens,
            connections=self.connections,
            upstream=self.upstream,
            sealer=self.sealer,
            holds=self.holds,
            limiter=self.limiter,
            metrics=self.metrics,
            tracer=self.tracer,
            default_adapter=self.adapters.adapter(DEFAULT_PROVIDER),
            reservation_lease=self.settings.reservation_lease,
            clock=self.clock,
        )

    @cached_property
    def cards(self) -> CardAuthorizer:
        from proxy.payments.cards import CardAuthorizer

        return CardAuthorizer(
            self.payments,
            self.store,
            self.metrics,
            self.tracer,
            self.settings.card_authorization_deadline,
            self.clock,
        )

    @cached_property
    def x402(self) -> X402Payments:
        """Paying HTTP resources with x402; its resolver learns what became of its unknown outcomes."""
        from proxy.payments.x402 import X402Payments

        x402 = X402Payments(self.payments, self.clock)
        self.payments.resolvers["x402"] = x402.resolve
        return x402

    @cached_property
    def reconciler(self) -> Reconciler:
        from proxy.payments.reconcile import Reconciler

        return Reconciler(self.store, self.connections, self.upstream, self.sealer, self.metrics, self.clock)

    @cached_property
    def events(self) -> ProviderEvents:
        from proxy.payments.events import ProviderEvents

        return ProviderEvents(
            self.store,
            self.connections,
            self.cards,
            self.metrics,
            self.settings.webhook_tolerance,
            self.clock,
            reconciler=self.reconciler,
        )

    @cached_property
    def state(self) -> StateWatcher | None:
        """The declared state file's watcher (``state_file``), or None when owners are made by hand."""
        if not self.settings.state_file:
            return None
        from proxy.state import StateApplier, StateWatcher

        applier = StateApplier(
            self.store,
            self.sealer,
            self.settings.bcrypt_rounds,
            forget_agent=lambda agent_id: self.agent_tokens.forget(lambda a: a.id == agent_id),
            forget_owner=lambda owner_id: self.owner_tokens.forget(lambda o: o.id == owner_id),
            forget_connection=self.connections.forget,
            forget_approver=lambda approver_id: self.approver_tokens.forget(lambda a: a.id == approver_id),
            clock=self.clock,
        )
        return StateWatcher(self.settings.state_file, applier, self.metrics)

    @cached_property
    def agent_listener(self) -> AgentListener:
        from proxy.listeners.agents import AgentListener

        s = self.settings
        return AgentListener(self.payments, self.upstream, s.max_body_bytes, s.body_timeout, self.x402)

    @cached_property
    def owner_api(self) -> OwnerApi:
        from proxy.listeners.console import Console
        from proxy.listeners.links import LinkPages
        from proxy.listeners.owner_api import OwnerApi
        from proxy.listeners.webhooks import WebhookListener

        return OwnerApi(
            self.store,
            self.owner_service,
            self.principals,
            self.policies.holder,
            lambda agent_id: self.agent_tokens.forget(lambda a: a.id == agent_id),
            lambda approver_id: self.approver_tokens.forget(lambda a: a.id == approver_id),
            self.metrics,
            self.holds,
            extra_routes=(
                WebhookListener(self.events).add_routes,
                LinkPages(self.store, self.principals, self.holds.voted, self.clock).add_routes,
                Console(
                    self.store,
                    self.principals,
                    self.sealer,
                    self.owner_service,
                    self.holds,
                    self.policies.holder,
                    self.clock,
                ).add_routes,
            ),
            metrics_token=self.settings.metrics_token,
        )


bootstrap = Gateway  # bootstrap(settings, store=..., upstream=..., clock=...) -> the graph
