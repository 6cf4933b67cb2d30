"""Tokens and roles: who is asking, and what they may do with a library.

Tokens are random strings handed out once; the store keeps only their
sha256, so a leaked database does not leak credentials. A library the user
has no role on is reported exactly like one that does not exist.

Why a plain sha256 and a lookup by it, not a salted slow hash and
`hmac.compare_digest`: a token is 256 random bits, not a password, so there
is no dictionary to slow down, and the hash is the index the user is found
by. A lookup by hash leaks nothing usable through timing: the SQLite index
and the app's cache compare the *hash* of the presented token, and learning
how many leading characters of some stored hash a guess's hash matched does
not help to find a token (that would be a sha256 preimage). No raw token is
ever compared or kept in memory past the request (the app caches users by
token hash). Nothing here compares two secrets directly; code that must
(a shared secret in a header, say) uses `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import secrets

WRITE_ROLES = frozenset({"write", "owner"})


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The form a token is stored and looked up in: sha256 hex of its UTF-8 bytes."""
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
