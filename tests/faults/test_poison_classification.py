"""The check every popped broker item goes through (``workers.poison``), the dead-letter entry
(``orchestrator.contracts.deadletters``) and the quarantine transport (``workers.quarantine``),
without Celery: the classification is a plain function; the transport runs on kombu and the real
Redis. ``test_poison_messages.py`` sends the same messages to real workers."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from fault_services import shared_broker_url, shared_redis
from fault_study import FAULT_SWEEP, prepared
from kombu import Connection, Consumer, Exchange, Queue
from kombu.exceptions import ContentDisallowed
from poison_catalogue import LARGE_BYTES, Hostile, genuine, hostile_messages
from publishing import publish_runs

from orchestrator.contracts.deadletters import RAW_LIMIT, DeadLetter, Reason, dead_letter_key
from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME
from workers import quarantine as quarantine_module
from workers.app import create_app
from workers.consumer import StudyqConsumer
from workers.poison import Poison, inspect_envelope
from workers.quarantine import KOMBU_CHECKED, TRANSPORT, kombu_drift, quarantine
from workers.runtask import InvalidRunMessage, parse_delivery
from workers.tasks import _run_arguments

MAX_BYTES = Settings().max_message_bytes
QUEUE = "studyq-poison-unit"


@pytest.fixture(scope="module")
def spec() -> RunSpec:
    return next(iter(prepared(FAULT_SWEEP, queue=QUEUE).run_specs()))


def catalogue() -> list[Hostile]:
    first = next(iter(prepared(FAULT_SWEEP, queue=QUEUE).run_specs()))
    return hostile_messages(QUEUE, first)


def check(raw: bytes) -> dict[str, Any]:
    return inspect_envelope(raw, max_bytes=MAX_BYTES, tasks=(TASK_NAME,))


def test_the_catalogue_has_at_least_25_distinct_hostile_messages():
    # Given the catalogue the fault test pushes onto a real queue
    messages = catalogue()
    # Then it has at least 25 messages, no two alike, covering every reason but the ones only
    # Celery's own hooks can give, ``mismatch`` (a well-formed message that disagrees
    # with the store: tests/distributed/test_forged_messages.py) and ``unknown_study`` (one
    # of a study long gone from the database: tests/distributed/test_shared_queue.py)
    assert len(messages) >= 25
    assert len({m.raw for m in messages}) == len({m.name for m in messages}) == len(messages)
    wellformed = {Reason.INVALID_TASK, Reason.MISMATCH, Reason.UNKNOWN_STUDY}
    assert {m.reason for m in messages} == set(Reason) - wellformed


@pytest.mark.parametrize("hostile", catalogue(), ids=lambda hostile: hostile.name)
def test_each_hostile_message_is_refused_with_its_reason(hostile: Hostile):
    # Given a hostile message, as a raw queue item
    # When a worker's transport checks it (and, once accepted, the run task reads its
    # arguments)
    try:
        payload = check(hostile.raw)
    except Poison as poison:
        # Then it is refused for its reason, with a readable detail and its task id if any
        assert (poison.reason, poison.task_id) == (hostile.reason, hostile.task_id)
        assert poison.detail and len(poison.detail) < 600
        return
    # Then only a message whose envelope is genuine gets through, and the run task refuses
    # its arguments
    assert hostile.reason is Reason.INVALID_RUN, f"{hostile.name} was accepted"
    args, kwargs, _ = json.loads(base64.b64decode(payload["body"]))
    with pytest.raises(InvalidRunMessage):
        parse_delivery(*_run_arguments(tuple(args), kwargs))


def test_a_genuine_run_message_is_accepted_unchanged(spec: RunSpec):
    # Given the envelope studyq's publisher pushes for a run
    envelope = genuine(QUEUE, spec, "task-1")
    raw = json.dumps(envelope).encode()
    # When the transport checks it
    payload = check(raw)
    # Then it is handed to kombu exactly as decoded, and its arguments are the run's
    assert payload == envelope
    args, kwargs, _ = json.loads(base64.b64decode(payload["body"]))
    assert parse_delivery(*_run_arguments(tuple(args), kwargs)) == (spec, 0)


def test_the_size_limit_is_a_setting(spec: RunSpec):
    # Given a genuine message a little over 1 MiB
    envelope = genuine(QUEUE, spec, "task-2")
    envelope["headers"]["argsrepr"] = "x" * LARGE_BYTES
    raw = json.dumps(envelope).encode()
    # When it is checked with the default limit, and with a raised one
    with pytest.raises(Poison) as refused:
        check(raw)
    accepted = inspect_envelope(raw, max_bytes=2 * LARGE_BYTES, tasks=(TASK_NAME,))
    # Then the default refuses it, naming the setting; the raised limit lets it through
    assert refused.value.reason is Reason.TOO_LARGE
    assert "STUDYQ_MAX_MESSAGE_BYTES" in refused.value.detail
    assert accepted == envelope


def test_a_broadcast_is_checked_as_an_envelope_only(spec: RunSpec):
    # Given a remote-control broadcast (no task headers) and a broken one
    control = genuine(QUEUE, spec, "c")
    control["headers"] = {}
    control["body"] = base64.b64encode(b'{"method": "ping"}').decode()
    # When each is checked as a broadcast (no task names)
    # Then the well-formed one passes, the broken one is refused
    assert inspect_envelope(json.dumps(control), max_bytes=MAX_BYTES) == control
    with pytest.raises(Poison):
        inspect_envelope(b'{"body": 5}', max_bytes=MAX_BYTES)


# -- the dead-letter entry --------------------------------------------------------------------


def test_a_dead_letter_round_trips_and_clips_the_raw_message():
    # Given a quarantined message of 10,000 bytes
    now = datetime(2026, 12, 6, 20, 0, tzinfo=UTC)
    letter = DeadLetter.new(
        Reason.NOT_JSON, "not JSON", queue="q", worker="w@h:1", raw=b"x" * 10_000, now=now
    )
    # When it is stored and read back
    back = DeadLetter.from_json(letter.to_json())
    # Then every field survives; the raw message is clipped, its size is the original's
    assert back == letter
    assert (back.size, len(back.raw), back.time) == (10_000, RAW_LIMIT, now.isoformat())
    assert back.preview(20) == "x" * 17 + "..."


def test_an_entry_someone_else_wrote_reads_as_unreadable():
    # Given list entries that are not studyq's
    # When they are read
    entries = [DeadLetter.from_json(text) for text in (b"junk", '{"reason": 1}', "[]")]
    # Then each is an "unreadable" entry carrying its text, never an error
    assert [entry.reason for entry in entries] == ["unreadable"] * 3
    assert entries[0].raw == "junk"


# -- the quarantine transport on the real Redis (kombu only) -----------------------------------


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = shared_redis()
    yield client
    client.close()


@pytest.fixture
def queue(client: redis.Redis) -> Iterator[str]:
    name = f"studyq-poison-unit-{uuid.uuid4().hex[:8]}"
    yield name
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)


class _Channel:
    """What :func:`quarantine` uses of a kombu channel: its connection pool and key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "") -> None:
        self.pool = client.connection_pool
        self.global_keyprefix = prefix


