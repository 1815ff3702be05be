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

A busy worker paid three Redis round trips per message in its consumer thread (BRPOP; the unacked record's ZADD +
HSET; the ack's ZREM + HDEL), about a third of a null-engine worker's CPU (py-spy, 2026-12-02). Here, where the
server has BLMPOP (Redis 7, Valkey), one blocking pop takes every message waiting in the queue (up to the prefetch
room and `BATCH_MAX`), their unacked records are written in one round trip before any of them is handed to Celery,
and acks made on the worker's event loop are removed from the unacked index together once per loop turn. Nothing
changes for a message's safety: it is recorded as unacked before its task can run, and an ack that a crash keeps
from reaching Redis only lets the message come back after the visibility timeout, where the job's per-attempt claim
turns the redelivery away.

A queue in `PASSIVE_QUEUES` is consumed in name only: listed by remote control, and so by Flower, but left out of
the pops (a worker whose engine loop takes those messages itself names them; it requires BLMPOP, as this does).
"""

from __future__ import annotations

import logging
import threading
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

# Most messages one blocking pop takes (BLMPOP's COUNT).
BATCH_MAX = 64
# Queues this process' Celery consumer lists (remote control, Flower's worker and broker views) but never pops: a
# worker that takes their messages itself (`gpu_workers.queue_consumer`) names its `infer.<spec>` queues here.
PASSIVE_QUEUES: set[str] = set()


class QoS(redis.QoS):
    """kombu's ack emulation, with unacked records written per batch (`record_batch`) and, on an event loop,
    acks flushed per loop turn (`flush_acks`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorded: set[str] = set()  # tags whose unacked record `record_batch` already wrote
        self._acks: list[str] = []  # acked tags still in Redis' unacked index
        self._acks_lock = threading.Lock()

    def record_batch(self, payloads: list[dict[str, Any]]) -> None:
        """Writes the unacked records of messages about to be delivered, in one round trip."""
        now = time()
        index: dict[str, float] = {}
        records: dict[str, str] = {}
        for payload in payloads:
            properties = payload["properties"]
            tag, info = properties["delivery_tag"], properties["delivery_info"]
            index[tag] = now
            records[tag] = dumps([payload, info["exchange"], info["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, index).hset(self.unacked_key, mapping=records).execute()
        self._recorded.update(index)

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not getattr(self.channel.connection, "flushes_acks", False):  # no event loop: at once, as kombu does
            super().ack(delivery_tag)
            return
        virtual.QoS.ack(self, delivery_tag)
        with self._acks_lock:
            self._acks.append(delivery_tag)

    def flush_acks(self) -> None:
        """Removes the acked messages' unacked records (one round trip for all of them). If Redis cannot be reached
        they stay, as a failed ack leaves them in kombu: the messages come back after the visibility timeout."""
        with self._acks_lock:
            tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except self.channel.connection_errors as exc:
            log.warning("could not remove %d acked messages from the unacked index: %s", len(tags), exc)


class Channel(redis.Channel):
    QoS = QoS
    _command_client: Any = None
    _has_blmpop: bool | None = None  # learnt from the server on the first pop
    _popping_batches = False  # the pop in flight is a BLMPOP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acked_queues: set[str] = set()  # queues consumed with acks (their messages get unacked records)
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._acked_queues.discard if no_ack else self._acked_queues.add)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def close(self) -> None:
        if self._qos is not None:
            self.qos.flush_acks()
        super().close()

    def _batch_pops(self) -> bool:
        """Whether this channel pops with BLMPOP: the server has it, and every queue it consumes is acked (a
        message of a batch that is not delivered is then restored from its unacked record)."""
        if self.global_keyprefix or not self._acked_queues.issuperset(self.active_queues):
            return False  # kombu's key prefixing knows BRPOP, not BLMPOP
        if self._has_blmpop is None:
            version = str(self.client.info("server").get("redis_version", "0"))
            self._has_blmpop = (
                int(version.split(".", maxsplit=1)[0]) >= 7
            )  # BLMPOP came in Redis 7.0 (Valkey says 7.2.4)
        return self._has_blmpop

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._popping_batches = self._batch_pops()
        if not self._popping_batches:
            super()._brpop_start(timeout)
            return
        queues = [queue for queue in self._queue_cycle.consume(len(self.active_queues)) if queue not in PASSIVE_QUEUES]
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        count = min(BATCH_MAX, self.qos.can_consume_max_estimate() or BATCH_MAX)
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        command = ["BLMPOP", timeout or self.brpop_timeout or 0, len(keys), *keys, "RIGHT", "COUNT", max(1, count)]
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._popping_batches:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next turn reconnects
                raise
            if not reply:
                raise Empty()
            key, items = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payloads = [loads(bytes_to_str(item)) for item in items]
            if len(payloads) > 1:
                self.qos.record_batch(payloads)
            for payload in payloads:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

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

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)

        def flush_acks() -> None:
            for channel in self.cycle._channels:
                channel.qos.flush_acks()

        self.flushes_acks = True  # acks made from now on wait for the loop's next turn
        loop.on_tick.add(flush_acks)


# `broker_transport` value for Celery (kombu resolves it by dotted name).
REDIS_TRANSPORT = f"{__name__}:Transport"
