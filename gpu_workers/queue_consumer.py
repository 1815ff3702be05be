"""Takes inference messages off the worker's `infer.<spec>` queues on the engine loop, without Celery's consumer.

Through Celery, each message crossed four threads (the consumer's pop, Celery's strategy and pool, a task thread
that claimed the attempt and then blocked on the engine loop) and Celery's per-task machinery (request objects,
trace, signals): about half of a null-engine worker's CPU per request (py-spy, BENCHMARKS.md 2026-12-03 night).
Here one coroutine on the engine loop pops a batch of messages with BLMPOP, writes their unacked records and their
claims in one pipelined round trip, and runs each attempt as a coroutine beside the engine (`WorkerRuntime.
run_claimed`); acks leave in one round trip per loop turn.

The wire format and the safety rules are kombu's and Celery's, unchanged:
- messages are the Celery protocol-2 messages the API publishes (`farm.task_messages`), so the API, the sweeper and
  Flower's queue lengths see the same lists;
- a popped message is recorded in kombu's unacked index (same keys, same record) before it runs, and acked (its
  record removed) once its outcome is reported: a worker killed in between leaves it to kombu's restore, which any
  Celery consumer of the broker runs after the visibility timeout, while the reaper requeues the job much sooner;
- the per-attempt claim turns a redelivered copy away.

A broker without BLMPOP (Redis before 7) or another broker (RabbitMQ) keeps Celery's consumer (`tasks.inference`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from farm import queues, redis_keys
from farm.request_ids import CELERY_HEADER, current_request_id
from gpu_workers.inference import InferenceMessage, outcome_log
from gpu_workers.runtime import CLAIM_TTL_S, WorkerRuntime

log = logging.getLogger(__name__)

# Most messages one pop takes (also capped by the room left under the worker's concurrency).
BATCH_MAX = 64
# Seconds one BLMPOP blocks: how soon a pause or a stop takes effect while the queues are empty.
POP_TIMEOUT_S = 1.0
# kombu's Redis transport keys for messages delivered but not yet acked (`kombu.transport.redis.Channel`).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def has_blmpop(client: Any) -> bool:
    """Whether the server behind a sync client has BLMPOP (Redis 7 and Valkey do)."""
    version = str(client.info("server").get("redis_version", "0"))
    return int(version.split(".", maxsplit=1)[0]) >= 7


async def _ended(task: asyncio.Task[None] | None, timeout_s: float) -> None:
    """Waits up to `timeout_s` for `task` to end by itself."""
    if task is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout_s)


class UnknownMessage(ValueError):
    """A message on an inference queue that is not an inference task."""


def message_decode(raw: bytes) -> tuple[InferenceMessage, str, str]:
    """A broker message -> (the task's payload, its delivery tag, the request id it carries)."""
    envelope = orjson.loads(raw)
    headers = envelope.get("headers") or {}
    if headers.get("task") != queues.INFER_TASK.name:
        raise UnknownMessage(f"task {headers.get('task')!r} on an inference queue")
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    _args, kwargs, _embed = orjson.loads(body)
    return (
        InferenceMessage.from_kwargs(kwargs),
        envelope["properties"]["delivery_tag"],
        str(headers.get(CELERY_HEADER) or ""),
    )


class QueueConsumer:
    """Lives on the engine loop (`start` there); `pause`, `resume` and `stop` may be called from any thread."""

    def __init__(
        self,
        *,
        runtime: WorkerRuntime,
        client: aioredis.Redis,
        queue_names: list[str],
        concurrency: int,
    ) -> None:
        self.runtime = runtime
        self._client = client
        self._queues = list(queue_names)
        self._concurrency = max(1, concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = asyncio.Event()  # set while consuming (cleared by pause)
        self._room = asyncio.Event()  # set when a job ends (the pop loop waits on it when full)
        self._idle = asyncio.Event()  # set while no job runs
        self._idle.set()
        self._running: set[asyncio.Task[None]] = set()
        self._acks: list[str] = []
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._ack_wake = asyncio.Event()

    # --- from any thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begins consuming; call on the engine loop."""
        self._loop = asyncio.get_running_loop()
        self._open.set()
        self._task = self._loop.create_task(self._pop_loop(), name="queue-consumer")
        self._ack_task = self._loop.create_task(self._ack_loop(), name="queue-acks")

    def pause(self) -> None:
        """Stops taking messages (quarantine, drain); running jobs go on. What a pop in flight brings in goes back."""
        self._call(self._open.clear)

    def resume(self) -> None:
        if not self._stopping:
            self._call(self._open.set)

    def _call(self, action: Callable[[], None]) -> None:
        assert self._loop is not None, "not started"
        self._loop.call_soon_threadsafe(action)

    # --- on the loop ----------------------------------------------------------------------------------------

    async def stop(self, timeout_s: float) -> int:
        """Stops taking messages, waits up to `timeout_s` for the running jobs, acks what finished. Returns how
        many jobs were still running (their messages stay unacked: kombu restores them). The loops are told to end,
        not cancelled: a cancel that lands in a pipelined command can be lost there."""
        self._stopping = True
        self._open.set()  # wake the pop loop, wherever it waits, to see `_stopping`
        self._room.set()
        await _ended(self._task, POP_TIMEOUT_S + 5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        self._ack_wake.set()
        await _ended(self._ack_task, 5.0)
        await self._flush_acks()
        return len(self._running)

    async def _pop_loop(self) -> None:
        keys = list(self._queues)
        while not self._stopping:
            if not self._open.is_set():
                await self._open.wait()
                continue
            room = self._concurrency - len(self._running)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                reply = await self._client.execute_command(
                    "BLMPOP", POP_TIMEOUT_S, len(keys), *keys, "RIGHT", "COUNT", min(BATCH_MAX, room)
                )
            except RedisError as exc:  # broker restart: `farm.redis_client` already retried ~5 s
                log.warning("could not pop inference messages: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if not reply:
                continue
            if len(keys) > 1:  # BLMPOP takes from the first non-empty key: the one just served goes last
                served = keys.index(reply[0].decode())
                keys = keys[served + 1 :] + keys[: served + 1]
            if self._open.is_set() and not self._stopping:
                await self._take(reply[0], reply[1])
            else:  # paused (drain, quarantine, shutdown) while the pop waited: not ours to run, nor to hand back
                await self._give_back(reply[0].decode(), reply[1])

    async def _take(self, key: bytes, items: list[bytes]) -> None:
        """Records a popped batch as unacked, claims its attempts (one round trip), and starts each job."""
        queue = key.decode()
        decoded: list[tuple[InferenceMessage, str, str]] = []
        now = time.time()
        records: dict[str, bytes] = {}
        for raw in items:
            try:
                message, tag, request_id = message_decode(raw)
            except (UnknownMessage, ValueError, KeyError, TypeError) as exc:
                log.error("dropped a malformed message on %s: %s: %.200r", queue, exc, raw)
                continue
            decoded.append((message, tag, request_id))
            # kombu's unacked record: [payload, exchange, routing key] (restored to that queue if never acked)
            records[tag] = b'[%s,"",%s]' % (raw, orjson.dumps(queue))
        if not decoded:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zadd(UNACKED_INDEX_KEY, dict.fromkeys(records, now))
                pipe.hset(UNACKED_KEY, mapping=records)
                for message, _, _ in decoded:
                    pipe.set(
                        redis_keys.job_claim(message.job_id, message.attempt),
                        self.runtime.worker_id,
                        nx=True,
                        ex=CLAIM_TTL_S,
                    )
                    pipe.exists(redis_keys.job_cancel(message.job_id))
                replies = await pipe.execute()
        except RedisError as exc:
            # Nothing ran. The messages are off their queue and maybe unrecorded: put them back where they were
            # (the tail, next to be popped); if Redis is gone, the sweeper re-publishes their jobs.
            log.warning("could not claim %d inference messages: %s; returning them to %s", len(decoded), exc, queue)
            await self._give_back(queue, items)
            await asyncio.sleep(1.0)
            return
        answers = replies[2:]
        for index, (message, tag, request_id) in enumerate(decoded):
            claimed, canceled = bool(answers[2 * index]), bool(answers[2 * index + 1])
            task = asyncio.get_running_loop().create_task(self._job(message, tag, request_id, claimed, canceled))
            self._running.add(task)
            self._idle.clear()

    async def _give_back(self, queue: str, items: list[bytes]) -> None:
        """Puts popped, unclaimed messages back at the tail of their queue, next to be taken, in their order. If
        Redis is gone, the sweeper re-publishes their jobs (`farm.reaper`)."""
        try:
            await self._client.rpush(queue, *reversed(items))
        except RedisError as exc:
            log.warning("%d messages not returned to %s (%s): the sweeper re-publishes them", len(items), queue, exc)

    async def _job(self, message: InferenceMessage, tag: str, request_id: str, claimed: bool, canceled: bool) -> None:
        current_request_id.set(request_id)  # this task's own context: its log lines carry the request id
        try:
            outcome = await self.runtime.run_claimed(message, claimed=claimed, canceled=canceled)
            if outcome is not None:
                outcome_log(message, outcome)
        except Exception:
            log.exception("job %s attempt %d: the worker failed to run it", message.job_id, message.attempt)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._acks.append(tag)
            self._ack_wake.set()
            self._room.set()
            if not self._running:
                self._idle.set()

    async def _ack_loop(self) -> None:
        while not (self._stopping and not self._running):
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        """Removes the unacked records of finished jobs, all in one round trip. If Redis cannot be reached they
        stay, as a failed ack leaves them in kombu: the messages come back after the visibility timeout, and the
        claims turn them away."""
        tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(UNACKED_INDEX_KEY, *tags)
                pipe.hdel(UNACKED_KEY, *tags)
                await pipe.execute()
        except RedisError as exc:
            log.warning("could not ack %d inference messages: %s", len(tags), exc)
