"""API key lifecycle and authentication. Only a SHA-256 hash of a key is stored; keys are shown once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.utils import timezone

from farm.db import run_db
from farm.errors import InvalidRequest, PermissionDenied
from farm.models import ApiKey, OnLimit, QuotaPeriod
from farm.single_flight import SingleFlight
from settings import env

KEY_PREFIX = "farm-"
VISIBLE_CHARS = 12


@dataclass(frozen=True)
class KeyPolicy:
    """What a key may do, cached with its principal so the hot path reads no row. None = no limit."""

    allowed_models: frozenset[str] = frozenset()  # empty: every model
    max_tokens_cap: int | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    token_quota: int | None = None
    quota_period: str = QuotaPeriod.DAY
    on_limit: str = OnLimit.REJECT

    def allows_model(self, name: str) -> bool:
        return not self.allowed_models or name in self.allowed_models

    @property
    def limited(self) -> bool:
        return self.rpm_limit is not None or self.tpm_limit is not None or self.token_quota is not None


UNLIMITED = KeyPolicy()


@dataclass(frozen=True)
class KeyPrincipal:
    """Who a request acts for, as cached by the API (no ORM object on the hot path)."""

    key_id: int
    owner_id: int
    prefix: str
    policy: KeyPolicy = UNLIMITED


def key_policy(key: ApiKey) -> KeyPolicy:
    models = key.allowed_models or ()
    return KeyPolicy(
        allowed_models=frozenset([models] if isinstance(models, str) else map(str, models)),
        max_tokens_cap=key.max_tokens_cap,
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        token_quota=key.token_quota,
        quota_period=key.quota_period,
        on_limit=key.on_limit,
    )


def _digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def _lookup_id(digest: str) -> str:
    return digest[:16]


POLICY_FIELDS = (
    "allowed_models",
    "max_tokens_cap",
    "rpm_limit",
    "tpm_limit",
    "token_quota",
    "quota_period",
    "on_limit",
)


def _check_policy(policy: dict[str, Any]) -> None:
    unknown = set(policy) - set(POLICY_FIELDS)
    if unknown:
        raise TypeError(f"unknown key policy field(s): {', '.join(sorted(unknown))}")
    models = policy.get("allowed_models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
        raise ValidationError({"allowed_models": "a list of model names"})


def api_key_create(
    *,
    owner: AbstractBaseUser,
    name: str = "",
    expires_at: datetime | None = None,
    raw_key: str | None = None,
    **policy: Any,
) -> tuple[ApiKey, str]:
    """Creates a key and returns it with its full secret (the only time the secret exists in clear). `policy`:
    any of POLICY_FIELDS (allowed models, max_tokens cap, RPM/TPM limits, token quota and period, on_limit)."""
    _check_policy(policy)
    raw = raw_key or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = _digest(raw)
    key = ApiKey(
        owner=owner,
        name=name,
        lookup_id=_lookup_id(digest),
        prefix=raw[:VISIBLE_CHARS],
        secret_hash=digest,
        expires_at=expires_at,
        **policy,
    )
    key.full_clean(exclude=["owner", "lookup_id", "secret_hash"], validate_unique=False)
    key.save()
    return key, raw


def api_key_set_policy(*, key: ApiKey, **policy: Any) -> ApiKey:
    """Changes a key's policy; API processes apply it within FARM_KEY_CACHE_S (this process at once)."""
    _check_policy(policy)
    for field, value in policy.items():
        setattr(key, field, value)
    key.full_clean(exclude=["owner", "lookup_id", "secret_hash"], validate_unique=False)
    key.save(update_fields=list(policy))
    _cache_clear()
    return key


def api_key_find(raw_key: str) -> ApiKey | None:
    """The key row for a full key, whatever its state (for idempotent bootstrap and revocation by value)."""
    digest = _digest(raw_key)
    key = ApiKey.objects.filter(lookup_id=_lookup_id(digest)).first()
    return key if key is not None and hmac.compare_digest(key.secret_hash, digest) else None


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    _cache_clear()


# In-process cache: raw-key digest -> (principal or None, expiry). Revocation takes effect within FARM_KEY_CACHE_S.
_cache: dict[str, tuple[KeyPrincipal | None, float]] = {}
_CACHE_MAX = 10_000
_lookups = SingleFlight()  # one database lookup at a time per key: its requests share it when its entry expires


def _cache_clear() -> None:
    _cache.clear()
    _lookups.forget()  # a lookup begun before the change does not enter the cache


def _principal_for(key: ApiKey | None, digest: str) -> KeyPrincipal | None:
    if key is None or not hmac.compare_digest(key.secret_hash, digest):
        return None
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= timezone.now()):
        return None
    return KeyPrincipal(key_id=key.pk, owner_id=key.owner_id, prefix=key.prefix, policy=key_policy(key))


async def api_key_authenticate(raw_key: str) -> KeyPrincipal | None:
    """The principal for a presented key, or None (unknown, revoked, expired). Cached briefly per process."""
    digest = _digest(raw_key)
    hit = _cache.get(digest)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return await _lookups.run(
        digest, lambda: run_db(api_key_authenticate_sync, raw_key), store=lambda found: _remember(digest, found)
    )


def _remember(digest: str, principal: KeyPrincipal | None) -> None:
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[digest] = (principal, time.monotonic() + env.FARM_KEY_CACHE_S)


def api_key_authenticate_sync(raw_key: str) -> KeyPrincipal | None:
    """Uncached synchronous variant for DRF resource views."""
    return _principal_for(api_key_find(raw_key), _digest(raw_key))


def api_key_check_request(
    *, policy: KeyPolicy, model: str, request: dict[str, Any], max_tokens_param: str | None
) -> dict[str, Any]:
    """The job request as this key may send it: 403 for a model outside its allow-list, 400 for an explicit
    `max_tokens` over its cap (`max_tokens_param`: the field the client set, None when it set none, in which case the
    default is lowered to the cap). Pure: reads only the cached policy."""
    if not policy.allows_model(model):
        raise PermissionDenied(
            f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed"
        )
    cap = policy.max_tokens_cap
    if cap is None:
        return request
    asked = request.get("max_tokens")
    if max_tokens_param is not None and asked is not None and asked > cap:
        raise InvalidRequest(
            f"{max_tokens_param} is {asked}, over this API key's limit of {cap} tokens; "
            f"send {max_tokens_param} <= {cap}.",
            param=max_tokens_param,
            code="max_tokens_over_limit",
        )
    return {**request, "max_tokens": min(asked or cap, cap)}
