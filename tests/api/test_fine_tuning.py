"""Fine-tuning end to end on the live farm, driven by the `openai` SDK: upload a file, LoRA-fine-tune the tiny model
on a real training worker (`python -m gpu_workers --train cpu`, training in a child process), see loss events, get
`fine_tuned_model`, and chat with it (vLLM applies the adapter); eval-loss; dependency chains; a cancel kills the
training process within 5 s; a SIGKILLed training worker never leaves its job `running`.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import psutil
import pytest

from farm import processes
from tests.conftest import TINY_MODEL, LiveFarm
from tests.live_farm import registry_entries, wait_for

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]

TRAINER = "trainer-1"
TERMINAL = ("succeeded", "failed", "cancelled")
FAST = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}
# Long enough to be stopped mid-training on a busy 2-core machine (about 15 ms a step on the tiny model).
LONG = {"n_epochs": 50, "batch_size": 1, "learning_rate_multiplier": 1}
TIMINGS: dict[str, float] = {}


def examples(count: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"The answer is {a + b}."},
                    ]
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def redis_client():
    from farm.redis_client import sync_redis

    return sync_redis()


def start_trainer(live_farm: LiveFarm, name: str, tmp_path_factory) -> None:
    work = tmp_path_factory.mktemp(f"{name}-work")
    live_farm.processes.start(
        name,
        processes.training_worker_command(classes=["cpu"], worker_id=name),
        FARM_TRAIN_PROGRESS_EVERY_S="0",
        FARM_TRAIN_WORK_DIR=str(work),
    )
    wait_for(
        lambda: name in registry_entries(redis_client()),
        timeout=60,
        farm=live_farm.processes,
        what=f"training worker {name}",
    )


@pytest.fixture(scope="module")
def trainer(live_farm: LiveFarm, tmp_path_factory) -> Iterator[str]:
    start_trainer(live_farm, TRAINER, tmp_path_factory)
    yield TRAINER
    for name in [n for n in live_farm.processes.children if n.startswith("trainer-")]:
        live_farm.processes.stop(name)
    if TIMINGS:
        print("\nfine-tuning timings:", json.dumps(TIMINGS, indent=1))


@pytest.fixture(scope="module")
def training_file(openai_client: openai.OpenAI) -> str:
    return openai_client.files.create(file=("train.jsonl", examples(16)), purpose="fine-tune").id


def wait_job(client: openai.OpenAI, job_id: str, done: Callable[[Any], bool], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = client.fine_tuning.jobs.retrieve(job_id)
        except openai.InternalServerError as exc:  # 503: the shared test database out of connections; poll again
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
            continue
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job_id} still {job.status}")
        time.sleep(0.25)


def farm_job(live_farm: LiveFarm, job_id: str, *, unavailable_ok: bool = False) -> dict[str, Any] | None:
    response = httpx.get(
        f"{live_farm.v1}/jobs/{uuid.UUID(job_id.removeprefix('ftjob-'))}",
        timeout=30,
        headers={"Authorization": f"Bearer {live_farm.api_key}"},
    )
    if unavailable_ok and response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def wait_farm_job(live_farm: LiveFarm, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = farm_job(live_farm, job_id, unavailable_ok=time.monotonic() < deadline)
        if job is None:  # 503, see wait_job
            time.sleep(1.0)
            continue
        if job["status"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job_id} still {job['status']}")
        time.sleep(0.25)


def eval_loss(live_farm: LiveFarm, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{live_farm.v1}/evals/loss", json=body, timeout=30, headers={"Authorization": f"Bearer {live_farm.api_key}"}
    )


def chat(client: openai.OpenAI, model: str) -> list[str]:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 3 plus 4?"}], max_tokens=12, temperature=0, seed=0
    )
    return reply.choices[0].message.content


def step_losses(client: openai.OpenAI, job_id: str) -> list[float]:
    """Training loss per step, in step order, from the job's metrics events."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    steps = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics" and "step" in e.data)
    return [loss for _, loss in steps]


def training_children(live_farm: LiveFarm, name: str) -> list[psutil.Process]:
    """The worker's live training processes (a killed one not yet reaped, a zombie, is not running)."""
    alive = []
    for process in live_farm.processes.descendants(name):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "gpu_workers.training" in " ".join(process.cmdline()):
                alive.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return alive


