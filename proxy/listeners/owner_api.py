"""The owner API: JSON over its own listener, authenticated by the owner's token. Also the probes.

Every query is scoped to the authenticated owner: another owner's agents, holds and records are not
found. Routes:

    GET  /livez                                   the process is up
    GET  /readyz                                  store reachable and a policy set loaded (503 if not)
    GET  /metrics                                 Prometheus text format
    GET  /openapi.json                            this API's OpenAPI document (proxy/openapi.yaml)
    POST /v1/webhooks/{connection}                inbound provider webhooks (signed; see proxy/listeners/webhooks.py)
    GET|POST /approvals/link/{token}              the one-time approval page (the token is the credential)
    GET  /v1/agents                               POST /v1/agents {name, labels, connection}
    POST /v1/agents/{id}/revoke                   GET /v1/agents/{id}/spend
    GET  /v1/approvals?state=&agent=              GET /v1/approvals/{id}
    POST /v1/approvals/{id}/approve {reason}      POST /v1/approvals/{id}/deny {reason}
                                                  (counted for the token's identity: owner:<name>, or
                                                  the approver whose psa_ token it is)
    GET  /v1/approvers                            POST /v1/approvers {name}   DELETE /v1/approvers/{id}
    GET  /v1/authorizations?agent=&state=&decision=&rule=   GET /v1/authorizations/{id}
    GET  /v1/events?agent=&type=   (or ?after=SEQ: oldest first after a sequence number, to follow the log)
    GET  /v1/reconciliation                       the latest reconciliation of each of the owner's connections

Every list follows Stripe's conventions: newest first, ``{"object": "list", "url", "has_more", "data"}``,
``limit`` (1 to 1000, default 100), ``starting_after`` / ``ending_before`` (an object's id; an event's
seq), ``created[gte]`` / ``created[lt]`` (RFC 3339 or Unix seconds) and the list's own filters. An unknown
parameter, a repeated one, a filter value outside its choices or a cursor that is none of the owner's
objects is a 400 naming it. Times are RFC 3339.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import yaml
from aiohttp import web

from proxy import safejson
from proxy.approvals import APPROVED, DENIED, EXPIRED, PENDING
from proxy.errors import AuthenticationFailed, BadRequest, Forbidden, NotFound, PaySentryError
from proxy.holds import HoldCoordinator
from proxy.listeners.server import refuse_encoded_body
from proxy.metrics import Metrics
from proxy.owners import (
    OwnerService,
    agent_json,
    approval_json,
    approver_json,
    authorization_json,
    event_json,
    reconciliation_json,
    refusal,
    spend_against_limits,
)
from proxy.policy.reload import PolicyHolder
from proxy.principals import Principal, Principals
from proxy.store import OwnerRecord, Page, Store, UnknownCursor

log = logging.getLogger("paysentry.owner_api")
OWNER = web.RequestKey("owner", OwnerRecord)
PRINCIPAL = web.RequestKey("principal", Principal)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
APPROVAL_STATES = (PENDING, APPROVED, DENIED, EXPIRED)
AUTHORIZATION_STATES = (
    "denied", "held", "approved", "rejected", "expired", "forwarding", "in_doubt", "settled", "failed", "voided",
)  # fmt: skip
DECISIONS = ("allow", "deny", "hold")
ACTIVE_OR_REVOKED = ("active", "revoked")
# Stripe's list parameters, taken by every list; each list adds its filters (None: any value).
LIST_PARAMS = ("limit", "starting_after", "ending_before", "created[gte]", "created[lt]")
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/openapi.json"})
# What an approver's token may do: see holds and vote as themself. Everything else is the owner's.
APPROVER_ROUTES = frozenset(
    {
        ("GET", "/v1/approvals"),
        ("GET", "/v1/approvals/{id}"),
        ("POST", "/v1/approvals/{id}/approve"),
        ("POST", "/v1/approvals/{id}/deny"),
    }
)


def _error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    error = {"code": code, "message": message} | ({"param": param} if param else {})
    return web.json_response({"error": error}, status=status)


class OwnerApi:
    def __init__(
        self,
        store: Store,
        service: OwnerService,
        principals: Principals,
        policies: PolicyHolder,
        on_revoke: Callable[[str], None],
        on_revoke_approver: Callable[[str], None],
        metrics: Metrics,
        holds: HoldCoordinator,
        extra_routes: Sequence[Callable[[web.Application], None]] = (),
        metrics_token: str = "",
    ) -> None:
        self.metrics_token = metrics_token  # when set, /metrics needs it as a bearer token
        self.store, self.service, self.principals, self.policies = store, service, principals, policies
        self.on_revoke, self.on_revoke_approver = on_revoke, on_revoke_approver
        self.metrics = metrics
        self.holds = holds
        self.extra_routes = extra_routes  # listeners sharing this port: webhooks, approval links
        self.draining = False  # set on SIGTERM: readiness fails so no new traffic is routed here

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/livez", self.livez)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/v1/agents", self.list_agents)
        r.add_post("/v1/agents", self.create_agent)
        r.add_post("/v1/agents/{id}/revoke", self.revoke_agent)
        r.add_get("/v1/agents/{id}/spend", self.agent_spend)
        r.add_get("/v1/approvals", self.list_approvals)
        r.add_get("/v1/approvals/{id}", self.get_approval)
        r.add_post("/v1/approvals/{id}/approve", self.approve)
        r.add_post("/v1/approvals/{id}/deny", self.deny)
        r.add_get("/v1/authorizations", self.list_authorizations)
        r.add_get("/v1/authorizations/{id}", self.get_authorization)
        r.add_get("/v1/events", self.list_events)
        r.add_get("/v1/reconciliation", self.reconciliation)
        r.add_get("/v1/approvers", self.list_approvers)
        r.add_post("/v1/approvers", self.create_approver)
        r.add_delete("/v1/approvers/{id}", self.revoke_approver)
        for add_routes in self.extra_routes:
            add_routes(app)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            refuse_encoded_body(request.headers)
            if request.path not in PUBLIC_PATHS and not request.path.startswith(
                ("/approvals/link/", "/v1/webhooks/", "/console")  # links, signatures, sessions
            ):
                header = request.headers.get("Authorization", "")
                token = header[7:].strip() if header.lower().startswith("bearer ") else None
                principal = await self.principals.authenticate(token, request.remote)
                route = request.match_info.route.resource
                canonical = route.canonical if route is not None else request.path
                if not principal.is_owner and (request.method, canonical) not in APPROVER_ROUTES:
                    raise Forbidden(
                        "an approver's token may list and show holds and vote on them; the rest needs "
                        "the owner's token"
                    )
                request[PRINCIPAL], request[OWNER] = principal, principal.owner
            return await handler(request)
        except PaySentryError as exc:
            return _error(exc.status, exc.code, exc.message, exc.param)
        except UnknownCursor as fact:
            refused = refusal(fact)
            return _error(refused.status, refused.code, refused.message, refused.param)
        except web.HTTPException as exc:  # aiohttp's own: no such route, method, body too large
            if exc.status < 400:
                raise
            return _error(exc.status, "request_refused", f"{exc.reason}: {request.method} {request.path}")
        except Exception:
            log.exception("owner API error", extra={"fields": {"path": request.path}})
            return _error(500, "internal_error", "PaySentry failed to process this request; nothing changed")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics_token:
            header = request.headers.get("Authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.metrics_token.encode()):
                raise AuthenticationFailed(
                    "/metrics needs the scrape token: Authorization: Bearer <metrics_token>"
                )
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def readyz(self, request: web.Request) -> web.Response:
        checks: dict[str, Any] = {
            "policy": {
                "revision": self.policies.current.revision,
                "last_reload_error": self.policies.last_error,
            }
        }
        try:
            await self.store.ping()
            checks["store"] = {"ok": True}
        except PaySentryError as exc:
            checks["store"] = {"ok": False, "error": exc.message}
        checks["draining"] = self.draining
        ready = checks["store"]["ok"] and not self.draining
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = safejson.loads(await request.read())
        except ValueError:
            raise BadRequest("the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def list_agents(self, request: web.Request) -> web.Response:
        page = page_query(request, {"state": ACTIVE_OR_REVOKED})
        agents, more = await self.store.page_agents(request[OWNER].id, page)
        return list_response(request, [agent_json(a) for a in agents], more)

    async def create_agent(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        labels = body.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise BadRequest("labels must be an object of strings", param="labels")
        name, connection = body.get("name"), body.get("connection", "default")
        if not isinstance(name, str) or not isinstance(connection, str):
            raise BadRequest("name and connection must be strings", param="name")
        agent, token = await self.service.create_agent(request[OWNER].id, name, labels, connection)
        return web.json_response({**agent_json(agent), "token": token}, status=201)

    async def revoke_agent(self, request: web.Request) -> web.Response:
        owner = request[OWNER]
        agent_id = request.match_info["id"]
        if not await self.store.revoke_agent(owner.id, agent_id, f"owner:{owner.name}", self.service.clock()):
            raise NotFound(f"no active agent {agent_id!r}")
        self.on_revoke(agent_id)
        return web.json_response({"id": agent_id, "revoked": True})

    async def agent_spend(self, request: web.Request) -> web.Response:
        owner, agent_id = request[OWNER], request.match_info["id"]
        agent = await self.store.get_agent(agent_id)
        if agent is None or agent.owner_id != owner.id:
            raise NotFound(f"no agent {agent_id!r}")
        rows = await self.store.spend_of(owner.id, agent_id)
        limits = spend_against_limits(self.policies.current, agent, rows, self.service.clock())
        return web.json_response({"agent": agent_id, "data": limits})

    async def list_approvals(self, request: web.Request) -> web.Response:
        page = page_query(request, {"state": (*APPROVAL_STATES, "all"), "agent": None})
        if page.state == "all":
            page = dataclasses.replace(page, state=None)
        approvals, more = await self.store.page_approvals(request[OWNER].id, page)
        now = self.service.clock()
        return list_response(request, [approval_json(a, now) for a in approvals], more)

    async def get_approval(self, request: web.Request) -> web.Response:
        approval = await self.store.get_approval(request[OWNER].id, request.match_info["id"])
        if approval is None:
            raise NotFound(f"no approval {request.match_info['id']!r}")
        return web.json_response(approval_json(approval, self.service.clock()))

    async def _decide(self, request: web.Request, approve: bool) -> web.Response:
        """The vote counts for the identity the token proves: ``owner:<name>`` for the owner's token, the
        approver's own name for theirs. Nothing the caller writes in the body is ever recorded as who
        decided."""
        principal = request[PRINCIPAL]
        body = await self._body(request)
        reason, voter = body.get("reason", ""), principal.voter
        if not isinstance(reason, str):
            raise BadRequest("reason must be a string", param="reason")
        if body.get("as", voter) != voter:
            raise Forbidden(
                f"the vote is counted for the identity that authenticated ({voter}), never as the voter "
                "the request names; each approver votes with their own token",
                param="as",
            )
        result = await self.service.vote(
            principal.owner.id,
            request.match_info["id"],
            voter,
            approve,
            reason[:2000],
            "owner_api",
            principal.authenticated("owner_api"),
        )
        self.holds.voted(result.approval)
        return web.json_response(approval_json(result.approval, self.service.clock(), result.counted))

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, True)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, False)

    async def list_approvers(self, request: web.Request) -> web.Response:
        page = page_query(request, {"state": ACTIVE_OR_REVOKED})
        approvers, more = await self.store.page_approvers(request[OWNER].id, page)
        return list_response(request, [approver_json(a) for a in approvers], more)

    async def create_approver(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        owner = request[OWNER]
        approver, token = await self.service.create_approver(
            owner.id, body.get("name"), f"owner:{owner.name}"
        )
        return web.json_response({**approver_json(approver), "token": token}, status=201)

    async def revoke_approver(self, request: web.Request) -> web.Response:
        owner, approver_id = request[OWNER], request.match_info["id"]
        await self.service.revoke_approver(owner.id, approver_id, f"owner:{owner.name}")
        self.on_revoke_approver(approver_id)
        return web.json_response({"id": approver_id, "revoked": True})

    async def list_authorizations(self, request: web.Request) -> web.Response:
        filters = {"agent": None, "state": AUTHORIZATION_STATES, "decision": DECISIONS, "rule": None}
        rows, more = await self.store.page_authorizations(request[OWNER].id, page_query(request, filters))
        return list_response(request, [authorization_json(a) for a in rows], more)

    async def get_authorization(self, request: web.Request) -> web.Response:
        auth = await self.store.get_authorization(request[OWNER].id, request.match_info["id"])
        if auth is None:
            raise NotFound(f"no authorization {request.match_info['id']!r}")
        return web.json_response(authorization_json(auth))

    async def reconciliation(self, request: web.Request) -> web.Response:
        _refuse_unknown(request, ())
        reports = await self.store.reconciliations(request[OWNER].id)
        return list_response(request, [reconciliation_json(r) for r in reports], False)

    async def list_events(self, request: web.Request) -> web.Response:
        """Newest first as every list; ``after=SEQ`` instead follows the log: oldest first after SEQ."""
        if "after" in request.query:
            _refuse_unknown(request, ("after", "limit"))
            after = _int_query(request, "after", 0, 2**62)
            limit = _int_query(request, "limit", DEFAULT_LIMIT, MAX_LIMIT, minimum=1)
            events = await self.store.list_events(request[OWNER].id, after, limit + 1)
            shown = [event_json(e) for e in events[:limit]]
            return list_response(request, shown, len(events) > limit)
        page = page_query(request, {"agent": None, "type": None})
        for cursor in (page.starting_after, page.ending_before):
            if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
                raise BadRequest("an event's cursor is its seq, a whole number", param="starting_after")
        events, more = await self.store.page_events(request[OWNER].id, page)
        return list_response(request, [event_json(e) for e in events], more)


def list_response(request: web.Request, data: list[dict[str, Any]], has_more: bool) -> web.Response:
    return web.json_response({"object": "list", "url": request.path, "has_more": has_more, "data": data})


def page_query(request: web.Request, filters: Mapping[str, tuple[str, ...] | None]) -> Page:
    """Stripe's list parameters and the list's ``filters`` (each with its choices, None: any value) as
    the store's Page; 400 naming the first parameter that is unknown, repeated or out of its choices."""
    _refuse_unknown(request, (*LIST_PARAMS, *filters))
    q = request.query
    for name, choices in filters.items():
        if choices is not None and name in q and q[name] not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {q[name]!r}", param=name)
    if "starting_after" in q and "ending_before" in q:
        raise BadRequest("give starting_after or ending_before, not both", param="ending_before")
    return Page(
        agent_id=q.get("agent"),
        state=q.get("state"),
        decision=q.get("decision"),
        rule=q.get("rule"),
        kind=q.get("type"),
        created_gte=_time_query(request, "created[gte]"),
        created_lt=_time_query(request, "created[lt]"),
        starting_after=q.get("starting_after"),
        ending_before=q.get("ending_before"),
        limit=_int_query(request, "limit", DEFAULT_LIMIT, MAX_LIMIT, minimum=1),
    )


