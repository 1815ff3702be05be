"""Telling workers that a job was canceled: a marker key (seen before a job starts) and a pub/sub message (seen
by the worker running it, which aborts the engine request at once)."""

from __future__ import annotations

from farm import redis_keys
from farm.job_streams import job_stream_append
from farm.redis_client import sync_redis
from farm.stream_format import Failure


def cancel_signal(job_id: str) -> None:
    client = sync_redis()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(redis_keys.job_cancel(job_id), 1, ex=redis_keys.CANCEL_TTL_S)
        pipe.publish(redis_keys.CANCEL_CHANNEL, job_id)
        pipe.execute()
    job_stream_append(job_id, Failure(409, "invalid_request_error", "canceled", "The job was canceled."))
