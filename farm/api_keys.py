"""API key lifecycle and authentication. Only a SHA-256 hash of a key is stored; keys are shown once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from farm.db import run_db
from farm.models import ApiKey
from settings import env

KEY_PREFIX = "farm-"
VISIBLE_CHARS = 12


@dataclass(frozen=True)
class KeyPrincipal:
    """Who a request acts for, as cached by the API (no ORM object on the hot path)."""

    key_id: int
    owner_id: int
    prefix: str


def _digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def _lookup_id(digest: str) -> str:
    return digest[:16]


def api_key_create(
    *, owner: AbstractBaseUser, name: str = "", expires_at: datetime | None = None, raw_key: str | None = None
) -> tuple[ApiKey, str]:
    """Creates a key and returns it with its full secret (the only time the secret exists in clear)."""
    raw = raw_key or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = _digest(raw)
    key = ApiKey.objects.create(
        owner=owner, name=name, lookup_id=_lookup_id(digest), prefix=raw[:VISIBLE_CHARS], secret_hash=digest,
        expires_at=expires_at,
    )
    return key, raw


def api_key_find(raw_key: str) -> ApiKey | None:
    """The key row for a full key, whatever its state (for idempotent bootstrap and revocation by value)."""
    digest = _digest(raw_key)
    key = ApiKey.objects.filter(lookup_id=_lookup_id(digest)).first()
    return key if key is not None and hmac.compare_digest(key.secret_hash, digest) else None


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    _cache.clear()


# In-process cache: raw-key digest -> (principal or None, expiry). Revocation takes effect within FARM_KEY_CACHE_S.
_cache: dict[str, tuple[KeyPrincipal | None, float]] = {}
_CACHE_MAX = 10_000


def _principal_for(key: ApiKey | None, digest: str) -> KeyPrincipal | None:
    if key is None or not hmac.compare_digest(key.secret_hash, digest):
        return None
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= timezone.now()):
        return None
    return KeyPrincipal(key_id=key.pk, owner_id=key.owner_id, prefix=key.prefix)


async def api_key_authenticate(raw_key: str) -> KeyPrincipal | None:
    """The principal for a presented key, or None (unknown, revoked, expired). Cached briefly per process."""
    digest = _digest(raw_key)
    now = time.monotonic()
    hit = _cache.get(digest)
    if hit is not None and hit[1] > now:
        return hit[0]
    principal = await run_db(api_key_authenticate_sync, raw_key)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[digest] = (principal, now + env.FARM_KEY_CACHE_S)
    return principal


def api_key_authenticate_sync(raw_key: str) -> KeyPrincipal | None:
    """Uncached synchronous variant for DRF resource views."""
    return _principal_for(api_key_find(raw_key), _digest(raw_key))