@pytest.mark.integration
def test_quarantine_keeps_the_newest_entries_up_to_the_bound(
    client: redis.Redis, queue: str, monkeypatch: pytest.MonkeyPatch
):
    # Given a dead-letter bound of 5
    monkeypatch.setattr(quarantine_module, "DEAD_LETTER_LIMIT", 5)
    # When 8 messages are quarantined
    for number in range(8):
        poison = Poison(Reason.NOT_JSON, f"message {number}", f"id-{number}")
        quarantine(_Channel(client), poison, queue=queue, raw=f"raw {number}", worker="w@h:1")
    # Then the list holds the newest 5, newest first
    entries = [DeadLetter.from_json(e) for e in client.lrange(dead_letter_key(queue), 0, -1)]
    assert [entry.task_id for entry in entries] == [f"id-{n}" for n in (7, 6, 5, 4, 3)]
    assert {(entry.reason, entry.queue, entry.worker) for entry in entries} == {
        ("not_json", queue, "w@h:1")
    }


@pytest.mark.integration
def test_quarantine_honours_kombus_key_prefix(client: redis.Redis, queue: str):
    # Given a broker whose kombu keys carry a global prefix
    # When a message is quarantined
    poison = Poison(Reason.NOT_JSON, "junk")
    quarantine(_Channel(client, "pfx:"), poison, queue=queue, raw=b"junk", worker="w")
    # Then the list is under the prefixed key, and was trimmed there (one entry)
    assert client.llen(f"pfx:studyq.dead.{queue}") == 1
    assert client.exists(dead_letter_key(queue)) == 0
    client.delete(f"pfx:studyq.dead.{queue}")


