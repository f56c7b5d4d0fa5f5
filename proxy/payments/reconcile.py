"""Reconciliation: what PaySentry counted, compared with the provider's own records of each connection.

    for each connection: the provider's lists over [since, until] (adapter.listings / adapter.page)
        each object, matched to its authorization by the tag PaySentry put in its metadata
        (``paysentry_authorization``; adapters.base.ATTRIBUTION), else by the provider reference recorded:
        tagged, settled, same amount ............................... matched
        tagged, in doubt (or forwarding past its lease) ............ settled / released from the object
        tagged, failed or voided (released), the provider moved it . counted again (no limit check)
        tagged, settled, the provider shows it did not move ........ voided (released)
        untagged, moved, no record ................................. reported: made outside PaySentry
        amounts that differ, tags PaySentry does not know .......... reported
    the report (per connection: window, seen, matched, fixed, unexplained, drift) kept in the store

Every fix is one conditional transition in the store (``Store.reconcile``) with its audit event
(``authorization.reconciled``) and its spend change in one transaction, so replicas running this at once,
the resolution job and the call itself never apply one twice. It runs off the hot path: the
``paysentry reconcile`` command, a periodic task of the sidecar, and a MercadoPago notification (which
names a payment only: it is read and applied as one object).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.base import MOVED, NOT_MOVED, ProviderObject
from proxy.connections import Connection, ConnectionCache
from proxy.errors import PaySentryError, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.model import Payment
from proxy.secrets import Sealer, sealed_context
from proxy.store import (
    COUNT_FIX,
    FAILED,
    RELEASE_FIX,
    RESERVING_STATES,
    SETTLE_FIX,
    SETTLED,
    UNRESOLVED_STATES,
    VOID_FIX,
    VOIDED,
    AuthorizationRecord,
    ConnectionRecord,
    Store,
)
from proxy.upstream import Upstream, provider_request

log = logging.getLogger("paysentry.reconcile")
COUNTING_STATES = (*RESERVING_STATES, SETTLED)  # an authorization in one of these counts its object
MAX_PAGES = 200  # per list and run: a bound on the provider calls one run makes
SKEW = 600.0  # authorizations made this long before the window may own objects made in it
MATCHED, IGNORED = "matched", "ignored"
# What a run leaves unexplained (reported, counted in the drift, never fixed by guessing):
UNTRACKED = "untracked"  # money moved by an object PaySentry has no record of (made outside it)
AMOUNT_MISMATCH = "amount_mismatch"  # the provider moved another amount than PaySentry counted
UNKNOWN_TAG = "unknown_authorization"  # tagged with an authorization this connection does not have
NOT_FORWARDED = "not_forwarded"  # tagged with an authorization PaySentry never forwarded
SECOND_OBJECT = "second_object"  # a second object carries the tag of a call that made one already


@dataclass(frozen=True, slots=True)
class Unexplained:
    kind: str
    ref: str
    amount: int  # minor units: what the provider moved that PaySentry did not count (or the difference)
    currency: str
    authorization: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Fixed:
    fix: str  # settled, released, counted, voided
    authorization: str
    ref: str
    amount: int
    currency: str
    provider_status: str


@dataclass(slots=True)
class Report:
    """One connection's reconciliation over ``[since, until]``."""

    connection: str
    name: str
    provider: str
    owner_id: str
    since: float
    until: float
    ran_at: float
    seen: int = 0
    matched: int = 0
    fixed: list[Fixed] = field(default_factory=list)
    unexplained: list[Unexplained] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    complete: bool = True  # every list was read to its last page

    @property
    def drift(self) -> dict[str, int]:
        """Minor units left unexplained, by currency."""
        totals: dict[str, int] = {}
        for item in self.unexplained:
            totals[item.currency] = totals.get(item.currency, 0) + abs(item.amount)
        return totals

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["drift"] = self.drift
        return data


