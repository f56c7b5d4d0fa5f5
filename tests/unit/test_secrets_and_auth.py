"""Sealing credentials, token format, and the authenticator's cache and lockout."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from proxy.auth import TokenAuthenticator
from proxy.errors import AuthenticationFailed, ConfigError, RateLimited
from proxy.secrets import Sealer, SealError, issue_token, parse_keys, split_token


def key(kid: str) -> tuple[str, bytes]:
    return kid, os.urandom(32)


def test_sealed_values_open_only_in_their_own_row() -> None:
    sealer = Sealer([key("a")])
    sealed = sealer.seal(b'{"secret_key": "sk_live_x"}', "connection:conn_1")
    assert b"sk_live_x" not in sealed
    assert sealer.open(sealed, "connection:conn_1") == b'{"secret_key": "sk_live_x"}'
    with pytest.raises(SealError):
        sealer.open(sealed, "connection:conn_2")


def test_rotation_keeps_old_values_readable() -> None:
    old, new = key("old"), key("new")
    sealed = Sealer([old]).seal(b"v", "ctx")
    rotated = Sealer([new, old])
    assert rotated.open(sealed, "ctx") == b"v"
    assert rotated.needs_rotation(sealed)
    assert not rotated.needs_rotation(rotated.seal(b"v", "ctx"))


def test_key_parsing_reports_bad_keys() -> None:
    good = base64.b64encode(os.urandom(32)).decode()
    assert [k for k, _ in parse_keys(f"k2:{good}\nk1:{good}")] == ["k2", "k1"]
    with pytest.raises(ConfigError):
        parse_keys("k1:c2hvcnQ=")


def test_tokens_carry_a_public_id_and_a_hashed_secret() -> None:
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    assert issued.token.startswith("psk_0123456789abcdef_")
    public, secret = split_token(issued.token, "psk")
    assert public == "0123456789abcdef" and secret not in issued.hash
    assert split_token("sk_live_123", "psk") is None
    assert split_token("psk_XYZ_secret", "psk") is None


class Row:
    def __init__(self, token_hash: str, active: bool = True) -> None:
        self.token_hash, self.active, self.id = token_hash, active, "agt_0123456789abcdef"


async def test_authenticator_caches_and_locks_out() -> None:
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    lookups: list[str] = []

    async def find(public_id: str) -> Row | None:
        lookups.append(public_id)
        return Row(issued.hash) if public_id == "agt_0123456789abcdef" else None

    auth = TokenAuthenticator("psk", "agt", find, lambda r: r.token_hash, lambda r: r.active, max_failures=3)
    results = await asyncio.gather(*(auth.authenticate(issued.token) for _ in range(5)))
    assert all(r.id == "agt_0123456789abcdef" for r in results)
    assert len(lookups) == 1  # one bcrypt run served all five concurrent first uses
    await auth.authenticate(issued.token)
    assert len(lookups) == 1  # cached

    with pytest.raises(AuthenticationFailed):
        await auth.authenticate("psk_ffffffffffffffff_nope")  # unknown id: no bcrypt at all
    wrong = issued.token[:-4] + "xxxx"
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(wrong + str(_))
    with pytest.raises(RateLimited):
        await auth.authenticate(wrong + "again")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(None)


async def test_a_client_flooding_bad_tokens_is_locked_out_but_cached_tokens_still_work() -> None:
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    lookups: list[str] = []

    async def find(public_id: str) -> Row | None:
        lookups.append(public_id)
        return Row(issued.hash) if public_id == "agt_0123456789abcdef" else None

    auth = TokenAuthenticator(
        "psk", "agt", find, lambda r: r.token_hash, lambda r: r.active, max_client_failures=5
    )
    await auth.authenticate(issued.token, "10.0.0.9")  # verified and cached before the flood
    for i in range(5):  # random unknown ids: the per-id lockout never triggers
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"psk_{i:016x}_guess", "10.0.0.9")
    seen = len(lookups)
    with pytest.raises(RateLimited, match="from this client"):
        await auth.authenticate("psk_eeeeeeeeeeeeeeee_guess", "10.0.0.9")
    assert len(lookups) == seen  # refused before touching the store
    assert (await auth.authenticate(issued.token, "10.0.0.9")).id == "agt_0123456789abcdef"
    with pytest.raises(AuthenticationFailed):  # another client is not affected
        await auth.authenticate("psk_eeeeeeeeeeeeeeee_guess", "10.0.0.10")
