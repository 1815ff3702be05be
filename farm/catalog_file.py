"""The models file (`manage.py loadmodels`): validation with errors that name the offending entry, and the
model-level defaults each spec inherits unless it sets the field itself.

    models:
      - name: llama-3.1-8b              # what clients ask for
        source: llama-3.1-8b            # defaults for every spec below ...
        engine_args: {max_model_len: 8192}
        engine: vllm
        weight: 100
        specs:
          - name: llama-8b-a100
            resource_profile: gpu:A100-80GB x1
          - name: llama-8b-l4
            resource_profile: gpu:L4 x2
            engine_args: {tensor_parallel_size: 2}   # merged over the model's
          - name: llama-8b-cpu                        # warm standby: answers only when no GPU spec is up
            engine: vllm-cpu
            resource_profile: cpu:16
            source: llama-3.1-8b-q4.gguf
            weight: 0
            min_replicas: 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from farm import queues

ENGINES = ("vllm", "vllm-cpu")
MODEL_FIELDS = {
    "name",
    "source",
    "engine_args",
    "owned_by",
    "specs",
    "engine",
    "resource_profile",
    "min_replicas",
    "weight",
}
SPEC_FIELDS = {"name", "source", "engine_args", "engine", "resource_profile", "min_replicas", "weight"}
# Defaults a model passes to its specs (engine_args are merged per key when a worker loads the spec instead).
INHERITED = ("engine", "resource_profile", "min_replicas", "weight")
DEFAULTS: dict[str, Any] = {"engine": "vllm", "resource_profile": "cpu", "min_replicas": 0, "weight": 100}
_PROFILE_RE = re.compile(r"^(cpu(:\d+)?|gpu:[A-Za-z0-9._-]+( x\d+)?)$")


class CatalogFileError(ValueError):
    """A models file that cannot be loaded; the message names the entry and the field."""


@dataclass(frozen=True)
class SpecDeclaration:
    name: str
    engine: str
    source: str
    engine_args: dict[str, Any]
    resource_profile: str
    min_replicas: int
    weight: int


@dataclass(frozen=True)
class ModelDeclaration:
    name: str
    source: str
    engine_args: dict[str, Any]
    owned_by: str
    specs: list[SpecDeclaration] = field(default_factory=list)


def _check(entry: Any, where: str, allowed: set[str]) -> tuple[dict[str, Any], str]:
    """The entry, and where it is in the file with its name (`models[2] (llama-3.1-8b)`)."""
    if not isinstance(entry, dict):
        raise CatalogFileError(f"{where}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogFileError(f"{where}: `name` is required (a non-empty string)")
    where = f"{where} ({name})"
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise CatalogFileError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
    return entry, where


def _field(entry: dict[str, Any], key: str, where: str, defaults: dict[str, Any]) -> Any:
    value = entry.get(key, defaults.get(key))
    if key == "engine" and value not in ENGINES:
        raise CatalogFileError(f"{where}: engine {value!r} is not one of {', '.join(ENGINES)}")
    if key in ("min_replicas", "weight") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise CatalogFileError(f"{where}: {key} must be a whole number >= 0, not {value!r}")
    if key == "resource_profile" and (not isinstance(value, str) or not _PROFILE_RE.match(value)):
        raise CatalogFileError(
            f"{where}: resource_profile {value!r} must look like `cpu`, `cpu:8`, `gpu:A100-80GB` or `gpu:L4 x2`"
        )
    if key == "engine_args" and value is not None and not isinstance(value, dict):
        raise CatalogFileError(f"{where}: engine_args must be a mapping of vLLM engine arguments")
    if key in ("source", "owned_by") and value is not None and not isinstance(value, str):
        raise CatalogFileError(f"{where}: {key} must be a string")
    return value


def catalog_file_parse(data: Any) -> list[ModelDeclaration]:
    """Validates a parsed models file and applies the model-level defaults; raises `CatalogFileError`."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise CatalogFileError("the file must have a non-empty `models:` list")
    declared: list[ModelDeclaration] = []
    spec_names: dict[str, str] = {}
    model_names: set[str] = set()
    for position, raw in enumerate(data["models"]):
        entry, where = _check(raw, f"models[{position}]", MODEL_FIELDS)
        if entry["name"] in model_names:
            raise CatalogFileError(f"{where}: model {entry['name']!r} is declared twice")
        model_names.add(entry["name"])
        defaults = {**DEFAULTS, **{key: _field(entry, key, where, DEFAULTS) for key in INHERITED}}
        model = ModelDeclaration(
            name=entry["name"],
            source=_field(entry, "source", where, {"source": ""}),
            engine_args=_field(entry, "engine_args", where, {}) or {},
            owned_by=_field(entry, "owned_by", where, {"owned_by": "farm"}),
        )
        specs = entry.get("specs") or []
        if not isinstance(specs, list):
            raise CatalogFileError(f"{where}: `specs` must be a list")
        for index, raw_spec in enumerate(specs):
            spec, spec_where = _check(raw_spec, f"{where}.specs[{index}]", SPEC_FIELDS)
            if not queues.is_valid_name(spec["name"]):
                raise CatalogFileError(
                    f"{spec_where}: a spec name becomes a queue name: lowercase letters, digits, '.', '_' or '-'"
                )
            if spec["name"] in spec_names:
                raise CatalogFileError(f"{spec_where}: spec name already used by model {spec_names[spec['name']]!r}")
            spec_names[spec["name"]] = model.name
            source = _field(spec, "source", spec_where, {"source": ""})
            if not (source or model.source):
                raise CatalogFileError(f"{spec_where}: no `source`, on the spec or on its model")
            model.specs.append(
                SpecDeclaration(
                    name=spec["name"],
                    source=source,
                    engine_args=_field(spec, "engine_args", spec_where, {}) or {},
                    **{key: _field(spec, key, spec_where, defaults) for key in INHERITED},
                )
            )
        declared.append(model)
    return declared
