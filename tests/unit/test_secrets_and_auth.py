"""Sealing credentials, token format, and the authenticator's cache and lockout."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from proxy.auth import TokenAuthenticator
from proxy.errors import AuthenticationFailed, ConfigError, RateLimited
from proxy.secrets import (
    QUICK,
    Sealer,
    SealError,
    check_secret,
    hash_secret,
    issue_token,
    parse_keys,
    split_token,
)


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


class Short:
    """A declared token whose secret a person chose, too short for a quick check: bcrypt every time."""

    token = "psk_0123456789abcdef_chosen-by-hand"
    hash = hash_secret("chosen-by-hand", 4)


def test_a_secret_paysentry_makes_is_stored_with_a_quick_check_and_a_chosen_one_without() -> None:
    for _ in range(200):  # every one it makes
        issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
        assert issued.hash.startswith(QUICK), issued.token
    secret = issued.token.split("_", 2)[2]
    assert check_secret(secret, issued.hash)
    assert not check_secret(secret[:-1] + ("a" if secret[-1] != "a" else "b"), issued.hash)
    assert Short.hash.startswith("$2") and check_secret("chosen-by-hand", Short.hash)
    assert not check_secret("chosen-by-hanD", Short.hash)
    passphrase = "correct-horse-battery-staple-and-more-words"  # 43 characters, little entropy
    assert len(passphrase) == 43 and hash_secret(passphrase, 4).startswith("$2")


async def test_wrong_secrets_for_a_token_paysentry_made_cost_no_bcrypt_and_lock_out_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The narrow case the lockout left open: a correct token this process has never verified, sent from
    the very address flooding wrong secrets for its id. With the quick check nothing is locked out."""
    runs = count_bcrypt(monkeypatch)
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    rows, checks, clock = {"agt_0123456789abcdef": Row(issued.hash)}, [], [0.0]
    auth = authenticator(rows, checks, clock, max_failures=3)
    wrong = issued.token.rsplit("_", 1)[0] + "_"
    for _ in range(500):  # same address, the id known, random 43-character guesses
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(wrong + os.urandom(32).hex()[:43], "127.0.0.1")
    assert runs == []  # not one bcrypt run for them
    assert (await auth.authenticate(issued.token, "127.0.0.1")).id == "agt_0123456789abcdef"
    assert len(runs) == 1


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
    short = TokenAuthenticator(
        "psk",
        "agt",
        lambda _: _found(Row(Short.hash)),
        lambda r: r.token_hash,
        lambda r: r.active,
        max_failures=3,
    )
    for _ in range(3):  # a bcrypt-only hash: wrong secrets run bcrypt, so they are counted
        with pytest.raises(AuthenticationFailed):
            await short.authenticate(Short.token + str(_))
    with pytest.raises(RateLimited):
        await short.authenticate(Short.token + "again")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(None)


def authenticator(
    rows: dict[str, Row], checks: list[str], clock: list[float], **kwargs: object
) -> TokenAuthenticator[Row]:
    """An authenticator over ``rows`` (by public id) on a fake clock; ``checks`` lists each bcrypt run."""

    async def find(public_id: str) -> Row | None:
        return rows.get(public_id)

    def hash_of(row: Row) -> str:
        checks.append(row.id)  # read for every bcrypt check and every re-check
        return row.token_hash

    return TokenAuthenticator(
        "psk", "agt", find, hash_of, lambda r: r.active, cache_ttl=30, clock=lambda: clock[0], **kwargs
    )


async def test_wrong_secrets_from_the_same_address_never_lock_out_a_verified_token() -> None:
    issued = Short
    rows, checks, clock = {"agt_0123456789abcdef": Row(issued.hash)}, [], [0.0]
    auth = authenticator(rows, checks, clock)
    await auth.authenticate(issued.token, "127.0.0.1")  # the agent, before the attack
    wrong = issued.token.rsplit("_", 1)[0] + "_guess"
    for i in range(12):  # the attacker knows the id (from /metrics, say), not the secret
        with pytest.raises((AuthenticationFailed, RateLimited)):
            await auth.authenticate(f"{wrong}{i}", "127.0.0.1")
    with pytest.raises(RateLimited):
        await auth.authenticate(wrong + "more", "127.0.0.1")
    clock[0] = 31.0  # the agent's cache entry has expired, the lockout has not
    assert (await auth.authenticate(issued.token, "127.0.0.1")).id == "agt_0123456789abcdef"
    rows["agt_0123456789abcdef"].active = False  # revoked elsewhere: the re-check reads the record
    clock[0] = 62.0
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(issued.token, "127.0.0.1")


async def test_failures_count_per_address_and_id_and_a_correct_secret_passes_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bcrypt_runs = count_bcrypt(monkeypatch)
    issued = Short
    rows, checks, clock = {"agt_0123456789abcdef": Row(issued.hash)}, [], [0.0]
    auth = authenticator(rows, checks, clock, max_failures=3, probe_interval=1.0)
    wrong = issued.token.rsplit("_", 1)[0] + "_guess"
    for i in range(3):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"{wrong}{i}", "10.0.0.9")
    runs = len(bcrypt_runs)
    with pytest.raises(RateLimited):  # locked: no bcrypt for this address and id
        await auth.authenticate(issued.token, "10.0.0.9")
    assert len(bcrypt_runs) == runs
    assert (await auth.authenticate(issued.token, "10.0.0.10")).id  # another address is not affected
    auth.forget(lambda r: True)
    clock[0] = 1.5  # the probe slot: a correct secret from the locked address passes it
    assert (await auth.authenticate(issued.token, "10.0.0.9")).id == "agt_0123456789abcdef"
    with pytest.raises(AuthenticationFailed):  # and the count is cleared
        await auth.authenticate(wrong + "x", "10.0.0.9")


async def test_unknown_ids_and_malformed_tokens_lock_out_nobody() -> None:
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    rows, checks, clock = {"agt_0123456789abcdef": Row(issued.hash)}, [], [0.0]
    auth = authenticator(rows, checks, clock)
    for i in range(200):  # random ids and junk from the agents' own address: no bcrypt, no lockout
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"psk_{i:016x}_guess", "127.0.0.1")
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"junk{i}", "127.0.0.1")
    assert checks == []
    assert (await auth.authenticate(issued.token, "127.0.0.1")).id == "agt_0123456789abcdef"


@pytest.mark.parametrize(
    "token",
    [
        "psk_0123456789abcdef_" + "é" * 40,  # 80 bytes: bcrypt refuses more than 72
        "psk_0123456789abcdef_" + "x" * 100,
        "psk_0123456789abcdef_ab\udcffcd",  # an undecodable header byte (0xff) as aiohttp keeps it
        "psk_0123456789abcdef_ab\x00cd",
        "psk_0123456789abcdef_ab cd",
    ],
)
async def test_malformed_secrets_are_refused_without_bcrypt(token: str) -> None:
    issued = issue_token("psk", "agt_0123456789abcdef", rounds=4)
    rows, checks, clock = {"agt_0123456789abcdef": Row(issued.hash)}, [], [0.0]
    with pytest.raises(AuthenticationFailed):
        await authenticator(rows, checks, clock).authenticate(token, "127.0.0.1")
    assert checks == []


async def _found(row: Row) -> Row:
    return row


def count_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each secret the authenticator hands to bcrypt, in order."""
    import proxy.auth

    runs: list[str] = []
    monkeypatch.setattr(
        proxy.auth, "check_secret", lambda secret, stored: runs.append(secret) or check_secret(secret, stored)
    )
    return runs
