"""API keys: only a hash is stored, and a key authenticates only while it is neither revoked nor expired."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from farm.api_keys import (
    KEY_PREFIX,
    VISIBLE_CHARS,
    KeyPolicy,
    KeyPrincipal,
    api_key_authenticate,
    api_key_authenticate_sync,
    api_key_check_request,
    api_key_create,
    api_key_find,
    api_key_revoke,
)
from farm.db import run_db
from farm.errors import InvalidRequest, PermissionDenied
from farm.models import ApiKey, Job
from settings import env


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
@pytest.mark.parametrize(
    ("expires_in", "valid"),
    [
        (timedelta(minutes=-1), False),
        (timedelta(seconds=-0.5), False),
        (timedelta(minutes=5), True),
        (None, True),
    ],
)
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


# --- policy ---------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_principal_carries_the_keys_policy(owner) -> None:
    _, raw = api_key_create(
        owner=owner,
        allowed_models=["a", "b"],
        max_tokens_cap=64,
        rpm_limit=10,
        tpm_limit=1000,
        token_quota=50_000,
        quota_period="month",
        on_limit="wait",
    )
    principal = api_key_authenticate_sync(raw)
    assert principal is not None
    assert principal.policy == KeyPolicy(
        allowed_models=frozenset({"a", "b"}),
        max_tokens_cap=64,
        rpm_limit=10,
        tpm_limit=1000,
        token_quota=50_000,
        quota_period="month",
        on_limit="wait",
    )
    assert principal.policy.limited and principal.policy.allows_model("a") and not principal.policy.allows_model("c")
    unlimited = api_key_authenticate_sync(api_key_create(owner=owner)[1])
    assert unlimited is not None and not unlimited.policy.limited and unlimited.policy.allows_model("anything")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "policy",
    [
        {"allowed_models": "tiny"},
        {"allowed_models": [""]},
        {"rpm_limit": -1},
        {"quota_period": "week"},
        {"on_limit": "queue"},
    ],
)
def test_an_invalid_policy_is_refused(owner, policy: dict) -> None:
    with pytest.raises(ValidationError):
        api_key_create(owner=owner, **policy)
    assert not ApiKey.objects.filter(owner=owner).exists()


def test_allow_list_and_max_tokens_cap_decisions() -> None:
    policy = KeyPolicy(allowed_models=frozenset({"tiny"}), max_tokens_cap=10)
    with pytest.raises(PermissionDenied) as denied:
        api_key_check_request(policy=policy, model="big", request={"max_tokens": 1}, max_tokens_param="max_tokens")
    assert (denied.value.status, denied.value.type, denied.value.param) == (403, "permission_error", "model")
    with pytest.raises(InvalidRequest) as over:
        api_key_check_request(policy=policy, model="tiny", request={"max_tokens": 11}, max_tokens_param="max_tokens")
    assert over.value.status == 400 and over.value.param == "max_tokens" and "10" in over.value.message
    request = {"messages": [], "max_tokens": 10}
    assert api_key_check_request(policy=policy, model="tiny", request=request, max_tokens_param="max_tokens") == request
    # Not set by the client (None, or a family default such as completions' 16): lowered to the cap.
    assert api_key_check_request(policy=policy, model="tiny", request={"max_tokens": None}, max_tokens_param=None) == {
        "max_tokens": 10
    }
    assert api_key_check_request(policy=policy, model="tiny", request={"max_tokens": 16}, max_tokens_param=None) == {
        "max_tokens": 10
    }
    assert api_key_check_request(
        policy=KeyPolicy(), model="any", request={"max_tokens": 10**6}, max_tokens_param="max_tokens"
    ) == {"max_tokens": 10**6}


def test_revocation_elsewhere_takes_effect_within_the_cache_lifetime(committed_user, monkeypatch) -> None:
    """Another process revokes (or re-limits) a key: this API process notices when its cache entry expires."""
    monkeypatch.setattr(env, "FARM_KEY_CACHE_S", 0.5)
    key, raw = api_key_create(owner=committed_user, rpm_limit=5)

    async def check() -> None:
        first = await api_key_authenticate(raw)
        assert first is not None and first.policy.rpm_limit == 5
        # Written as another process would: no cache of this process is cleared.
        await run_db(lambda: ApiKey.objects.filter(pk=key.pk).update(rpm_limit=50))
        assert (await api_key_authenticate(raw)) == first  # still cached
        await asyncio.sleep(0.6)
        changed = await api_key_authenticate(raw)
        assert changed is not None and changed.policy.rpm_limit == 50
        await run_db(lambda: ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now()))
        assert await api_key_authenticate(raw) == changed  # within the cache lifetime
        await asyncio.sleep(0.6)
        assert await api_key_authenticate(raw) is None

    asyncio.run(check())


# --- management commands ----------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_createapikey_with_a_policy_listapikeys_and_revokeapikey_by_user() -> None:
    out = StringIO()
    call_command(
        "createapikey",
        "--user",
        "cmd-user",
        "--name",
        "ci",
        "--models",
        "tiny, big",
        "--max-tokens",
        "64",
        "--rpm",
        "10",
        "--tpm",
        "1000",
        "--quota",
        "5000",
        "--period",
        "month",
        "--on-limit",
        "wait",
        "--expires-in-days",
        "1",
        stdout=out,
    )
    raw = out.getvalue().strip()
    key = api_key_find(raw)
    assert key is not None and key.owner.username == "cmd-user"
    assert (
        key.allowed_models,
        key.max_tokens_cap,
        key.rpm_limit,
        key.tpm_limit,
        key.token_quota,
        key.quota_period,
        key.on_limit,
    ) == (["tiny", "big"], 64, 10, 1000, 5000, "month", "wait")
    assert key.expires_at is not None and key.expires_at > timezone.now()
    call_command("createapikey", "--user", "cmd-user", stdout=StringIO())
    listing = StringIO()
    call_command("listapikeys", "--user", "cmd-user", stdout=listing)
    lines = listing.getvalue().splitlines()
    assert len(lines) == 2 and raw not in listing.getvalue()
    assert lines[0].startswith(key.prefix) and "active" in lines[0]
    assert lines[0].endswith("models=tiny,big max_tokens=64 rpm=10 tpm=1000 quota=5000/month on_limit=wait")
    assert lines[1].endswith("\t-")
    revoked = StringIO()
    call_command("revokeapikey", "--user", "cmd-user", stdout=revoked)
    assert len(revoked.getvalue().splitlines()) == 2
    assert not ApiKey.objects.filter(owner__username="cmd-user", revoked_at__isnull=True).exists()
    with pytest.raises(CommandError):
        call_command("createapikey", "--user", "cmd-user", "--rpm", "0", stderr=StringIO())


# --- IDOR: another key's job does not exist for it ------------------------------------------------------------------


@pytest.mark.django_db
def test_another_owners_job_is_404_to_get_and_cancel_and_absent_from_the_list(owner, django_user_model) -> None:
    from farm.catalog import model_upsert, spec_upsert
    from farm.jobs import job_create

    model = model_upsert(name="idor-model")
    spec = spec_upsert(model=model, name="idor-spec", engine="vllm-cpu")
    mine, mine_raw = api_key_create(owner=owner)
    _, theirs_raw = api_key_create(owner=django_user_model.objects.create(username="idor-other"))
    job = job_create(
        owner_id=owner.pk,
        api_key_id=mine.pk,
        kind="chat.completion",
        model_id=model.pk,
        spec_id=spec.pk,
        request={},
        deadline_at=timezone.now() + timedelta(minutes=1),
    )
    theirs = Client(headers={"Authorization": f"Bearer {theirs_raw}"})
    for response in (theirs.get(f"/v1/jobs/{job.pk}"), theirs.post(f"/v1/jobs/{job.pk}/cancel")):
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert theirs.get("/v1/jobs").json()["data"] == []
    mine_client = Client(headers={"Authorization": f"Bearer {mine_raw}"})
    assert mine_client.get(f"/v1/jobs/{job.pk}").json()["id"] == str(job.pk)
    assert Job.objects.get(pk=job.pk).status == "queued"  # the foreign cancel changed nothing
