"""The farm's kombu Redis transport: a channel reuses one Redis client for its commands (kombu built one per
publish and ack), rebuilt with its pool; messages still go through, and the consumer's own client stays kombu's."""

from __future__ import annotations

import os
import uuid

from kombu import Connection

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
