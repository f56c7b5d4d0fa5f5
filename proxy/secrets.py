"""Secrets at rest and in flight: sealing credentials with AES-GCM, and agent/owner tokens.

Sealed values are ``ps1.<key id>.<base64(nonce | ciphertext)>``, authenticated with associated data that
binds them to the row they belong to (a sealed credential copied to another row does not open). Several
keys can be loaded at once for rotation; the first one seals.

Tokens are ``<prefix>_<public id>_<secret>``: the public id finds the row without any hashing, and only the
secret's bcrypt hash is stored. A token is never logged, stored or echoed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConfigError, PaySentryError


class SealError(PaySentryError):
    code = "paysentry_unseal_failed"


class Sealer:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError(["no encryption key: set PAYSENTRY_ENCRYPTION_KEYS or encryption.key_file"])
        self._primary = keys[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keys}

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        sealed = self._keys[self._primary].encrypt(nonce, plaintext, context.encode())
        return f"ps1.{self._primary}.".encode() + base64.urlsafe_b64encode(nonce + sealed)

    def open(self, sealed: bytes, context: str) -> bytes:
        try:
            version, kid, payload = sealed.decode().split(".", 2)
            raw = base64.urlsafe_b64decode(payload)
            key = self._keys[kid]
        except (ValueError, KeyError, UnicodeDecodeError):
            raise SealError("a sealed value uses an unknown format or a key that is not loaded") from None
        if version != "ps1":
            raise SealError("a sealed value uses an unknown format")
        try:
            return key.decrypt(raw[:12], raw[12:], context.encode())
        except InvalidTag:
            raise SealError(
                "a sealed value failed authentication (wrong key or moved to another row)"
            ) from None

    def needs_rotation(self, sealed: bytes) -> bool:
        return not sealed.startswith(f"ps1.{self._primary}.".encode())


def sealed_context(kind: str, row_id: str) -> str:
    """The associated data binding a sealed value to its row: ``connection:<id>`` or ``response:<id>``."""
    return f"{kind}:{row_id}"


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """Keys as ``id:base64key`` separated by commas or new lines, newest first."""
    keys, problems = [], []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        kid, _, b64 = item.partition(":")
        try:
            key = base64.b64decode(b64, validate=True)
        except ValueError:
            key = b""
        if not kid.isalnum() or len(key) != 32:
            problems.append(f"encryption key {kid or '?'!r}: expected id:base64 of 32 random bytes")
            continue
        keys.append((kid, key))
    if problems:
        raise ConfigError(problems)
    return keys


def new_key_line(kid: str) -> str:
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


def load_keys(key_file: str | None) -> list[tuple[str, bytes]]:
    env = os.environ.get("PAYSENTRY_ENCRYPTION_KEYS")
    if env:
        return parse_keys(env)
    if key_file and Path(key_file).exists():
        return parse_keys(Path(key_file).read_text())
    raise ConfigError(
        [
            "no encryption key: set PAYSENTRY_ENCRYPTION_KEYS, or encryption.key_file to an existing "
            "file (paysentry keygen writes one)"
        ]
    )


# -- tokens -------------------------------------------------------------------------------------------
AGENT_PREFIX, OWNER_PREFIX, APPROVER_PREFIX = "psk", "pso", "psa"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    public_id: str
    token: str  # shown once
    hash: str  # stored


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def issue_token(prefix: str, public_id: str, rounds: int) -> IssuedToken:
    secret = secrets.token_urlsafe(32)
    while not _made_by_paysentry(secret):  # about 1 in 1,000 lacks a digit or a case: drawn again
        secret = secrets.token_urlsafe(32)
    return IssuedToken(
        public_id, f"{prefix}_{public_id.split('_', 1)[1]}_{secret}", hash_secret(secret, rounds)
    )


# A stored token hash is bcrypt's, led by a 32-bit quick check of the secret when the secret is one as
# PaySentry makes them (token_urlsafe(32): 43 characters, 256 random bits). A wrong secret then fails the
# quick check without bcrypt, so wrong guesses cost no CPU and need no lockout, and a correct token is
# never locked out; a guess passes the check once in 4 billion, and then bcrypt decides. The check leaves
# 224 bits of such a secret unknown. Any other secret (one a person chose: its length says nothing of its
# entropy) gets bcrypt alone, and the lockout.
QUICK = "q1$"


def hash_secret(secret: str, rounds: int) -> str:
    digest = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()
    return f"{QUICK}{_quick(secret)}${digest}" if _made_by_paysentry(secret) else digest


def _made_by_paysentry(secret: str) -> bool:
    """Shaped as issue_token makes secrets (token_urlsafe(32) with a digit and both cases)."""
    return (
        len(secret) == 43
        and _SECRET.fullmatch(secret) is not None
        and any(c.isupper() for c in secret)
        and any(c.islower() for c in secret)
        and any(c.isdigit() for c in secret)
    )


def _quick(secret: str) -> str:
    return hashlib.sha256(b"paysentry-quick-check:" + secret.encode()).hexdigest()[:8]


def quick_check(secret: str, stored_hash: str) -> bool | None:
    """Whether ``secret`` passes the stored hash's quick check; None when the hash has none."""
    if not stored_hash.startswith(QUICK):
        return None
    return hmac.compare_digest(stored_hash[len(QUICK) : len(QUICK) + 8], _quick(secret))


def split_token(token: str, prefix: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed token, else None."""
    head, _, rest = token.partition("_")
    hexid, _, secret = rest.partition("_")
    if head != prefix or len(hexid) != 16 or not _SECRET.fullmatch(secret):
        return None  # the secret's alphabet and length keep it under bcrypt's 72 bytes
    if any(c not in "0123456789abcdef" for c in hexid):
        return None
    return hexid, secret


_SECRET = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what secrets.token_urlsafe makes, ASCII only


def check_secret(secret: str, stored_hash: str) -> bool:
    quick = quick_check(secret, stored_hash)
    if quick is False:
        return False
    digest = stored_hash[len(QUICK) + 9 :] if quick else stored_hash  # bcrypt's own "$2b$..."
    return bcrypt.checkpw(secret.encode(), digest.encode())


def fingerprint(token: str) -> str:
    """A cache key for a token that does not reveal it (any text: undecodable header bytes included)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
