"""The publishing side and the app's configuration: the message on the wire, as Redis holds
it, and the settings every worker runs with."""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time
from typing import Any

import pytest
import redis
from dist_studies import make_sweep, worker_settings
from publishing import publish_runs

from orchestrator.cli import build_parser
from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.wire import TASK_NAME
from orchestrator.executors.celery.messages import DeliveryTags, MessageBuilder
from orchestrator.store import ResultStore
from workers import serve
from workers.app import StudyqCelery, create_app
from workers.redis_clients import patch_redis_channel


@pytest.mark.redis_only("reads the message as Redis holds it")
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_publish_runs_puts_one_readable_json_message_per_run_on_the_queue(
    pg_store: ResultStore, publisher: StudyqCelery, queue: str, redis_db: redis.Redis
):
    # Given three queued runs
    study = make_sweep(pg_store, agents=["noop"], replicates=3)
    # When they are published for attempt 2 with a 30 s time limit
    published = publish_runs(
        publisher, study.publishable(attempt=2), queue=queue, time_limit_s=30, sent_events=False
    )
    # Then the queue holds three JSON task messages, oldest first, each naming its run
    assert published == 3
    raw = [json.loads(item) for item in reversed(redis_db.lrange(queue, 0, -1))]
    assert len(raw) == 3
    for spec, envelope in zip(study.specs, raw, strict=True):
        headers = envelope["headers"]
        assert envelope["content-type"] == "application/json"
        assert headers["task"] == TASK_NAME
        assert headers["id"] == f"{spec.run_id}.{spec.index}.2"
        assert headers["timelimit"] == [31.0, None]  # + the test grace of 1 s
        assert headers["eta"] is None and headers["expires"] is None
        assert headers["argsrepr"].startswith(f"study={study.study_id} cond=")
        assert f"agent=noop problem=noop rep={spec.replicate}" in headers["argsrepr"]
        args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
        assert args == [] and kwargs["attempt"] == 2
        assert RunSpec.from_message(kwargs["spec"]) == spec
        assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        assert envelope["properties"]["correlation_id"] == headers["id"]


@pytest.mark.redis_only("compares envelopes as Redis holds them")
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_run_message_is_the_envelope_kombu_itself_would_store(
    pg_store: ResultStore, publisher: StudyqCelery, queue: str, redis_db: redis.Redis
):
    # Given one run published by publish_runs (its own LPUSH of a pre-built envelope)
    study = make_sweep(pg_store, agents=["noop"])
    publish_runs(publisher, study.publishable(attempt=1), queue=queue, sent_events=False)
    [ours] = [json.loads(item) for item in redis_db.lrange(queue, 0, -1)]
    redis_db.delete(queue)
    # When kombu's own producer publishes the same body and headers
    message = MessageBuilder(queue=queue, origin="o", hard_limit_s=None).build(
        study.specs[0], 1, study.labels.get(study.specs[0].condition_id, "")
    )
    with publisher.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange="",
            routing_key=queue,
            headers=ours["headers"],
            content_type="application/json",
            content_encoding="utf-8",
            correlation_id=message.task_id,
            reply_to="",
            delivery_mode=2,
        )
    [kombus] = [json.loads(item) for item in redis_db.lrange(queue, 0, -1)]
    # Then both envelopes are the same but for the per-message delivery tag
    assert ours["properties"].pop("delivery_tag") != kombus["properties"].pop("delivery_tag")
    assert ours == kombus


def test_delivery_tags_are_unique_uuids():
    tags = DeliveryTags()
    drawn = [tags() for _ in range(10_000)] + [DeliveryTags()() for _ in range(100)]
    assert len(set(drawn)) == len(drawn)
    assert all(len(tag) == 36 and tag.count("-") == 4 for tag in drawn)


UNUSED_DB = "sqlite:///never-opened.db"


def test_the_app_is_json_only_acks_late_and_prefetches_one():
    app = create_app(worker_settings(UNUSED_DB, visibility_timeout_s=1234.0))
    conf = app.conf
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.broker_transport_options == {"visibility_timeout": 1234.0}
    assert TASK_NAME in app.tasks