def test_fine_tune_then_chat_with_the_fine_tuned_model(
    live_farm: LiveFarm, openai_client: openai.OpenAI, trainer: str, training_file: str
) -> None:
    created = openai_client.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=training_file, hyperparameters=FAST, seed=7
    )
    assert created.object == "fine_tuning.job" and created.id.startswith("ftjob-")
    assert created.status in ("queued", "running") and created.fine_tuned_model is None
    assert created.hyperparameters.n_epochs == 2 and created.training_file == training_file
    started = time.monotonic()
    job = wait_job(openai_client, created.id, lambda j: j.status in TERMINAL)
    TIMINGS["fine-tune 8 steps, create -> succeeded, s"] = round(time.monotonic() - started, 2)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"{TINY_MODEL}:ft-{created.id.removeprefix('ftjob-')[:12]}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at and len(job.result_files) == 1

    events = openai_client.fine_tuning.jobs.list_events(created.id, limit=100).data
    metrics = sorted(
        (e.data for e in events if e.type == "metrics" and "train_loss" in e.data), key=lambda d: d["step"]
    )
    assert [m["step"] for m in metrics] == list(range(1, 9))  # 16 examples / 4 per batch x 2 epochs, every step
    assert all({"train_loss", "eta_s", "total_steps", "trained_tokens"} <= set(m) for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learned something
    messages = [e.message for e in events]
    assert "The job has successfully completed" in messages and "Fine-tuning job started" in messages
    checkpoints = openai_client.fine_tuning.jobs.checkpoints.list(created.id).data
    assert sorted(c.step_number for c in checkpoints) == [4, 8]
    assert all(c.metrics.train_loss is not None for c in checkpoints)

    # The adapter is a downloadable result file (a tar in PEFT's layout)...
    archive = openai_client.files.content(job.result_files[0]).read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    # ...and the fine-tuned model is served: the base's spec loads the adapter (LoRA) and generates with it.
    wait_for(
        lambda: job.fine_tuned_model in [m.id for m in openai_client.models.list()],
        timeout=15,
        what="the fine-tuned model in the catalogue",
    )
    tuned = chat(openai_client, job.fine_tuned_model)
    base = chat(openai_client, TINY_MODEL)
    assert tuned and base and tuned != base  # same greedy request, different weights

    # It is the owner's: another user's key neither sees nor uses it (nor can fine-tune it further).
    other = openai.OpenAI(base_url=live_farm.v1, api_key=live_farm.other_api_key, max_retries=0)
    assert TINY_MODEL in [m.id for m in other.models.list()]
    assert job.fine_tuned_model not in [m.id for m in other.models.list()]
    own_file = other.files.create(file=("train.jsonl", examples(16)), purpose="fine-tune").id
    for attempt in (
        lambda: other.models.retrieve(job.fine_tuned_model),
        lambda: chat(other, job.fine_tuned_model),
        lambda: other.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=own_file),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert caught.value.code == "model_not_found", caught.value


def test_hyperparameters_and_inputs_are_validated_up_front(
    live_farm: LiveFarm, openai_client: openai.OpenAI, training_file: str
) -> None:
    def create(**body: Any) -> httpx.Response:
        return httpx.post(
            f"{live_farm.v1}/fine_tuning/jobs",
            json={"model": TINY_MODEL, "training_file": training_file, **body},
            timeout=30,
            headers={"Authorization": f"Bearer {live_farm.api_key}"},
        )

    batch_file = openai_client.files.create(
        file=(
            "b.jsonl",
            b'{"custom_id": "a", "method": "POST", "url": '
            b'"/v1/chat/completions", "body": {"model": "m", "messages": '
            b'[{"role": "user", "content": "hi"}]}}\n',
        ),
        purpose="batch",
    ).id
    cases = [
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 2.5}}, 400, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400, "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"lora_rank": 1000}}, 400, "hyperparameters.lora_rank"),
        ({"hyperparameters": {"warmup": 3}}, 400, "hyperparameters.warmup"),
        ({"method": {"type": "dpo"}}, 400, "method.type"),
        ({"training_file": "file-missing"}, 404, "training_file"),
        ({"training_file": batch_file}, 400, "training_file"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"depends_on": [f"ftjob-{uuid.uuid4().hex}"]}, 404, "depends_on"),
        ({"surprise": 1}, 400, "surprise"),
    ]
    for body, status, param in cases:
        response = create(**body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
    # Nothing was queued by the refused requests; another key's job is a 404.
    other = openai.OpenAI(base_url=live_farm.v1, api_key=live_farm.other_api_key, max_retries=0)
    assert [j.id for j in other.fine_tuning.jobs.list().data] == []
    mine = openai_client.fine_tuning.jobs.list(limit=1).data[0]
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(mine.id)


def test_eval_loss_and_a_dependency_chain_run_in_order(
    live_farm: LiveFarm, openai_client: openai.OpenAI, trainer: str, training_file: str
) -> None:
    first = openai_client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file, hyperparameters=FAST)
    ft_model = f"{TINY_MODEL}:ft-{first.id.removeprefix('ftjob-')[:12]}"  # not registered yet
    # Second stage: continue from the first's adapter; and the loss of the first's model. Both wait for it.
    second = openai_client.fine_tuning.jobs.create(
        model=ft_model,
        training_file=training_file,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"depends_on": [first.id]},
    )
    tuned_eval = eval_loss(live_farm, model=ft_model, file=training_file, depends_on=[first.id])
    base_eval = eval_loss(live_farm, model=TINY_MODEL, file=training_file)
    assert tuned_eval.status_code == 200 and base_eval.status_code == 200, (tuned_eval.text, base_eval.text)
    assert second.depends_on == [first.id] and second.status == "queued"

    results = {
        name: wait_farm_job(live_farm, job_id)
        for name, job_id in (
            ("first", first.id),
            ("second", second.id),
            ("tuned_eval", tuned_eval.json()["id"]),
            ("base_eval", base_eval.json()["id"]),
        )
    }
    assert {name: job["status"] for name, job in results.items()} == dict.fromkeys(results, "succeeded")
    for name in ("second", "tuned_eval"):  # started only once the first had succeeded
        assert results[name]["started_at"] >= results["first"]["finished_at"], name
    assert results["tuned_eval"]["result"]["loss"] < results["base_eval"]["result"]["loss"]
    assert results["base_eval"]["result"]["tokens"] > 0
    with pytest.raises(openai.ConflictError):  # a succeeded job cannot be cancelled
        openai_client.fine_tuning.jobs.cancel(first.id)
    second_done = openai_client.fine_tuning.jobs.retrieve(second.id)
    assert second_done.fine_tuned_model == f"{TINY_MODEL}:ft-{second.id.removeprefix('ftjob-')[:12]}"
    # The second stage started from the first's adapter: its first step already has the first's trained loss.
    first_losses, second_losses = (step_losses(openai_client, job.id) for job in (first, second))
    assert second_losses[0] < first_losses[0] - 0.2, (first_losses, second_losses)

    # A job whose dependency is cancelled fails without running.
    blocker = openai_client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file, hyperparameters=LONG)
    blocked = eval_loss(live_farm, model=TINY_MODEL, file=training_file, depends_on=[blocker.id]).json()
    assert farm_job(live_farm, blocked["id"])["status"] == "queued"
    openai_client.fine_tuning.jobs.cancel(blocker.id)
    failed = wait_farm_job(live_farm, blocked["id"], timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "dependency_failed"
    assert failed["started_at"] is None


def test_cancel_kills_the_training_process_within_5_s(
    live_farm: LiveFarm, openai_client: openai.OpenAI, trainer: str, training_file: str
) -> None:
    job = openai_client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=training_file, hyperparameters=LONG)
    wait_job(openai_client, job.id, lambda j: j.status == "running" and j.trained_tokens, timeout=120)
    assert training_children(live_farm, trainer), "no training process running"
    job_id = str(uuid.UUID(job.id.removeprefix("ftjob-")))
    canceled_at = time.monotonic()
    cancelled = openai_client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_for(
        lambda: (
            not training_children(live_farm, trainer)
            and job_id not in registry_entries(redis_client())[trainer]["running_jobs"]
        ),
        timeout=5,
        what="the training process to stop",
    )
    TIMINGS["cancel -> training process gone, s"] = round(time.monotonic() - canceled_at, 3)
    assert openai_client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert openai_client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # again: a no-op


