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
from farm.single_flight import SingleFlight

_CACHE_S = 5.0


@dataclass(frozen=True)
class SpecEntry:
    id: int
    name: str
    engine: str
    weight: int
    min_replicas: int


@dataclass(frozen=True)
class AdapterEntry:
    """A fine-tuned model's LoRA adapter: vLLM's adapter id (the model's pk) and the file holding it."""

    lora_id: int
    file_id: str


@dataclass(frozen=True)
class ModelEntry:
    id: int
    name: str
    owned_by: str
    created: int
    specs: tuple[SpecEntry, ...]
    adapter: AdapterEntry | None = None  # set for `<base>:ft-<id>`: served by the base's specs with this adapter
    owner_id: int | None = None  # a private (fine-tuned) model: only this user's keys see it

    def visible_to(self, owner_id: int | None) -> bool:
        return self.owner_id is None or self.owner_id == owner_id


_models: tuple[float, dict[str, ModelEntry]] = (0.0, {})


def _load_models() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for model in Model.objects.filter(enabled=True).select_related("base").prefetch_related("specs", "base__specs"):
        serving = model.base if model.base_id is not None else model  # a fine-tuned model runs on its base's specs
        specs = tuple(
            SpecEntry(id=s.pk, name=s.name, engine=s.engine, weight=s.weight, min_replicas=s.min_replicas)
            for s in serving.specs.all()
            if s.enabled
        )
        adapter = AdapterEntry(lora_id=model.pk, file_id=model.adapter_file_id) if model.adapter_file_id else None
        entries[model.name] = ModelEntry(
            id=model.pk,
            name=model.name,
            owned_by=model.owned_by,
            created=int(model.created_at.timestamp()),
            specs=specs,
            adapter=adapter,
            owner_id=model.owner_id,
        )
    return entries


_loads = SingleFlight()


async def model_catalog() -> dict[str, ModelEntry]:
    """Enabled models by public name; refreshed every few seconds per process, one load at a time."""
    expires, entries = _models
    if expires < time.monotonic():
        entries = await _loads.run(None, lambda: run_db(_load_models), store=_keep)
    return entries


def _keep(entries: dict[str, ModelEntry]) -> None:
    global _models
    _models = (time.monotonic() + _CACHE_S, entries)


def catalog_invalidate() -> None:
    global _models
    _models = (0.0, {})
    _loads.forget()  # a load begun before the change does not become the cache


def spec_definition(spec: ModelSpec) -> dict[str, Any]:
    """A spec with the model's defaults applied: what a worker needs to load it."""
    args = {**(spec.model.engine_args or {}), **(spec.engine_args or {})}
    return {
        "name": spec.name,
        "model": spec.model.name,
        "engine": spec.engine,
        "source": spec.source or spec.model.source,
        "engine_args": args,
        "resource_profile": spec.resource_profile,
        "queue": queues.infer_queue(spec.name),
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


def model_upsert(
    *, name: str, source: str = "", engine_args: dict[str, Any] | None = None, owned_by: str = "farm"
) -> Model:
    model, _ = Model.objects.update_or_create(
        name=name,
        defaults={"source": source, "engine_args": engine_args or {}, "owned_by": owned_by},
    )
    return model


def spec_upsert(
    *,
    model: Model,
    name: str,
    engine: str,
    source: str = "",
    engine_args: dict[str, Any] | None = None,
    resource_profile: str = "cpu",
    min_replicas: int = 0,
    weight: int = 100,
) -> ModelSpec:
    if not queues.is_valid_name(name):
        raise ValueError(f"spec name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
    spec, _ = ModelSpec.objects.update_or_create(
        name=name,
        defaults={
            "model": model,
            "engine": engine,
            "source": source,
            "engine_args": engine_args or {},
            "resource_profile": resource_profile,
            "min_replicas": min_replicas,
            "weight": weight,
        },
    )
    return spec


def catalog_load(data: dict[str, Any]) -> list[ModelSpec]:
    """Upserts models and specs from a parsed models file (`farm.catalog_file`: validated, model-level defaults
    applied to each spec); raises `CatalogFileError` (a ValueError) naming the bad entry."""
    from django.db import transaction

    from farm.catalog_file import catalog_file_parse

    specs: list[ModelSpec] = []
    with transaction.atomic():
        for declared in catalog_file_parse(data):
            model = model_upsert(
                name=declared.name, source=declared.source, engine_args=declared.engine_args, owned_by=declared.owned_by
            )
            for spec in declared.specs:
                specs.append(
                    spec_upsert(
                        model=model,
                        name=spec.name,
                        engine=spec.engine,
                        source=spec.source,
                        engine_args=spec.engine_args,
                        resource_profile=spec.resource_profile,
                        min_replicas=spec.min_replicas,
                        weight=spec.weight,
                    )
                )
    return specs
