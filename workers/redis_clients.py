"""One Redis client per kombu channel, instead of one per acknowledgement and per event.

kombu 5.7's Redis channel builds a new ``redis.Redis`` object for every synchronous command
it sends outside its consumer loop: each message acknowledgement (``QoS.ack``), each
``QoS.append`` and each event ``PUBLISH``. With redis-py 8 building one costs about as much
as a no-op task (it copies a table of ~200 response callbacks), so it was the largest single
item in a worker's main process (docs/benchmarks.md, py-spy). The clients all share the
channel's connection pool, and a ``redis.Redis`` is safe to share between threads (every
command takes a connection from the pool), so the channel can keep the one it built.

:func:`reuse_sync_clients` makes it do so: the channel's synchronous client is built once
and rebuilt only when the channel replaced its pool (a reconnect). Asynchronous clients (the
consumer loop's) are left alone. Applied once per process by :func:`workers.app.create_app`;
a kombu without this method is left unpatched.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

__all__ = ["reuse_sync_clients"]

_ATTRIBUTE = "_studyq_sync_client"


def reuse_sync_clients() -> bool:
    """Patch kombu's Redis channel (idempotent); False if this kombu has no such method."""
    channel_cls: Any = kombu_redis.Channel
    original = getattr(channel_cls, "_create_client", None)
    if original is None:
        return False
    if getattr(original, "_studyq_reuses", False):
        return True

    def create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        client = self.__dict__.get(_ATTRIBUTE)
        if client is None or client.connection_pool is not self.pool:
            client = original(self)
            self.__dict__[_ATTRIBUTE] = client
        return client

    create_client._studyq_reuses = True  # type: ignore[attr-defined]
    channel_cls._create_client = create_client
    return True
