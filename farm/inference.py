"""Accepting an inference request: find the model, route it to a spec, persist the job, publish it."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from farm.api_keys import KeyPrincipal
from farm.catalog import ModelEntry, model_catalog
from farm.errors import ModelNotFound, ModelOverloaded, Unavailable
from farm.job_intake import RETRY_AFTER_S, NewJob, job_intake
from farm.job_streams import FROM_START
from farm.models import OnLimit
from farm.registry import live_workers_serving, registry_reread
from farm.routing import SpecState, model_overloaded, route_request, spec_states
from farm.spec_health import queue_depths, spec_backoffs
from settings import env

log = logging.getLogger(__name__)

# How often a key with `on_limit=wait` looks again for room on an overloaded model.
OVERLOAD_POLL_S = 0.25


@dataclass(frozen=True)
class Submission:
    job_id: str
    model: str
    spec: str
    created: int
    deadline: float
    stream_after: bytes = FROM_START  # its stream's opening entry: its reader starts after it (`farm.job_streams`)


async def model_resolve(name: str, *, owner_id: int | None) -> ModelEntry:
    """The enabled model `name` as `owner_id`'s keys see it: another user's fine-tuned model does not exist for them."""
    model = (await model_catalog()).get(name)
    if model is None or not model.visible_to(owner_id):
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    return model


async def spec_choose_waiting(model: ModelEntry, *, wait_s: float) -> str:
    """`spec_choose`, but an overloaded model is asked again every `OVERLOAD_POLL_S` for up to `wait_s` seconds
    before its 429 stands (keys with `on_limit=wait`: their requests queue behind the backlog instead of failing)."""
    give_up = time.monotonic() + wait_s
    while True:
        try:
            return await spec_choose(model)
        except ModelOverloaded:
            if time.monotonic() + OVERLOAD_POLL_S > give_up:
                raise
            await asyncio.sleep(OVERLOAD_POLL_S)


async def _route(model: ModelEntry, backoffs: dict[str, float]) -> tuple[list[SpecState], SpecState | None]:
    """The model's specs as the router sees them now (from the cached registry snapshot), and its pick."""
    now = time.time()
    workers = await live_workers_serving([s.name for s in model.specs])
    states = spec_states([(s.name, s.weight) for s in model.specs], workers, now=now, backoffs=backoffs)
    return states, route_request(states, now=now)


async def spec_choose(model: ModelEntry) -> str:
    """Routes to a spec of the model from live state (replicas, load, weights, back-off); 503 with Retry-After when
    no replica serves it, 429 with Retry-After when every replica is saturated and the queues are over the bound."""
    backoffs = await spec_backoffs()
    states, choice = await _route(model, backoffs)
    if choice is None and await registry_reread():  # a worker that came up since the cached snapshot was read
        states, choice = await _route(model, backoffs)
    if choice is None:
        raise Unavailable(
            f"No worker is serving `{model.name}` right now; retry shortly.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if choice.saturated and env.FARM_OVERLOAD_QUEUE_BOUND >= 0:  # queue depths are read only when it may matter
        live = [state for state in states if state.live_replicas > 0]
        depths = await queue_depths([state.name for state in live])
        live = [replace(state, queued=depths[state.name]) for state in live]
        if model_overloaded(live, queue_bound=env.FARM_OVERLOAD_QUEUE_BOUND):
            raise ModelOverloaded(
                f"`{model.name}` is overloaded: every replica is busy and {sum(depths.values())} requests are "
                "waiting; retry after the delay in Retry-After.",
                headers={"Retry-After": str(env.FARM_OVERLOAD_RETRY_AFTER_S)},
            )
    return choice.name


async def inference_submit(
    *,
    principal: KeyPrincipal,
    kind: str,
    model_name: str,
    request: dict[str, Any],
    timeout_s: float,
    request_id: str = "",
) -> Submission:
    """Validated request in, queued job out (committed before its message is published). The key's policy and
    limits are checked by the caller before (`api_key_check_request`, `farm.rate_limits`)."""
    model = await model_resolve(model_name, owner_id=principal.owner_id)
    started = time.time()
    wait_s = min(env.FARM_RATE_LIMIT_MAX_WAIT_S, timeout_s) if principal.policy.on_limit == OnLimit.WAIT else 0.0
    spec_name = await spec_choose_waiting(model, wait_s=wait_s)
    now = time.time()
    deadline = started + timeout_s  # time spent waiting for room counts against the request's deadline
    spec_id = next(s.id for s in model.specs if s.name == spec_name)
    accepted = await job_intake(
        NewJob(
            owner_id=principal.owner_id,
            api_key_id=principal.key_id,
            key_prefix=principal.prefix,
            kind=kind,
            model_id=model.id,
            model_name=model.name,
            spec_id=spec_id,
            spec_name=spec_name,
            request=request,
            deadline=deadline,
            request_id=request_id,
            adapter=None if model.adapter is None else (model.adapter.lora_id, model.adapter.file_id),
        )
    )
    return Submission(
        job_id=accepted.job_id,
        model=model.name,
        spec=spec_name,
        created=int(now),
        deadline=deadline,
        stream_after=accepted.stream_after,
    )
