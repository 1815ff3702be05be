"""kombu's Redis transport with two changes: a worker survives the broker going away while it holds unacked messages,
and a channel reuses its Redis client for the commands it sends outside the consumer's poller.

Celery 5.7 / kombu 5.7, on a lost broker connection, `collect()`s the connection, which detaches the channel's
transport (`connection.client`, then `channel.connection`, become None), and then goes on using that channel: it
closes it again (restoring unacked messages) and acks messages of tasks that finish afterwards. Each of those reaches
`Channel._connparams`, which reads the detached transport and raises AttributeError; Celery treats that as
unrecoverable and the worker exits. Seen in `tests/farm/test_reliability.py` (Redis restart, database outage) on the
control worker, through both the restore and the ack path.

Here `_connparams` raises a Redis ConnectionError instead: a connection error, which kombu and Celery already handle
(the close is ignored, a failed ack is logged), so the worker reconnects. Nothing is lost: an unacked message stays in
Redis' unacked index if Redis kept it (kombu restores it after the visibility timeout; the per-attempt claim and the
guarded job updates make a redelivery harmless), and if Redis lost it the sweeper re-publishes the job
(`farm.reaper`).

kombu builds a new `redis.Redis` for every publish, ack and QoS update (`Channel.conn_or_acquire`); with redis-py 8
that constructor (response-callback tables, event dispatcher) was ~6 % of the API process' CPU under load, more
than the LPUSH it wraps (py-spy, 2026-12-02). The client holds no connection of its own (its pool does), so one per
channel and pool serves every such command. The consumer's clients (`client`, `subclient`), which the poller binds
to a connection, are kombu's as before.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(redis.Channel):
    _command_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._command_client
        if client is None or client.connection_pool is not self.pool:  # the pool is rebuilt after a disconnect
            client = self._command_client = super()._create_client()
        return client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:  # transport detached by collect()
            raise RedisConnectionError("the broker connection was closed (a reconnect is under way)")
        return super()._connparams(asynchronous=asynchronous)


class Transport(redis.Transport):
    Channel = Channel


# `broker_transport` value for Celery (kombu resolves it by dotted name).
REDIS_TRANSPORT = f"{__name__}:Transport"
