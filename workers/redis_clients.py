"""Two patches of kombu's Redis channel that studyq workers and publishers run with.

**One Redis client per channel** (``_reuse_sync_clients``). kombu 5.7's Redis channel
builds a new ``redis.Redis`` object for every synchronous command it sends outside its
consumer loop: each message acknowledgement (``QoS.ack``), each ``QoS.append`` and each
event ``PUBLISH``. With redis-py 8 building one costs about as much as a no-op task (it
copies a table of ~200 response callbacks), so it was the largest single item in a worker's
main process (docs/benchmarks.md, py-spy). The clients all share the channel's connection
pool, and a ``redis.Redis`` is safe to share between threads (every command takes a
connection from the pool), so the channel keeps the one it built, and builds another only
when it replaced its pool (a reconnect). Asynchronous clients (the consumer loop's) are left
alone.

**A channel whose connection is gone fails with a connection error**
(:func:`refuse_detached_pools`), a workaround for kombu 5.7.0 (the newest release; the code
below is the same in kombu's repository). When a worker loses Redis, Celery's consumer calls
``Connection.collect()`` and then ``Connection.close()``. While Redis is down, ``collect()``
can leave a channel open: ``Channel.close`` of a channel waiting on ``BRPOP`` re-raises the
connection error from ``_brpop_read`` before closing anything, and
``Transport.close_connection`` stops at the first channel that raises. ``collect()`` then
detaches the transport (``transport.client = None``) anyway, and ``close()`` closes the left
over default channel: restoring its unacknowledged messages needs a new connection pool, and
``Channel._connparams`` reads ``self.connection.client.hostname``. The ``AttributeError``
is not one of the connection errors Celery ignores there, so it logs ``Unrecoverable error``
and the worker exits. With this patch ``_connparams`` of a channel whose ``Connection`` was
closed raises ``redis.exceptions.ConnectionError`` instead, which kombu and Celery handle as
everywhere else: the close is abandoned, the worker reconnects. The messages it could not
restore (or, later, acknowledge on the old channel) stay in Redis's unacknowledged set, as
when Redis is unreachable during an ordinary close, and Redis redelivers them after the
visibility timeout; a run that finished meanwhile refuses the duplicate
(:mod:`workers.runtask`). ``tests/faults/test_faults_services.py`` replays the sequence on a
real Redis, with and without the patch, and fails when kombu no longer needs it.

:func:`patch_redis_channel` applies both, once per process (:func:`workers.app.create_app`
calls it); a kombu without a method a patch replaces is left unpatched there.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["patch_redis_channel", "refuse_detached_pools"]

_ATTRIBUTE = "_studyq_sync_client"


def patch_redis_channel() -> bool:
    """Apply both patches (idempotent); False if this kombu lacks a method one replaces."""
    reused = _reuse_sync_clients()
    refused = refuse_detached_pools()
    return reused and refused


def _reuse_sync_clients() -> bool:
    """Keep one synchronous client per channel; False if this kombu has no ``_create_client``."""
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
    create_client.__wrapped__ = original  # type: ignore[attr-defined]
    channel_cls._create_client = create_client
    return True


def refuse_detached_pools() -> bool:
    """Make ``_connparams`` of a channel whose ``Connection`` was closed raise a connection
    error instead of ``AttributeError``; False if this kombu has no ``_connparams``."""
    channel_cls: Any = kombu_redis.Channel
    original = getattr(channel_cls, "_connparams", None)
    if original is None:
        return False
    if getattr(original, "_studyq_refuses_detached", False):
        return True

    def connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError(
                "this kombu channel's broker connection was closed (the connection to Redis "
                "was lost), so it opens no new one; its unacknowledged messages stay in Redis "
                "until the visibility timeout"
            )
        return original(self, asynchronous=asynchronous)

    connparams._studyq_refuses_detached = True  # type: ignore[attr-defined]
    connparams.__wrapped__ = original  # type: ignore[attr-defined]
    channel_cls._connparams = connparams
    return True
