"""Shared fixtures: the tiny test model, API keys, and one live farm per session (real processes)."""

from __future__ import annotations

import os
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from farm.db import close_pool_connections
from tests.live_farm import FarmProcesses, child_env, http_ok, spec_served, start_worker, wait_for

ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / ".farm" / "test-models"
TINY_MODEL = "tiny-llama"
TINY_SPEC = "tiny-llama-cpu"
UNSERVED_MODEL = "unserved-model"
# Eager mode skips torch.compile warm-up: the tiny model then loads in seconds on CPU.
# LoRA on: fine-tuned `tiny-llama:ft-<id>` models are served by this spec (tests/api/test_fine_tuning.py).
TINY_ENGINE_ARGS = {
    "max_model_len": 1024,
    "enforce_eager": True,
    "enable_lora": True,
    "max_lora_rank": 16,
    "max_loras": 2,
}


@dataclass
class LiveFarm:
    base_url: str
    api_key: str
    other_api_key: str
    processes: FarmProcesses
    database_url: str
    worker_metrics_url: str = ""  # worker-1's own /metrics (FARM_WORKER_METRICS_PORT)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment, django_db_blocker) -> Iterator[None]:
    """Always create the test database: live-farm tests use it through other processes, not through `db`."""
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    with django_db_blocker.unblock():
        close_pool_connections()  # PostgreSQL cannot drop a database with open connections
        teardown_databases(config, verbosity=0)


def tiny_model_entry(model_dir: Path) -> dict:
    """The tiny model's entry in a models catalogue (`farm.catalog.catalog_load`, `manage.py loadmodels`)."""
    return {
        "name": TINY_MODEL,
        "source": str(model_dir),
        "engine_args": TINY_ENGINE_ARGS,
        "specs": [{"name": TINY_SPEC, "engine": "vllm-cpu"}],
    }


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from gpu_workers.model_store import build_tiny_model

    return build_tiny_model(TEST_MODELS / TINY_MODEL)


def database_url_for_children() -> str:
    """The test database (after pytest-django created it), as a URL for the farm's child processes."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = quote(s["USER"] or "", safe="") + (":" + quote(s["PASSWORD"], safe="") if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def _random_suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=8))


@pytest.fixture(scope="session")
def farm_catalog(django_db_setup, django_db_blocker, tiny_model_dir: Path) -> dict[str, str]:
    """Models, users and keys committed to the test database, and the spec catalogue published to Redis."""
    from django.contrib.auth import get_user_model

    from farm.api_keys import api_key_create
    from farm.catalog import catalog_load, spec_catalog_publish
    from farm.redis_client import sync_redis

    sync_redis().flushdb()
    with django_db_blocker.unblock():
        catalog_load(
            {
                "models": [
                    tiny_model_entry(tiny_model_dir),
                    {
                        "name": UNSERVED_MODEL,
                        "source": str(tiny_model_dir),
                        "specs": [
                            {"name": "unserved-model-gpu", "engine": "vllm", "resource_profile": "gpu:A100-80GB"}
                        ],
                    },
                ]
            }
        )
        users = get_user_model().objects
        _, key = api_key_create(owner=users.create(username=f"alice-{_random_suffix()}"), name="test")
        _, other = api_key_create(owner=users.create(username=f"bob-{_random_suffix()}"), name="test")
        spec_catalog_publish()
    return {"api_key": key, "other_api_key": other}


@pytest.fixture
def committed_user(django_db_setup, django_db_blocker) -> Iterator[object]:
    """A user committed to the test database, for code that reads it from other threads (`run_db`) or processes.

    The database stays unblocked during the test; the user and everything it owns are deleted afterwards.
    """
    from django.contrib.auth import get_user_model

    with django_db_blocker.unblock():
        user = get_user_model().objects.create(username=f"committed-{_random_suffix()}")
        try:
            yield user
        finally:
            close_pool_connections()
            user.delete()


@pytest.fixture(scope="session")
def live_farm(farm_catalog: dict[str, str], tiny_model_dir: Path, tmp_path_factory) -> Iterator[LiveFarm]:
    """API + control worker + one vLLM worker on the tiny model, for the whole session."""
    from farm import processes
    from tests.services import free_port

    log_dir = tmp_path_factory.mktemp("farm-logs")
    database_url = database_url_for_children()
    farm = FarmProcesses(env=child_env(database_url=database_url, model_dir=tiny_model_dir.parent), log_dir=log_dir)
    port = free_port()
    farm.env["FARM_API_URL"] = f"http://127.0.0.1:{port}"  # workers fetch job inputs and adapters through the API
    try:
        farm.start("control", processes.control_worker_command())
        farm.start("api", processes.api_command(host="127.0.0.1", port=port))
        metrics_port = free_port()
        start_worker(
            farm,
            name="worker-1",
            spec=TINY_SPEC,
            FARM_WORKER_METRICS_PORT=str(metrics_port),
            FARM_WORKER_METRICS_ADDR="127.0.0.1",
        )
        base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{base_url}/readyz"), timeout=60, farm=farm, what="the API")
        wait_for(lambda: spec_served(TINY_SPEC), timeout=240, farm=farm, what="the tiny-model worker")
        yield LiveFarm(
            base_url=base_url,
            api_key=farm_catalog["api_key"],
            other_api_key=farm_catalog["other_api_key"],
            processes=farm,
            database_url=database_url,
            worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        farm.stop_all()
        print(f"\nlive farm logs: {log_dir}")


@pytest.fixture(scope="session")
def openai_client(live_farm: LiveFarm):
    import openai

    return openai.OpenAI(base_url=live_farm.v1, api_key=live_farm.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def pytest_collection_modifyitems(config, items) -> None:
    """`@pytest.mark.gpu` tests are skipped, visibly, where NVML finds no GPU."""
    if os.environ.get("FARM_TEST_GPU") == "1":
        return
    try:
        import pynvml

        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
        pynvml.nvmlShutdown()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