@pytest.mark.integration
def test_the_quarantine_transport_delivers_only_accepted_messages(
    client: redis.Redis, queue: str, spec: RunSpec
):
    # Given a kombu consumer on the quarantine transport (what a worker's consumer uses),
    # and a queue holding a poison message, then a genuine one
    received: list[Any] = []
    exchange = Exchange(queue, type="direct")
    with Connection(
        shared_broker_url(),
        transport=TRANSPORT,
        transport_options={"studyq_worker": "unit@test:1"},
    ) as connection:
        channel = connection.default_channel
        bound = Queue(queue, exchange, routing_key=queue)(channel)
        bound.declare()
        client.lpush(queue, b'{"body": 5}')
        client.lpush(queue, json.dumps(genuine(queue, spec, "genuine-1")))
        with Consumer(
            channel, [bound], callbacks=[lambda body, m: received.append(m)], accept=["json"]
        ):
            # When the consumer drains the queue
            for _ in range(4):
                try:
                    connection.drain_events(timeout=1)
                except TimeoutError:
                    break
        # Then only the genuine message reached kombu's callback (and the unacked hash); the
        # poison is in the dead-letter list, named by the consumer's worker
        assert [message.headers["id"] for message in received] == ["genuine-1"]
        unacked = [json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")
                   if json.loads(raw)[2] == queue]  # fmt: skip
        assert unacked == ["genuine-1"]
        for message in received:
            message.ack()
    [entry] = [DeadLetter.from_json(e) for e in client.lrange(dead_letter_key(queue), 0, -1)]
    assert (entry.reason, entry.worker, entry.raw) == ("not_envelope", "unit@test:1", '{"body": 5}')
    assert client.llen(queue) == 0


def test_kombu_is_still_what_the_quarantine_transport_was_checked_against():
    # Given the kombu methods workers/quarantine.py copies or relies on
    # When their source is compared with the digests pinned when it was written
    drift = kombu_drift()
    # Then none changed: if one did, re-read it, update workers/quarantine.py, re-pin
    assert drift == [], (
        f"kombu changed under workers/quarantine.py (checked against kombu {KOMBU_CHECKED}): "
        f"{drift}. Re-check the copied _brpop_read and what it relies on, then update "
        "KOMBU_SOURCES."
    )


# -- Celery's refusal hooks, and the publisher ---------------------------------------------


def _hook_calls() -> list[tuple[str, Callable[[StudyqConsumer, Any], None], Reason]]:
    return [
        (
            "unknown task",
            lambda c, m: c.on_unknown_task(None, m, KeyError("x")),
            Reason.UNKNOWN_TASK,
        ),
        (
            "invalid task",
            lambda c, m: c.on_invalid_task(None, m, ValueError("x")),
            Reason.INVALID_TASK,
        ),
        ("unknown message", lambda c, m: c.on_unknown_message(None, m), Reason.PROTOCOL),
        (
            "disallowed content",
            lambda c, m: c.on_decode_error(m, ContentDisallowed("pickle")),
            Reason.CONTENT_TYPE,
        ),
        ("undecodable", lambda c, m: c.on_decode_error(m, ValueError("x")), Reason.BAD_BODY),
    ]


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,hook,reason", _hook_calls(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_celerys_refusal_hooks_quarantine_and_acknowledge(
    client: redis.Redis, queue: str, spec: RunSpec, name: str, hook: Any, reason: Reason
):
    # Given a message delivered through kombu's own transport (no check before Celery's
    # hooks), held unacknowledged
    received: list[Any] = []
    with Connection(shared_broker_url()) as connection:
        channel = connection.default_channel
        bound = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)(channel)
        bound.declare()
        client.lpush(queue, json.dumps(genuine(queue, spec, "hook-1")))
        with Consumer(channel, [bound], on_message=received.append):
            connection.drain_events(timeout=2)
        [message] = received
        assert client.hexists("unacked", message.delivery_tag)
        consumer = StudyqConsumer.__new__(StudyqConsumer)  # only the hooks are used
        consumer.hostname = "hook@test"
        consumer.connection_errors = connection.connection_errors
        # When Celery's consumer calls one of its refusal hooks for it
        hook(consumer, message)
        # Then it is dead-lettered with the hook's reason and acknowledged
        assert not client.hexists("unacked", message.delivery_tag)
    [entry] = [DeadLetter.from_json(e) for e in client.lrange(dead_letter_key(queue), 0, -1)]
    assert (entry.reason, entry.task_id, entry.queue) == (reason, "hook-1", queue)
    assert entry.worker.startswith("hook@test:") and '"hook-1"' in entry.raw


@pytest.mark.integration
def test_the_publisher_refuses_a_message_workers_would_quarantine(
    client: redis.Redis, queue: str, spec: RunSpec
):
    # Given a coordinator whose STUDYQ_MAX_MESSAGE_BYTES is 4 KiB, and a run whose factor
    # value alone is 5,000 characters
    app = create_app(Settings(broker_url=shared_broker_url(), max_message_bytes=4096))
    big = replace(spec, factor_assignments={**spec.factor_assignments, "note": "y" * 5000})
    try:
        # When it publishes that run, and then an ordinary one
        with pytest.raises(StudyError) as refused:
            publish_runs(app, [(big, 0, "")], queue=queue, sent_events=False)
        published = publish_runs(app, [(spec, 0, "")], queue=queue, sent_events=False)
    finally:
        app.close()
    # Then the large one is refused, naming the setting, and only the ordinary one is queued
    assert "STUDYQ_MAX_MESSAGE_BYTES" in str(refused.value)
    assert (published, client.llen(queue)) == (1, 1)
