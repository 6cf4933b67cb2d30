"""Tokens and roles: who is asking, and what they may do with a library.

Tokens are random strings handed out once; the store keeps only their
sha256, so a leaked database does not leak credentials. A library the user
has no role on is reported exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import secrets

WRITE_ROLES = frozenset({"write", "owner"})


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def can_write(role: str) -> bool:
    return role in WRITE_ROLES