def test_an_app_without_a_broker_url_says_how_to_set_it():
    with pytest.raises(StudyError, match="STUDYQ_BROKER_URL"):
        create_app(worker_settings(UNUSED_DB, broker_url=None))


def _worker_parser() -> argparse.ArgumentParser:
    return build_parser()


def test_the_worker_command_takes_concurrency_pool_queues_and_log_level():
    args = _worker_parser().parse_args(
        ["worker", "-c", "3", "--pool", "threads", "-Q", "a,b", "--queues", "c", "-l", "debug"]
    )
    assert (args.concurrency, args.pool, args.queues, args.loglevel) == (
        3,
        "threads",
        ["a", "b", "c"],
        "DEBUG",
    )


def test_the_worker_command_refuses_an_unknown_pool(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        _worker_parser().parse_args(["worker", "--pool", "gevent"])
    assert exit_info.value.code == 2
    assert "example:" in capsys.readouterr().err


def test_the_worker_banner_masks_passwords():
    settings = worker_settings(
        "postgresql://studyq:s3cret@db.example/studyq", broker_url="redis://:t0ken@redis:6379/0"
    )
    banner = serve.describe(settings, pool="prefork", concurrency=2, queues=["studyq"])
    assert "s3cret" not in banner and "t0ken" not in banner
    assert "postgresql://studyq:***@db.example/studyq" in banner
    assert "redis://:***@redis:6379/0" in banner


@pytest.mark.redis_only("waits on Redis' PUBSUB NUMPAT")
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_task_sent_events_reach_celery_event_receivers(
    pg_store: ResultStore, publisher: StudyqCelery, queue: str, redis_db: redis.Redis
):
    # Given a Celery event receiver (what Flower runs) listening
    study = make_sweep(pg_store, agents=["noop"], replicates=250)
    ours = {f"{spec.run_id}.{spec.index}.0" for spec in study.specs}
    received: list[dict[str, Any]] = []
    subscribed_before = int(redis_db.execute_command("PUBSUB", "NUMPAT"))
    with publisher.connection_for_read() as connection:

        def on_sent(event: dict[str, Any]) -> None:
            if event["uuid"] in ours:  # other tests' publishers share the broker
                received.append(event)
            receiver.should_stop = len(received) == len(ours)

        receiver = publisher.events.Receiver(connection, handlers={"task-sent": on_sent})
        listener = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=20, wakeup=False), daemon=True
        )
        listener.start()
        deadline = time.monotonic() + 10
        while int(redis_db.execute_command("PUBSUB", "NUMPAT")) <= subscribed_before:
            assert time.monotonic() < deadline, "the receiver never subscribed"
            time.sleep(0.02)
        # When runs are published with sent events on (three task.multi messages of them)
        publish_runs(publisher, study.publishable(), queue=queue, sent_events=True)
        listener.join(20)
    # Then it saw one task-sent event per run, in order, named and described as in the message
    assert [event["uuid"] for event in received] == [
        f"{spec.run_id}.{spec.index}.0" for spec in study.specs
    ]
    for event in received:
        assert event["name"] == TASK_NAME and event["queue"] == queue
        assert event["args"].startswith(f"study={study.study_id}")
        assert {"hostname", "timestamp", "clock", "pid", "utcoffset"} <= set(event)


@pytest.mark.redis_only("kombu's Redis channel")
@pytest.mark.integration
def test_a_kombu_channel_keeps_one_sync_redis_client_until_its_pool_changes(
    publisher: StudyqCelery,
):
    # Given the patch create_app applies (one sync client per channel)
    assert patch_redis_channel() is True
    with publisher.connection_for_write() as connection:
        channel = connection.default_channel
        # Then every synchronous command of the channel goes through the same client...
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.ping()
        # ...the consumer loop's asynchronous client is still built apart...
        assert channel._create_client(asynchronous=True) is not first
        # ...and a channel that replaced its pool (a reconnect) gets a client on the new one
        channel._pool = None
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
            assert third.ping()
