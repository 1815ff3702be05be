"""Models and their specs: lookup for the API (cached), upserts for commands, and the catalogue workers read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from farm import queues, redis_keys
from farm.db import run_db
from farm.models import Model, ModelSpec
from farm.redis_client import sync_redis

_CACHE_S = 5.0


@dataclass(frozen=True)
class SpecEntry:
    id: int
    name: str
    engine: str
    weight: int
    min_replicas: int


@dataclass(frozen=True)
class ModelEntry:
    id: int
    name: str
    owned_by: str
    created: int
    specs: tuple[SpecEntry, ...]


_models: tuple[float, dict[str, ModelEntry]] = (0.0, {})


def _load_models() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for model in Model.objects.filter(enabled=True).prefetch_related("specs"):
        specs = tuple(
            SpecEntry(id=s.pk, name=s.name, engine=s.engine, weight=s.weight, min_replicas=s.min_replicas)
            for s in model.specs.all() if s.enabled
        )
        entries[model.name] = ModelEntry(
            id=model.pk, name=model.name, owned_by=model.owned_by, created=int(model.created_at.timestamp()),
            specs=specs,
        )
    return entries


async def model_catalog() -> dict[str, ModelEntry]:
    """Enabled models by public name; refreshed every few seconds per process."""
    global _models
    expires, entries = _models
    if expires < time.monotonic():
        entries = await run_db(_load_models)
        _models = (time.monotonic() + _CACHE_S, entries)
    return entries


def catalog_invalidate() -> None:
    global _models
    _models = (0.0, {})


def spec_definition(spec: ModelSpec) -> dict[str, Any]:
    """A spec with the model's defaults applied: what a worker needs to load it."""
    args = {**(spec.model.engine_args or {}), **(spec.engine_args or {})}
    return {
        "name": spec.name, "model": spec.model.name, "engine": spec.engine,
        "source": spec.source or spec.model.source, "engine_args": args,
        "resource_profile": spec.resource_profile, "queue": queues.infer_queue(spec.name),
    }


def spec_catalog_publish() -> int:
    """Writes every enabled spec to Redis for workers (they hold no database credentials). Returns the count."""
    specs = ModelSpec.objects.select_related("model").filter(enabled=True, model__enabled=True)
    mapping = {spec.name: orjson.dumps(spec_definition(spec)) for spec in specs}
    client = sync_redis()
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(redis_keys.SPEC_CATALOG)
        if mapping:
            pipe.hset(redis_keys.SPEC_CATALOG, mapping=mapping)
        pipe.execute()
    catalog_invalidate()
    return len(mapping)


def model_upsert(*, name: str, source: str = "", engine_args: dict[str, Any] | None = None,
                 owned_by: str = "farm") -> Model:
    model, _ = Model.objects.update_or_create(
        name=name, defaults={"source": source, "engine_args": engine_args or {}, "owned_by": owned_by},
    )
    return model


def spec_upsert(*, model: Model, name: str, engine: str, source: str = "", engine_args: dict[str, Any] | None = None,
                resource_profile: str = "cpu", min_replicas: int = 0, weight: int = 100) -> ModelSpec:
    if not queues.is_valid_name(name):
        raise ValueError(f"spec name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
    spec, _ = ModelSpec.objects.update_or_create(
        name=name,
        defaults={"model": model, "engine": engine, "source": source, "engine_args": engine_args or {},
                  "resource_profile": resource_profile, "min_replicas": min_replicas, "weight": weight},
    )
    return spec


def catalog_load(data: dict[str, Any]) -> list[ModelSpec]:
    """Upserts models and specs from a parsed YAML document (`models: [{name, source, specs: [...]}]`)."""
    from django.db import transaction

    specs: list[ModelSpec] = []
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("the file must have a non-empty `models:` list")
    with transaction.atomic():
        for entry in models:
            model = model_upsert(name=entry["name"], source=entry.get("source", ""),
                                 engine_args=entry.get("engine_args"), owned_by=entry.get("owned_by", "farm"))
            for spec in entry.get("specs") or []:
                specs.append(spec_upsert(
                    model=model, name=spec["name"], engine=spec.get("engine", "vllm"), source=spec.get("source", ""),
                    engine_args=spec.get("engine_args"), resource_profile=spec.get("resource_profile", "cpu"),
                    min_replicas=spec.get("min_replicas", 0), weight=spec.get("weight", 100),
                ))
    return specs
