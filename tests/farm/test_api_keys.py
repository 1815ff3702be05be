"""API keys: only a hash is stored, and a key authenticates only while it is neither revoked nor expired."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from farm.api_keys import (
    KEY_PREFIX,
    VISIBLE_CHARS,
    KeyPrincipal,
    api_key_authenticate,
    api_key_authenticate_sync,
    api_key_create,
    api_key_find,
    api_key_revoke,
)
from farm.db import run_db
from farm.models import ApiKey


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create(username="key-owner")


def principal_of(key: ApiKey) -> KeyPrincipal:
    return KeyPrincipal(key_id=key.pk, owner_id=key.owner_id, prefix=key.prefix)


@pytest.mark.django_db
def test_only_a_hash_of_the_key_is_stored(owner) -> None:
    key, raw = api_key_create(owner=owner, name="ci")
    assert raw.startswith(KEY_PREFIX) and len(raw) > 40
    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert row["prefix"] == raw[:VISIBLE_CHARS]
    assert row["secret_hash"] == hashlib.sha256(raw.encode()).hexdigest()
    assert row["name"] == "ci"
    assert not [column for column, value in row.items() if raw in str(value)]
    assert raw[VISIBLE_CHARS:] not in str(row)


@pytest.mark.django_db
def test_every_key_is_different(owner) -> None:
    raws = {api_key_create(owner=owner)[1] for _ in range(20)}
    assert len(raws) == 20


@pytest.mark.django_db
def test_authenticate(owner) -> None:
    key, raw = api_key_create(owner=owner)
    assert api_key_authenticate_sync(raw) == principal_of(key)
    assert api_key_authenticate_sync(raw + "x") is None
    assert api_key_authenticate_sync(raw[:-1]) is None
    assert api_key_authenticate_sync(KEY_PREFIX + "not-a-key") is None
    assert api_key_authenticate_sync("") is None


@pytest.mark.django_db
def test_revoked_key_no_longer_authenticates(owner) -> None:
    key, raw = api_key_create(owner=owner)
    other, other_raw = api_key_create(owner=owner)
    api_key_revoke(key=key)
    revoked_at = ApiKey.objects.get(pk=key.pk).revoked_at
    assert revoked_at is not None
    assert api_key_authenticate_sync(raw) is None
    assert api_key_authenticate_sync(other_raw) == principal_of(other)
    api_key_revoke(key=key)
    assert ApiKey.objects.get(pk=key.pk).revoked_at == revoked_at


@pytest.mark.django_db
@pytest.mark.parametrize(("expires_in", "valid"), [
    (timedelta(minutes=-1), False), (timedelta(seconds=-0.5), False), (timedelta(minutes=5), True), (None, True),
])
def test_expiry(owner, expires_in: timedelta | None, valid: bool) -> None:
    expires_at = timezone.now() + expires_in if expires_in is not None else None
    key, raw = api_key_create(owner=owner, expires_at=expires_at)
    assert api_key_authenticate_sync(raw) == (principal_of(key) if valid else None)


@pytest.mark.django_db
def test_custom_raw_key_for_bootstrap(owner) -> None:
    raw = "bootstrap-key-for-scripts-0123456789"
    key, returned = api_key_create(owner=owner, raw_key=raw)
    assert returned == raw
    assert key.prefix == raw[:VISIBLE_CHARS]
    assert api_key_authenticate_sync(raw) == principal_of(key)
    assert api_key_find(raw) == key


@pytest.mark.django_db
def test_find_returns_the_row_whatever_its_state(owner) -> None:
    key, raw = api_key_create(owner=owner, expires_at=timezone.now() - timedelta(days=1))
    api_key_revoke(key=key)
    assert api_key_find(raw) == key
    assert api_key_find(raw + "x") is None
    assert api_key_find("farm-unknown") is None


def test_async_authenticate_reads_the_database_from_the_pool(committed_user) -> None:
    """The API's path: `run_db` threads, a per-process cache, and revocation that clears it."""
    key, raw = api_key_create(owner=committed_user)
    _, expired_raw = api_key_create(owner=committed_user, expires_at=timezone.now() - timedelta(seconds=1))

    async def check() -> None:
        assert await api_key_authenticate(raw) == principal_of(key)
        assert await api_key_authenticate(raw) == principal_of(key)  # cached
        assert await api_key_authenticate(raw + "x") is None
        assert await api_key_authenticate(expired_raw) is None
        await run_db(api_key_revoke, key=key)
        assert await api_key_authenticate(raw) is None

    asyncio.run(check())
