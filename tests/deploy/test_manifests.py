"""deploy/k8s against the queue table and the models file: every spec has a worker Deployment consuming its
`infer.<spec>` queue, and a KEDA ScaledObject scaling that Deployment on that queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from farm import queues
from farm.catalog_file import catalog_file_parse
from farm.placement import ResourceProfile

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_every_spec_has_a_deployment_and_a_scaled_object_on_its_queue() -> None:
    [model] = catalog_file_parse(yaml.safe_load((K8S / "models.yaml").read_text()))
    specs = {spec.name: spec for spec in model.specs}
    deployments = {d["metadata"]["name"]: d for d in documents("workers.yaml") if d["kind"] == "Deployment"}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in documents("keda.yaml") if s["kind"] == "ScaledObject"}

    serving = {}
    for name, deployment in deployments.items():
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "--spec":
            serving[args[1]] = name
    assert set(serving) == set(specs)  # no Deployment for a spec that does not exist, none missing

    for spec_name, deployment_name in serving.items():
        spec, deployment = specs[spec_name], deployments[deployment_name]
        pod = deployment["spec"]["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        profile = ResourceProfile.parse(spec.resource_profile)
        assert (profile.kind == "gpu") == ("nvidia.com/gpu" in limits), spec_name
        if profile.kind == "gpu":
            assert profile.gpu_model.split("-")[0] in pod["nodeSelector"]["nvidia.com/gpu.product"]
        scaled_object = scaled[deployment_name]
        redis_triggers = [t for t in scaled_object["spec"]["triggers"] if t["type"] == "redis"]
        assert [t["metadata"]["listName"] for t in redis_triggers] == [queues.infer_queue(spec_name)]
        assert scaled_object["spec"]["minReplicaCount"] == spec.min_replicas
        if spec.min_replicas == 0:  # no replica, no requests of its own: only the model's demand can wake it
            queries = [t["metadata"].get("query", "") for t in scaled_object["spec"]["triggers"]]
            assert any(f'farm_model_queue_depth{{model="{model.name}"}}' in query for query in queries), spec_name
        assert deployment["spec"]["replicas"] == spec.min_replicas
    assert set(scaled) == set(serving.values())