def test_a_killed_training_worker_never_leaves_its_job_running(
    live_farm: LiveFarm,
    openai_client: openai.OpenAI,
    trainer: str,
    training_file: str,
    tmp_path_factory,
    django_db_blocker,
) -> None:
    from farm.reaper import jobs_reap

    job = openai_client.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=training_file, hyperparameters={**LONG, "max_steps": 40}
    )
    wait_job(openai_client, job.id, lambda j: j.status == "running" and j.trained_tokens, timeout=120)
    children = training_children(live_farm, trainer)
    assert children
    live_farm.processes.kill(trainer)  # the worker's process group; training runs in a group of its own
    killed_at = time.monotonic()
    psutil.wait_procs(children, timeout=5)  # ...and dies with its parent (PR_SET_PDEATHSIG)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    wait_for(lambda: trainer not in registry_entries(redis_client()), timeout=15, what="the registry entry to expire")
    with django_db_blocker.unblock():
        report = jobs_reap(lease_s=0.5)
    job_id = str(uuid.UUID(job.id.removeprefix("ftjob-")))
    assert job_id in report.requeued
    assert openai_client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    TIMINGS["training worker killed -> job requeued, s"] = round(time.monotonic() - killed_at, 2)
    # A new training worker takes attempt 2 and finishes it.
    start_trainer(live_farm, "trainer-2", tmp_path_factory)
    done = wait_job(openai_client, job.id, lambda j: j.status in TERMINAL, timeout=300)
    assert done.status == "succeeded", done.error
    assert farm_job(live_farm, job.id)["attempt"] == 2
