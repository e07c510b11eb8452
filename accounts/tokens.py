"""Bearer tokens shared by API tokens and agent tokens.

A token is ``<prefix>_<key_id>_<secret>``. The key id is public and indexed for the lookup; only
a SHA-256 of the secret is stored, and it is compared in constant time. SHA-256 (not a slow
password hash) is right here because the secret is 32 random bytes, not a human password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class NewToken:
    token: str
    key_id: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate(prefix: str) -> NewToken:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewToken(f"{prefix}_{key_id}_{secret}", key_id, hash_secret(secret))


def split(token: str, prefix: str) -> tuple[str, str] | None:
    """Return ``(key_id, secret)`` for a well-formed token of this prefix, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != prefix or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def bearer(authorization_header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization_header:
        return None
    scheme, _, value = authorization_header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