def _refuse_unknown(request: web.Request, allowed: Sequence[str]) -> None:
    for name in request.query:
        if name not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise BadRequest(f"unknown parameter {name!r} for {request.path}; {takes}", param=name)
        if len(request.query.getall(name)) > 1:
            raise BadRequest(f"{name} is given more than once", param=name)


def _time_query(request: web.Request, name: str) -> float | None:
    """An RFC 3339 time (``2026-11-22T10:00:00Z``) or Unix seconds."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.isascii() and raw.isdigit() and len(raw) <= 12:
        return float(raw)
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        at = None
    if at is None or at.tzinfo is None or not raw[:4].isdigit() or "T" not in raw.upper():
        raise BadRequest(
            f"{name} takes an RFC 3339 time (2026-11-22T10:00:00Z) or Unix seconds, got {raw[:40]!r}",
            param=name,
        )
    return at.astimezone(UTC).timestamp()


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The owner API's OpenAPI document (proxy/openapi.yaml), served at /openapi.json."""
    return cast(dict[str, Any], yaml.safe_load((Path(__file__).parents[1] / "openapi.yaml").read_text()))


def _int_query(request: web.Request, name: str, default: int, maximum: int, minimum: int = 0) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if (
        not (raw.isascii() and raw.isdigit())
        or len(raw) > len(str(maximum))
        or not minimum <= int(raw) <= maximum
    ):
        raise BadRequest(f"{name} must be a whole number from {minimum} to {maximum}", param=name)
    return int(raw)
