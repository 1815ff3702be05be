"""The farm's kombu Redis transport: a channel reuses one Redis client for its commands (kombu built one per
publish and ack), rebuilt with its pool; one pop takes every waiting message, recorded unacked before delivery; acks
on an event loop leave Redis together. Real Redis throughout."""

from __future__ import annotations

import os
import uuid

from kombu import Connection, Consumer, Exchange, Queue

from farm.broker_transport import REDIS_TRANSPORT


def test_a_channel_reuses_its_command_client_until_its_pool_is_rebuilt() -> None:
    queue = f"farm-test-transport-{uuid.uuid4().hex}"
    with Connection(os.environ["REDIS_URL"], transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first  # the poller's clients bind a connection

        with connection.SimpleQueue(queue) as simple:
            for n in range(3):
                simple.put({"n": n})
            assert [simple.get(timeout=5).payload["n"] for _ in range(3)] == [0, 1, 2]
            assert channel._create_client() is first

        channel._disconnect_pools()  # what kombu does after a lost connection
        rebuilt = channel._create_client()
        assert rebuilt is not first
        assert rebuilt.connection_pool is channel.pool
        assert rebuilt.ping()
        rebuilt.delete(queue)


def _queue_with_messages(connection: Connection, name: str, count: int) -> Queue:
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with connection.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    return queue


def _unacked_tags(channel) -> set[str]:
    client = channel._create_client()
    return {tag.decode() for tag in client.hkeys(channel.unacked_key)} & {
        tag.decode() for tag in client.zrange(channel.unacked_index_key, 0, -1)
    }


def test_one_pop_takes_every_waiting_message_and_records_them_unacked_before_delivery() -> None:
    name = f"farm-test-batch-{uuid.uuid4().hex}"
    with Connection(os.environ["REDIS_URL"], transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        queue = _queue_with_messages(connection, name, 5)
        delivered: list[tuple[int, bool]] = []

        def on_message(body: dict, message) -> None:
            # Each message's unacked record is in Redis before its callback runs (a crash here loses nothing).
            delivered.append((body["n"], message.delivery_tag in _unacked_tags(channel)))

        with Consumer(channel, [queue], callbacks=[on_message], no_ack=False):
            connection.drain_events(timeout=5)  # one pop
            assert channel._has_blmpop is True  # the test servers are Redis 7 / Valkey 8
            assert delivered == [(n, True) for n in range(5)]
            messages = list(channel.qos._delivered.values())
            assert len(messages) == 5
            for message in messages:
                message.ack()  # no event loop: removed at once, as kombu does
            assert not _unacked_tags(channel) & {m.delivery_tag for m in messages}
        channel._create_client().delete(name)


def test_acks_on_an_event_loop_leave_redis_together_at_the_next_turn() -> None:
    name = f"farm-test-acks-{uuid.uuid4().hex}"
    with Connection(os.environ["REDIS_URL"], transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        queue = _queue_with_messages(connection, name, 3)
        with Consumer(channel, [queue], callbacks=[lambda body, message: None], no_ack=False):
            connection.drain_events(timeout=5)
            messages = list(channel.qos._delivered.values())
            tags = {m.delivery_tag for m in messages}
            assert tags <= _unacked_tags(channel)
            channel.connection.flushes_acks = True  # what `Transport.register_with_event_loop` sets
            for message in messages:
                message.ack()
            assert tags <= _unacked_tags(channel)  # still in Redis until the loop turns
            channel.qos.flush_acks()
            assert not tags & _unacked_tags(channel)
        channel._create_client().delete(name)


def test_a_batch_whose_consumer_dies_before_acking_comes_back() -> None:
    name = f"farm-test-lost-{uuid.uuid4().hex}"
    url = os.environ["REDIS_URL"]
    with Connection(url, transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        queue = _queue_with_messages(connection, name, 4)
        with Consumer(channel, [queue], callbacks=[lambda body, message: None], no_ack=False):
            connection.drain_events(timeout=5)
            tags = {m.delivery_tag for m in channel.qos._delivered.values()}
            assert len(tags) == 4
            channel.qos._delivered.clear()  # the process "dies": nothing acked, nothing restored by it
    # Any later consumer restores messages whose records are older than the visibility timeout.
    with Connection(url, transport=REDIS_TRANSPORT, transport_options={"visibility_timeout": 0}) as connection:
        channel = connection.default_channel
        channel.qos.restore_visible(num=100, interval=1)
        bodies: list[int] = []
        assert not tags & _unacked_tags(channel)
        with Consumer(channel, [queue], callbacks=[lambda body, message: bodies.append(body["n"])], no_ack=False):
            connection.drain_events(timeout=5)
            assert sorted(bodies) == [0, 1, 2, 3]
            for message in list(channel.qos._delivered.values()):
                message.ack()
        channel._create_client().delete(name)


def test_a_message_rejected_with_requeue_goes_back_to_its_queue() -> None:
    """What `tasks.inference` does when a claim cannot reach Redis (`Reject(requeue=True)`): on a worker's event loop
    (acks flushed per turn), the batch-recorded message leaves the unacked index and is delivered again."""
    name = f"farm-test-reject-{uuid.uuid4().hex}"
    with Connection(os.environ["REDIS_URL"], transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        queue = _queue_with_messages(connection, name, 2)
        bodies: list[int] = []
        with Consumer(channel, [queue], callbacks=[lambda body, message: bodies.append(body["n"])], no_ack=False):
            connection.drain_events(timeout=5)
            channel.connection.flushes_acks = True  # what `Transport.register_with_event_loop` sets
            first, second = channel.qos._delivered.values()
            first.reject(requeue=True)
            second.ack()
            channel.qos.flush_acks()
            assert not {first.delivery_tag, second.delivery_tag} & _unacked_tags(channel)
            assert channel._create_client().llen(name) == 1
            connection.drain_events(timeout=5)
            assert bodies == [0, 1, 0]  # the rejected one came back
            for message in list(channel.qos._delivered.values()):
                message.ack()
            channel.qos.flush_acks()
        channel._create_client().delete(name)


def test_servers_without_blmpop_get_kombus_brpop() -> None:
    name = f"farm-test-brpop-{uuid.uuid4().hex}"
    with Connection(os.environ["REDIS_URL"], transport=REDIS_TRANSPORT) as connection:
        channel = connection.default_channel
        channel._has_blmpop = False  # as on Redis 6
        queue = _queue_with_messages(connection, name, 2)
        bodies: list[int] = []
        with Consumer(channel, [queue], callbacks=[lambda body, message: bodies.append(body["n"])], no_ack=False):
            connection.drain_events(timeout=5)
            assert bodies == [0]  # one message per pop
            connection.drain_events(timeout=5)
            assert bodies == [0, 1]
            for message in list(channel.qos._delivered.values()):
                message.ack()
        channel._create_client().delete(name)
