"""deploy/ checked structurally (no Docker engine or cluster here): every YAML parses; compose runs the whole farm
(PostgreSQL, Redis with AOF and noeviction, migrations + models, API with several ASGI workers, one control worker
with beat, Flower, one GPU worker per GPU, a CPU worker, Prometheus, Grafana); commands agree with the queue table and
`python -m gpu_workers --help`; workers never get database credentials; the production variables the settings demand
are provided; every environment variable the code reads is in README's configuration table; every third-party import
is installed by the image that runs it. (`test_manifests.py` checks the Kubernetes specs against the models file.)"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm import queues
from farm.catalog_file import catalog_file_parse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
FIRST_PARTY = {"api", "farm", "settings", "tasks", "gpu_workers", "tests", "bench", "manage"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def k8s_documents() -> list[dict[str, Any]]:
    paths = [p for p in sorted((DEPLOY / "k8s").glob("*.yaml")) if p.name != "models.yaml"]  # a farm models file
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def dockerfile(service: dict[str, Any]) -> Path:
    return ROOT / service["build"]["dockerfile"]


def command_of(service: dict[str, Any]) -> list[str]:
    """The argv a compose service runs: its `command`, else its image's CMD (ENTRYPOINT prepended)."""
    command = service.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    text = dockerfile(service).read_text().replace("\\\n", " ") if "build" in service else ""
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    argv = command if command is not None else (json.loads(cmd[1]) if cmd else [])
    return (json.loads(entrypoint[1]) if entrypoint else []) + list(argv)


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def worker_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if command_of(s)[:3] == ["python", "-m", "gpu_workers"]}


def models_file_loaded_by_compose() -> Path:
    [path] = re.findall(r"loadmodels (\S+)", " ".join(command_of(services()["migrate"])))
    return ROOT / path


# -- every file parses -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path: str) -> None:
    documents = [doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc]
    assert documents
    if path.startswith("deploy/k8s/") and not path.endswith("models.yaml"):
        for doc in documents:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            assert doc["metadata"]["name"]


def test_grafana_dashboard_parses() -> None:
    assert json.loads((DEPLOY / "grafana" / "farm.json").read_text())["panels"]


# -- compose -----------------------------------------------------------------------------------------------------------


def test_compose_runs_the_whole_farm() -> None:
    names = set(services())
    assert {"postgres", "redis", "migrate", "api", "control", "flower", "worker-cpu", "prometheus", "grafana"} <= names
    assert len([n for n in names if n.startswith("worker-gpu-")]) >= 2


def test_redis_persists_and_never_evicts() -> None:
    argv = command_of(services()["redis"])
    assert flag_values(argv, "--appendonly") == ["yes"]
    assert flag_values(argv, "--maxmemory-policy") == ["noeviction"]
    assert any(volume.endswith(":/data") for volume in services()["redis"]["volumes"])


def test_api_runs_several_asgi_workers() -> None:
    argv = command_of(services()["api"])
    assert argv[:3] == ["python", "-m", "uvicorn"] and "api.asgi:application" in argv
    assert int(flag_values(argv, "--workers")[0]) >= 2


def test_exactly_one_control_worker_with_beat_on_the_control_queue() -> None:
    with_beat = [name for name, s in services().items() if "--beat" in command_of(s)]
    assert with_beat == ["control"]
    argv = command_of(services()["control"])
    assert flag_values(argv, "-A") == ["farm.celery"]
    assert flag_values(argv, "-Q") == [queues.CONTROL_QUEUE]
    assert (ROOT / "farm" / "celery.py").exists()


def test_flower_requires_basic_auth() -> None:
    assert "--basic-auth=$$FLOWER_BASIC_AUTH" in " ".join(command_of(services()["flower"]))


