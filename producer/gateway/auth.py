"""Bearer tokens of the REST API: which configured token a request carries. Pure.

Only each token's SHA-256 is configured. A presented token is hashed and compared with every
configured hash in constant time, without an early exit, so the time taken says nothing
about which token (or how much of one) matched. Tokens are long random strings, so a plain
SHA-256 is enough: there is nothing to guess a password from.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from producer.gateway.settings import TokenSettings
from producer.policy import RequestPolicy, SourcePolicy


def hash_token(token: str) -> str:
    """The SHA-256 (hex) that `[[gateway.tokens]]` holds for `token`."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Tokens:
    def __init__(self, tokens: Sequence[TokenSettings]) -> None:
        self._digests = [(bytes.fromhex(t.sha256), t) for t in tokens]

    def verify(self, authorization: str) -> TokenSettings | None:
        """The token an `Authorization: Bearer ...` header carries, or None."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: TokenSettings | None = None
        for digest, settings in self._digests:  # every one is compared: no early exit
            if hmac.compare_digest(digest, given):
                found = settings
        return found


def request_policy(
    token: TokenSettings,
    sources: SourcePolicy,
    git_hosts: frozenset[str],
    max_timeout_s: float,
) -> RequestPolicy:
    """What `token` may ask for: its own scope inside the gateway's source policy."""
    return RequestPolicy(
        schemes=frozenset(sources.schemes),
        hosts=git_hosts,
        local_roots=sources.local_roots,
        images=token.images,
        sources=token.sources,
        priorities=frozenset(token.priorities),
        max_timeout_s=max_timeout_s,
        tenant=token.tenant_name,
        secrets=token.secrets,
    )