class Reconciler:
    def __init__(
        self,
        store: Store,
        connections: ConnectionCache,
        upstream: Upstream,
        sealer: Sealer,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.store, self.connections, self.upstream, self.sealer = store, connections, upstream, sealer
        self.metrics, self.clock, self.max_pages = metrics, clock, max_pages

    async def run(
        self, since: float, owner_id: str | None = None, connection_id: str | None = None
    ) -> list[Report]:
        """Reconcile every active connection (of one owner, or one connection) from ``since`` to now;
        each report is kept as its connection's latest."""
        records = [
            r
            for r in await self.store.list_connections(owner_id)
            if connection_id is None or r.id == connection_id
        ]
        reports = []
        for record in records:
            report = await self.connection(record, since, self.clock())
            await self.store.save_reconciliation(record.owner_id, record.id, report.ran_at, report.to_json())
            reports.append(report)
        await self.refresh_gauges()
        return reports

    async def refresh_gauges(self) -> None:
        """The drift gauge from the latest report of every connection (whichever replica or command
        made it), so every replica shows the same."""
        series = [
            ({"connection": report["connection"], "currency": currency}, float(amount))
            for report in await self.store.reconciliations(None)
            for currency, amount in report.get("drift", {}).items()
        ]
        self.metrics.set_all("paysentry_reconcile_drift", series)

    async def connection(self, record: ConnectionRecord, since: float, until: float) -> Report:
        report = Report(record.id, record.name, record.provider, record.owner_id, since, until, self.clock())
        try:
            connection = await self.connections.get(record.id)
        except PaySentryError as exc:
            report.errors.append(exc.message)
            report.complete = False
            return report
        objects = await self._list(connection, since, until, report)
        report.seen = len(objects)
        refs = [o.ref for o in objects]
        tags = sorted({o.authorization for o in objects if o.authorization})
        candidates = await self.store.reconciliation_candidates(record.id, since - SKEW, refs, tags)
        for obj in objects:
            await self._apply(connection, obj, candidates, report, "reconciliation")
        for fixed in report.fixed:
            self.metrics.inc("paysentry_reconcile_fixes_total", fix=fixed.fix)
        self.metrics.inc("paysentry_reconcile_runs_total", result="ok" if not report.errors else "error")
        log.info(
            "reconciled",
            extra={
                "fields": {
                    "connection": record.id,
                    "seen": report.seen,
                    "matched": report.matched,
                    "fixed": len(report.fixed),
                    "unexplained": len(report.unexplained),
                    "errors": report.errors,
                }
            },
        )
        return report

    async def one_object(self, connection: Connection, obj: ProviderObject, actor: str) -> str:
        """Apply what the provider says of one object (a notification read it): the fix made, matched,
        ignored, or what is unexplained about it."""
        tags = [obj.authorization] if obj.authorization else []
        candidates = await self.store.reconciliation_candidates(connection.id, None, [obj.ref], tags)
        report = Report(connection.id, "", connection.adapter.name, connection.owner_id, 0, 0, self.clock())
        result = await self._apply(connection, obj, candidates, report, actor)
        for fixed in report.fixed:
            self.metrics.inc("paysentry_reconcile_fixes_total", fix=fixed.fix)
        return result

    # -- reading the provider's lists ---------------------------------------------------------------------
    async def _list(
        self, connection: Connection, since: float, until: float, report: Report
    ) -> list[ProviderObject]:
        adapter, seen = connection.adapter, dict[str, ProviderObject]()
        for target in adapter.listings(since, until):
            pages = 0
            next_target: str | None = target
            while next_target is not None:
                if pages == self.max_pages:
                    report.errors.append(f"{target.split('?')[0]}: stopped after {pages} pages")
                    report.complete = False
                    break
                try:
                    body = await self.read(connection, next_target)
                    page = adapter.page(next_target, body)
                except (UpstreamUnavailable, ValueError) as exc:
                    report.errors.append(str(getattr(exc, "message", exc)))
                    report.complete = False
                    break
                pages += 1
                for obj in page.objects:
                    seen.setdefault(obj.ref, obj)  # a page may repeat one as lists shift under it
                next_target = page.next
        return list(seen.values())

    async def read(self, connection: Connection, target: str) -> bytes:
        """GET ``target`` from the connection's provider with the owner's credentials; 200 or UpstreamUnavailable."""
        request = provider_request(
            connection.adapter, connection.credentials, "GET", connection.upstream + target, {}, b""
        )
        reply = await self.upstream.send(request)
        if reply.status != 200:
            raise UpstreamUnavailable(
                f"the provider answered {reply.status} to GET {target.split('?')[0]}", maybe_sent=False
            )
        return reply.body

    # -- one object against what PaySentry recorded ---------------------------------------------------------
    async def _apply(
        self,
        connection: Connection,
        obj: ProviderObject,
        candidates: Sequence[AuthorizationRecord],
        report: Report,
        actor: str,
    ) -> str:
        tagged = next((a for a in candidates if a.id == obj.authorization), None)
        counting = [a for a in candidates if a.provider_ref == obj.ref and a.state in COUNTING_STATES]
        if tagged is None:
            return self._untagged(obj, counting, report)
        if tagged.provider_ref and tagged.provider_ref != obj.ref:
            if obj.outcome != MOVED:
                return IGNORED
            # One call, two objects: a re-send the provider did not take for the first (its key expired).
            return self._unexplained(report, SECOND_OBJECT, obj, obj.amount, tagged.id)
        fix = _fix_for(tagged, obj, counting)
        if fix in (VOID_FIX, RELEASE_FIX):  # releasing: on the object as it is now, not as listed
            obj = await self._fresh(connection, obj)
            fix = _fix_for(tagged, obj, counting)
            if fix is None:
                return self._matched(obj, tagged, report, counting)
        if fix is None:
            if tagged.state not in COUNTING_STATES and tagged.state not in (FAILED, VOIDED):
                if obj.outcome == MOVED:  # held, denied, expired...: it was never sent
                    return self._unexplained(report, NOT_FORWARDED, obj, obj.amount, tagged.id)
                return IGNORED
            return self._matched(obj, tagged, report, counting)
        sealed = self.sealer.seal(obj.body, sealed_context("response", tagged.id)) if obj.body else None
        data = {
            "provider_ref": obj.ref,
            "provider_status": obj.status,
            "was": tagged.state,
            "amount": obj.amount,
            "currency": obj.currency,
            "connection": connection.id,
        }
        replay = fix in (SETTLE_FIX, RELEASE_FIX, COUNT_FIX)  # what a same-key retry is answered
        applied = await self.store.reconcile(
            tagged.id,
            fix,
            actor,
            data,
            self.clock(),
            provider_ref=obj.ref,
            status=200 if replay and sealed is not None else None,
            body=sealed if replay else None,
        )
        if not applied:  # another replica, the resolution job or the call itself came first
            return self._matched(obj, tagged, report, counting)
        report.fixed.append(Fixed(fix, tagged.id, obj.ref, obj.amount, obj.currency, obj.status))
        log.warning(
            "reconciled from the provider's record",
            extra={"fields": {"authorization": tagged.id, "ref": obj.ref, "fix": fix, "actor": actor}},
        )
        self._compare_amount(obj, tagged, report, counting)
        return fix

    async def _fresh(self, connection: Connection, obj: ProviderObject) -> ProviderObject:
        """The object read again by its id (a list may be minutes old), or as listed if it cannot be."""
        adapter = connection.adapter
        path = adapter.lookup_path(Payment(adapter.name, obj.operation, 0, "", "GET", "", refers_to=obj.ref))
        if not path:
            return obj
        try:
            fresh = adapter.object_of(await self.read(connection, path))
        except UpstreamUnavailable:
            return obj
        return fresh if fresh is not None and fresh.ref == obj.ref else obj

    def _untagged(self, obj: ProviderObject, counting: Sequence[AuthorizationRecord], report: Report) -> str:
        if counting:  # recorded by its reference (made before tagging, or confirmed through PaySentry)
            report.matched += 1
            return MATCHED
        if obj.outcome != MOVED:
            return IGNORED
        if obj.authorization:
            return self._unexplained(report, UNKNOWN_TAG, obj, obj.amount, obj.authorization)
        return self._unexplained(report, UNTRACKED, obj, obj.amount)

    def _matched(
        self,
        obj: ProviderObject,
        auth: AuthorizationRecord,
        report: Report,
        counting: Sequence[AuthorizationRecord],
    ) -> str:
        report.matched += 1
        self._compare_amount(obj, auth, report, counting)
        return MATCHED

    def _compare_amount(
        self,
        obj: ProviderObject,
        auth: AuthorizationRecord,
        report: Report,
        counting: Sequence[AuthorizationRecord],
    ) -> None:
        if obj.outcome != MOVED or auth.operation != obj.operation:
            return
        # What PaySentry holds the object moves: what it authorized, or what a capture took of it.
        captured = [a.amount for a in counting if a.state == SETTLED and a.operation.endswith(".capture")]
        expected = captured[-1] if captured else auth.amount
        if obj.amount != expected or obj.currency != auth.currency:
            detail = f"PaySentry counted {expected} {auth.currency}, the provider moved {obj.amount}"
            difference = obj.amount - expected if obj.currency == auth.currency else obj.amount
            report.unexplained.append(
                Unexplained(AMOUNT_MISMATCH, obj.ref, difference, obj.currency, auth.id, detail)
            )

    @staticmethod
    def _unexplained(
        report: Report, kind: str, obj: ProviderObject, amount: int, auth: str | None = None
    ) -> str:
        detail = f"{obj.operation} {obj.ref} is {obj.status or 'present'} at the provider"
        report.unexplained.append(Unexplained(kind, obj.ref, amount, obj.currency, auth, detail))
        return kind


def _fix_for(
    auth: AuthorizationRecord, obj: ProviderObject, counting: Sequence[AuthorizationRecord]
) -> str | None:
    """The fix the provider's object proves for its tagged authorization, or None (nothing to do)."""
    if auth.state in UNRESOLVED_STATES:
        return RELEASE_FIX if obj.outcome == NOT_MOVED else SETTLE_FIX  # made: the create answered 2xx
    if auth.state == SETTLED and obj.outcome == NOT_MOVED:
        return VOID_FIX
    if auth.state in (FAILED, VOIDED) and obj.outcome == MOVED:
        # Counted by another call (a confirm of a declined create counts in full), unless that call
        # counted nothing of its own (a confirm of a create counted when it was made, since voided).
        if any(a.id != auth.id and any(c.amount for c in a.charges) for a in counting):
            return None
        return COUNT_FIX
    return None
