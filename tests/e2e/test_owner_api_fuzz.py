"""The owner API against its own OpenAPI document (schemathesis): generated requests, valid and not,
never get a 5xx, and a refused request (4xx) changes nothing in the database."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import POLICY, Deployment, make_deployment

SCHEMA = schemathesis.openapi.from_path(Path(__file__).parents[2] / "proxy" / "openapi.yaml")
STATE_TABLES = (
    "owners",
    "connections",
    "agents",
    "authorizations",
    "approvals",
    "votes",
    "approval_links",
    "spend",
    "events",
    "webhook_events",
    "approvers",
    "notifications",
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    import stripe

    policy = POLICY.replace("hold_expiry: 2s", "hold_expiry: 1h")  # nothing changes on its own meanwhile
    dep = make_deployment(tmp_path_factory.mktemp("fuzz"), policy, extra_config="token_cache_ttl: 5m\n")
    dep.start()
    stripe.api_base, stripe.api_key, stripe.max_network_retries = dep.agent_url, dep.agent_token, 0
    stripe.PaymentIntent.create(amount=1000, currency="usd", idempotency_key="fuzz-1")
    with pytest.raises(stripe.StripeError):  # a hold, so approvals and votes have something to act on
        stripe.PaymentIntent.create(amount=6000, currency="usd", idempotency_key="fuzz-2")
    yield dep
    dep.stop()


def state(dep: Deployment) -> str:
    db = sqlite3.connect(f"file:{dep.root / 'paysentry.db'}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        for table in STATE_TABLES:
            for row in db.execute(f"SELECT * FROM {table} ORDER BY 1"):  # noqa: S608 - fixed names
                digest.update(repr(row).encode())
        return digest.hexdigest()
    finally:
        db.close()


@pytest.mark.e2e
@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_owner_api_has_no_5xx_and_refusals_change_nothing(case: schemathesis.Case, api: Deployment) -> None:
    before = state(api)
    response = case.call(  # noqa
        base_url=api.admin_url, headers={"Authorization": f"Bearer {api.owner_token}"}
    )
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
    if response.status_code >= 400:
        assert state(api) == before, (
            f"a refused {case.method} {case.formatted_path} ({response.status_code}) changed the database"
        )
        if response.status_code == 417:  # an Expect header the HTTP layer refuses before any route runs
            assert "Expect" in response.text
        else:
            assert response.json()["error"]["message"]


# -- every listener, fuzzed with raw bytes: Unicode digits, invalid bytes, huge numbers, deep nesting -------
DIGITS = st.sampled_from(["²", "٣", "１２", "߂", "9" * 5000, "-1", "1e999999", "0x10", "", "7"])
NESTED = st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n) | st.integers(1, 3000).map(
    lambda n: b'{"a":' * n + b"1" + b"}" * n
)
RAW_TEXT = st.binary(max_size=40) | st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))
HEADER_VALUE = RAW_TEXT.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | DIGITS.map(str.encode)
ENCODING = st.sampled_from([b"", b"gzip", b"deflate", b"br", b"identity", b"gzip, gzip", b"x\xff"])


def _raw(
    dep: Deployment, base: str, method: str, target: bytes, headers: dict[bytes, bytes], body: bytes
) -> int:
    from tests.e2e.test_adversarial import raw_http

    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers.items() if v != b""]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return raw_http(dep, b"\r\n".join(lines) + b"\r\n\r\n" + body, base)[0]


def _no_failure_logged(dep: Deployment, before: int) -> None:
    logs = "".join(dep.output[before:])
    for sign in ("Traceback", "Error handling request", "unexpected error", "owner API error"):
        assert sign not in logs, logs[-2000:]
    assert dep.agent_token not in logs and dep.owner_token not in logs


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
PAY_PATHS = [
    *(b"/v1/payment_intents", b"/v1/charges", b"/v1/refunds", b"/v1/transfers", b"/v1/payouts"),
    b"/v1/issuing/cards",
    # calls on objects: unknown ones (read from the provider: 404) and lifecycle calls
    *(b"/v1/payment_intents/pi_nope/confirm", b"/v1/payment_intents/pi_nope/capture"),
    *(b"/v1/payment_intents/pi_nope/increment_authorization", b"/v1/payment_intents/pi_nope/cancel"),
    *(b"/v1/charges/ch_nope/capture", b"/v1/refunds?charge=ch_nope"),
]


@pytest.mark.e2e
@FUZZ
@given(
    path=st.sampled_from(PAY_PATHS),
    amount=DIGITS | st.integers(-(10**30), 10**30).map(str),
    extra=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12) | DIGITS), max_size=4),
    key=HEADER_VALUE,
    token_tail=st.sampled_from([b"", b"\xff", b"\x01", b"x" * 80, "é".encode() * 40]),
    encoding=ENCODING,
    nested=st.none() | NESTED,
)
def test_the_agent_listener_never_answers_5xx(
    api: Deployment,
    path: bytes,
    amount: str,
    extra: list[tuple[str, str]],
    key: bytes,
    token_tail: bytes,
    encoding: bytes,
    nested: bytes | None,
) -> None:
    from urllib.parse import urlencode

    body = (
        nested
        if nested is not None
        else urlencode([("amount", amount), ("currency", "usd"), *extra]).encode()
    )
    headers = {
        b"Authorization": b"Bearer " + api.agent_token.encode() + token_tail,
        b"Content-Type": b"application/x-www-form-urlencoded",
        b"Idempotency-Key": key,
        b"Content-Encoding": encoding,
    }
    before = len(api.output)
    status = _raw(api, api.agent_url, "POST", path, headers, body)
    assert 0 < status < 500, status  # the provider (the mock) and the store are up: no 5xx is owed
    _no_failure_logged(api, before)


@pytest.mark.e2e
@FUZZ
@given(
    route=st.sampled_from(["/v1/authorizations", "/v1/events", "/v1/approvals", "/v1/agents"]),
    params=st.lists(
        st.tuples(st.sampled_from(["limit", "after", "state", "agent"]), DIGITS | st.text(max_size=8)),
        max_size=3,
    ),
    body=st.none() | NESTED | RAW_TEXT,
    encoding=ENCODING,
    token_tail=st.sampled_from([b"", b"\xff", b"\x00", "ü".encode() * 50]),
)
def test_the_owner_api_never_answers_5xx_to_raw_requests(
    api: Deployment,
    route: str,
    params: list[tuple[str, str]],
    body: bytes | None,
    encoding: bytes,
    token_tail: bytes,
) -> None:
    from urllib.parse import urlencode

    target = (route + ("?" + urlencode(params) if params else "")).encode()
    headers = {
        b"Authorization": b"Bearer " + api.owner_token.encode() + token_tail,
        b"Content-Type": b"application/json",
        b"Content-Encoding": encoding,
    }
    before = len(api.output)
    status = _raw(api, api.admin_url, "POST" if body is not None else "GET", target, headers, body or b"")
    assert 0 < status < 500, status
    _no_failure_logged(api, before)


@pytest.mark.e2e
@FUZZ
@given(
    header=st.one_of(
        HEADER_VALUE,
        st.builds(lambda t, v: b"t=" + t + b",v1=" + v, DIGITS.map(str.encode) | RAW_TEXT, RAW_TEXT),
    ),
    body=NESTED | RAW_TEXT,
    sign=st.booleans(),
    encoding=ENCODING,
)
def test_webhooks_never_answer_5xx(
    api: Deployment, header: bytes, body: bytes, sign: bool, encoding: bytes
) -> None:
    from tests.e2e.test_webhooks import signature

    headers = {
        b"Stripe-Signature": signature(body).encode() if sign else header,
        b"Content-Type": b"application/json",
        b"Content-Encoding": encoding,
    }
    before = len(api.output)
    status = _raw(api, api.admin_url, "POST", f"/v1/webhooks/{api.connection_id}".encode(), headers, body)
    assert 0 < status < 500, status
    _no_failure_logged(api, before)


@pytest.mark.e2e
@FUZZ
@given(
    token=st.binary(min_size=1, max_size=60).map(lambda b: "".join(f"%{c:02X}" for c in b).encode())
    | st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=60).map(str.encode),
    method=st.sampled_from(["GET", "POST"]),
    form=RAW_TEXT | NESTED,
    encoding=ENCODING,
)
def test_approval_links_never_answer_5xx(
    api: Deployment, token: bytes, method: str, form: bytes, encoding: bytes
) -> None:
    headers = {b"Content-Type": b"application/x-www-form-urlencoded", b"Content-Encoding": encoding}
    before = len(api.output)
    status = _raw(
        api, api.admin_url, method, b"/approvals/link/" + token, headers, form if method == "POST" else b""
    )
    assert 0 < status < 500, status
    _no_failure_logged(api, before)