def test_one_gpu_worker_per_gpu() -> None:
    devices: list[str] = []
    for name, service in services().items():
        if not name.startswith("worker-gpu-"):
            continue
        assert dockerfile(service).name == "worker-gpu.Dockerfile"
        [reservation] = service["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and reservation["capabilities"] == ["gpu"]
        assert len(reservation["device_ids"]) == 1, f"{name}: one GPU per worker process"
        devices += reservation["device_ids"]
        assert service["environment"]["FARM_WORKER_ID"] == name
    assert len(devices) == len(set(devices)), "two workers pinned to one GPU"
    cpu = services()["worker-cpu"]
    assert dockerfile(cpu).name == "worker-cpu.Dockerfile" and "deploy" not in cpu


def test_workers_serve_specs_the_farm_loads() -> None:
    from settings import env

    models = catalog_file_parse(yaml.safe_load(models_file_loaded_by_compose().read_text()))
    profiles = {spec.name: spec.resource_profile for model in models for spec in model.specs}
    train_classes = {"cpu", *(item.split("=")[0] for item in env.FARM_TRAIN_CLASSES.split(",") if item)}
    served = set()
    for name, service in worker_services().items():
        argv = command_of(service)
        specs, classes = flag_values(argv, "--spec"), flag_values(argv, "--train")
        assert specs or classes, name
        for spec in specs:
            assert spec in profiles, f"{name} serves {spec}, which {models_file_loaded_by_compose().name} lacks"
            assert queues.is_valid_name(spec)
            assert profiles[spec].startswith("gpu" if name.startswith("worker-gpu-") else "cpu"), (name, spec)
            served.add(spec)
        assert set(classes) <= train_classes, name
    assert served == set(profiles), "a spec in the models file has no worker"


def test_compose_references_resolve() -> None:
    document = compose()
    declared_volumes = set(document.get("volumes", {}))
    for name, service in document["services"].items():
        for dependency in service.get("depends_on", []):
            assert dependency in document["services"], (name, dependency)
        if "build" in service:
            assert dockerfile(service).exists(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in declared_volumes, (name, source)


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert "api:8000" in targets
    port = None
    for name, service in worker_services().items():
        port = service["environment"].get("FARM_WORKER_METRICS_PORT", port)
        if "--spec" in command_of(service):
            assert f"{name}:{port}" in targets, name


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/farm.yaml").read_text())["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/farm.json"].startswith(provider["options"]["path"] + "/")


# -- what every process gets -------------------------------------------------------------------------------------------


def required_in_production() -> set[str]:
    text = (ROOT / "settings" / "env.py").read_text()
    names = set(re.findall(r'env_str\(\s*"([A-Z_]+)"[^)]*required_in_production=True', text))
    return names | {"ALLOWED_HOSTS"}


def test_control_plane_services_get_every_required_production_variable() -> None:
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "FLOWER_BASIC_AUTH"} <= required_in_production()
    for name in ("migrate", "api", "control", "flower"):
        environment = services()[name]["environment"]
        assert environment["FARM_ENV"] == "production"
        assert required_in_production() <= set(environment), name
    secret = next(d for d in k8s_documents() if d["kind"] == "Secret")
    for doc in k8s_documents():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if env.get("FARM_ENV") != "production":
                continue
            from_secret = set(secret["stringData"]) if container.get("envFrom") else set()
            assert required_in_production() <= set(env) | from_secret, doc["metadata"]["name"]


def test_workers_get_no_database_credentials() -> None:
    for name, service in worker_services().items():
        assert not {"DATABASE_URL", "SECRET_KEY"} & set(service["environment"]), name
    for doc in k8s_documents():
        if doc["kind"] != "Deployment" or doc["metadata"]["name"].startswith("farm-"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert "envFrom" not in container, doc["metadata"]["name"]
            assert "DATABASE_URL" not in {e["name"] for e in container.get("env", [])}


def test_worker_commands_use_only_flags_gpu_workers_accepts() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "gpu_workers", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    accepted = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    used = {arg for s in worker_services().values() for arg in command_of(s) if arg.startswith("--")}
    for doc in k8s_documents():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if "worker" in container["image"]:
                    used |= {arg for arg in container.get("args", []) if arg.startswith("--")}
    assert used and used <= accepted, used - accepted


def test_kubernetes_api_deployment_service_probes_and_migration_job() -> None:
    from django.urls import resolve

    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    api = docs[("Deployment", "farm-api")]
    service = docs[("Service", "farm-api")]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert api["spec"]["replicas"] >= 2
    [container] = api["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        resolve(container[probe]["httpGet"]["path"])  # a real route (raises Resolver404 otherwise)
    hosts = next(e["value"] for e in container["env"] if e["name"] == "ALLOWED_HOSTS").split(",")
    probe_host = container["readinessProbe"]["httpGet"]["httpHeaders"][0]["value"]
    assert probe_host in hosts, "probes would get 400 DisallowedHost"
    control = docs[("Deployment", "farm-control")]
    assert control["spec"]["replicas"] == 1 and control["spec"]["strategy"]["type"] == "Recreate"  # one beat
    job = docs[("Job", "farm-migrate")]
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "manage.py migrate" in command
    [models_file] = re.findall(r"loadmodels (\S+)", command)
    api_image = (DEPLOY / "docker" / "api.Dockerfile").read_text()
    assert (ROOT / models_file).exists() and models_file in api_image, "the Job's models file is not in the image"


# -- images ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker-cpu.Dockerfile", "worker-gpu.Dockerfile"])
def test_dockerfiles_copy_files_that_exist(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"{name}: COPY {source}"


def test_images_install_what_their_processes_need() -> None:
    api = (DEPLOY / "docker" / "api.Dockerfile").read_text()
    cpu = (DEPLOY / "docker" / "worker-cpu.Dockerfile").read_text()
    gpu = (DEPLOY / "docker" / "worker-gpu.Dockerfile").read_text()
    installs = " ".join(re.findall(r"^RUN (.+)$", api, re.M))
    assert "requirements-cpu.txt" not in installs and "torch" not in installs  # the control plane has no engine
    assert "requirements-cpu.txt" in cpu
    assert gpu.startswith("#") and "FROM vllm/vllm-openai" in gpu  # CUDA vLLM
    for text in (cpu, gpu):
        assert 'ENTRYPOINT ["python", "-m", "gpu_workers"]' in text
        assert "COPY settings" not in text  # workers never load Django settings


# -- configuration documented ------------------------------------------------------------------------------------------


def variables_read_by_the_code() -> set[str]:
    pattern = re.compile(r'\b(?:env_str|env_bool|env_int|env_float|env_list|_raw|_get)\(\s*"([A-Z][A-Z0-9_]+)"')
    names = set()
    for path in ("settings/env.py", "gpu_workers/envs.py"):
        names |= set(pattern.findall((ROOT / path).read_text()))
    return names


def test_every_environment_variable_is_in_the_readme_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split(" | ")[0])
    }
    read = variables_read_by_the_code()
    assert len(read) > 30, "the variable scan found too few: is the pattern out of date?"
    assert sorted(read - documented) == []


# -- requirements ------------------------------------------------------------------------------------------------------


def third_party_imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in FIRST_PARTY and n != "__future__"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_by(*files: str) -> set[str]:
    """The distributions `pip install -r FILES` installs: the requirements and, recursively, their dependencies."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    pending = []
    for file in files:
        for raw in (ROOT / file).read_text().splitlines():
            line = raw.split("#")[0].strip()
            if line:
                pending.append(Requirement(line))
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        if _canonical(requirement.name) in seen:
            continue
        seen.add(_canonical(requirement.name))
        try:
            dependencies = [Requirement(text) for text in requires(requirement.name) or []]
        except PackageNotFoundError:
            continue
        extras = requirement.extras or {""}
        pending += [d for d in dependencies if d.marker is None or any(d.marker.evaluate({"extra": e}) for e in extras)]
    return seen


@pytest.mark.parametrize(
    ("packages", "files"),
    [
        (("api", "farm", "settings", "tasks"), ("requirements.txt",)),
        (("gpu_workers",), ("requirements.txt", "requirements-cpu.txt")),
    ],
)
def test_every_third_party_import_is_a_requirement(packages: tuple[str, ...], files: tuple[str, ...]) -> None:
    """The images install these files only: an import they miss breaks the container at start (pydantic did)."""
    distributions = packages_distributions()
    installed = installed_by(*files)
    missing = {}
    for package in packages:
        for name in third_party_imports(package):
            provided_by = {_canonical(d) for d in distributions.get(name, [])}
            if not provided_by & installed:
                missing[name] = sorted(provided_by)
    assert missing == {}
