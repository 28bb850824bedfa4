"""Which broker a URL names, and the broker options the coordinator and workers must agree on.

Two brokers work, both through Celery (:mod:`orchestrator.executors.celery` publishes,
:mod:`workers.app` consumes); docs/distributed.md compares them::

    redis      redis://, rediss://, unix://   the default and the documented path
    rabbitmq   amqp://, amqps://, pyamqp://   quorum queues, publisher confirms

Both sides build their Celery configuration from :func:`celery_broker_conf`, so a queue the
coordinator declares before publishing (RabbitMQ drops a message routed to no queue) has
exactly the arguments the workers declare it with: a quorum queue declared once as classic
would refuse every later declaration. Nothing here imports Celery, kombu or a client.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from orchestrator.contracts.errors import SettingsError

__all__ = [
    "BROKER_SCHEMES",
    "BrokerKind",
    "broker_kind",
    "celery_broker_conf",
    "secure_broker_url",
    "supported_broker_url",
]


class BrokerKind(StrEnum):
    """The brokers studyq runs on."""

    REDIS = "redis"
    RABBITMQ = "rabbitmq"


_SCHEMES: dict[str, BrokerKind] = {
    "redis": BrokerKind.REDIS,
    "rediss": BrokerKind.REDIS,
    "unix": BrokerKind.REDIS,
    "amqp": BrokerKind.RABBITMQ,
    "amqps": BrokerKind.RABBITMQ,
    "pyamqp": BrokerKind.RABBITMQ,
}

BROKER_SCHEMES = tuple(_SCHEMES)
"""Broker URL schemes studyq works with."""

QUEUE_TYPE = "quorum"
"""RabbitMQ queue type of every run queue: replicated, and a message is confirmed to the
publisher only once a majority of the queue's replicas has it on disk."""


def broker_kind(url: str, *, source: str = "STUDYQ_BROKER_URL") -> BrokerKind:
    """The broker ``url`` names.

    Raises:
        SettingsError: a scheme studyq does not support (kombu would fail with a bare
            ``KeyError``); the message names ``source`` and the schemes that work, never
            the URL's password.
    """
    scheme, sep, _ = url.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        shown = f"'{scheme}://'" if sep else "no scheme"
        raise SettingsError(
            f"{source}: the broker URL has {shown}, which studyq does not support; the "
            "broker is Redis (redis://, rediss://, unix://) or RabbitMQ (amqp://, amqps://). "
            f"Fix: set {source} to e.g. redis://127.0.0.1:6379/0 or "
            "amqp://USER:PASSWORD@127.0.0.1:5672/VHOST."
        )
    return kind


def secure_broker_url(url: str) -> str:
    """``rediss://`` verifies the server's certificate unless the URL says otherwise; kombu
    would silently skip verification when ``ssl_cert_reqs`` is missing."""
    if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
        return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
    return url


def supported_broker_url(url: str, *, source: str = "STUDYQ_BROKER_URL") -> str:
    """``url`` made secure (:func:`secure_broker_url`) if studyq supports its broker.

    Raises:
        SettingsError: see :func:`broker_kind`.
    """
    broker_kind(url, source=source)
    return secure_broker_url(url)


def celery_broker_conf(url: str, *, visibility_timeout_s: float) -> dict[str, Any]:
    """The Celery settings of the broker at ``url`` that publisher and consumer share.

    Redis: ``visibility_timeout`` (a delivered message nobody acknowledged comes back after
    it). RabbitMQ: queues created on first use are quorum queues; the broker returns a
    message of a closed connection at once, so there is no visibility timeout (its
    ``consumer_timeout``, 30 min by default, must exceed the longest run instead).
    """
    conf: dict[str, Any] = {"broker_url": url}
    if broker_kind(url) is BrokerKind.REDIS:
        conf["broker_transport_options"] = {"visibility_timeout": visibility_timeout_s}
    else:
        conf["task_default_queue_type"] = QUEUE_TYPE
        conf["task_create_missing_queue_type"] = QUEUE_TYPE
        conf["worker_detect_quorum_queues"] = True
    return conf
