"""The models file: model-level defaults each spec may override, and errors that name the bad entry."""

from __future__ import annotations

from typing import Any

import pytest

from farm.catalog_file import CatalogFileError, catalog_file_parse


def one_model(**fields: Any) -> dict[str, Any]:
    return {"models": [{"name": "m", "source": "m-weights", **fields}]}


def test_model_fields_are_defaults_that_specs_override() -> None:
    [model] = catalog_file_parse(
        one_model(
            engine="vllm",
            weight=70,
            resource_profile="gpu:A100-80GB",
            min_replicas=1,
            engine_args={"max_model_len": 8},
            specs=[
                {"name": "m-a100"},
                {"name": "m-l4", "resource_profile": "gpu:L4 x2", "engine_args": {"tensor_parallel_size": 2}},
                {"name": "m-cpu", "engine": "vllm-cpu", "resource_profile": "cpu:16", "weight": 0, "source": "m.gguf"},
            ],
        )
    )
    assert model.engine_args == {"max_model_len": 8}
    got = {
        s.name: (s.engine, s.source, s.resource_profile, s.min_replicas, s.weight, s.engine_args) for s in model.specs
    }
    assert got == {
        "m-a100": ("vllm", "", "gpu:A100-80GB", 1, 70, {}),
        "m-l4": ("vllm", "", "gpu:L4 x2", 1, 70, {"tensor_parallel_size": 2}),
        "m-cpu": ("vllm-cpu", "m.gguf", "cpu:16", 1, 0, {}),
    }


def test_farm_defaults_when_nothing_is_set() -> None:
    [model] = catalog_file_parse(one_model(specs=[{"name": "s"}]))
    [spec] = model.specs
    assert (spec.engine, spec.resource_profile, spec.min_replicas, spec.weight) == ("vllm", "cpu", 0, 100)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "non-empty `models:` list"),
        ({"models": []}, "non-empty `models:` list"),
        ({"models": ["x"]}, "models[0]: expected a mapping"),
        ({"models": [{"source": "x"}]}, "models[0]: `name` is required"),
        (one_model(wieght=3), "models[0] (m): unknown field(s) wieght"),
        (one_model(engine="tgi"), "models[0] (m): engine 'tgi' is not one of vllm, vllm-cpu"),
        (one_model(specs=[{"name": "s", "weight": -1}]), "models[0] (m).specs[0] (s): weight must be a whole number"),
        (one_model(specs=[{"name": "s", "min_replicas": "1"}]), "min_replicas must be a whole number"),
        (one_model(specs=[{"name": "s", "weight": True}]), "weight must be a whole number"),
        (one_model(specs=[{"name": "s", "resource_profile": "A100"}]), "resource_profile 'A100' must look like"),
        (one_model(specs=[{"name": "s", "engine_args": ["x"]}]), "engine_args must be a mapping"),
        (one_model(specs=[{"name": "Bad Name"}]), "specs[0] (Bad Name): a spec name becomes a queue name"),
        (one_model(specs=[{"name": "s"}, {"name": "s"}]), "specs[1] (s): spec name already used by model 'm'"),
        (one_model(specs={"name": "s"}), "`specs` must be a list"),
        ({"models": [{"name": "m", "specs": [{"name": "s"}]}]}, "specs[0] (s): no `source`"),
        (
            {"models": [{"name": "m", "source": "a"}, {"name": "m", "source": "b"}]},
            "models[1] (m): model 'm' is declared",
        ),
    ],
)
def test_errors_name_the_entry(data: Any, message: str) -> None:
    with pytest.raises(CatalogFileError) as raised:
        catalog_file_parse(data)
    assert message in str(raised.value)


@pytest.mark.django_db
def test_loadmodels_reports_the_error_and_loads_nothing(tmp_path) -> None:
    from django.core.management import CommandError, call_command

    from farm.models import Model

    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  - name: ok-model\n    source: w\n    specs: [{name: ok-spec}]\n"
        "  - name: bad-model\n    source: w\n    specs: [{name: bad-spec, engine: tgi}]\n"
    )
    with pytest.raises(CommandError, match=r"models\[1\] \(bad-model\)\.specs\[0\] \(bad-spec\): engine 'tgi'"):
        call_command("loadmodels", str(path), "--no-publish")
    assert not Model.objects.filter(name="ok-model").exists()  # validated before anything is written
