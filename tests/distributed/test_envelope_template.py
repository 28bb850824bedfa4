"""The Redis envelope cut from a template is, character for character, the envelope encoded
whole, for any label, queue, time limit and attempt; a message of another shape is encoded
whole."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from orchestrator.contracts.runspec import RunSpec
from orchestrator.executors.celery.messages import DeliveryTags, MessageBuilder, RunMessage

AWKWARD = 'tab\t"quote" back\\slash new\nline é 雪 \x01 \u2028'


def _spec(index: int) -> RunSpec:
    return RunSpec(
        study_id=f"study-{AWKWARD}",
        run_id=f"run-{index:04d}",
        condition_id="cond-a",
        replicate=1 + index,
        seed=2**40 + index,
        agent_id=[None, 3, AWKWARD][index % 3],
        problem_id="noop",
        factor_assignments={"prompt": AWKWARD, "t": 0.5},
        index=index,
        condition_fingerprint='{"f":1}',
    )


def _whole(builder: MessageBuilder, message: RunMessage, tag: str) -> str:
    """The envelope as one JSON encoding of kombu's dict (what the template replaces)."""
    return json.dumps(
        {
            "body": base64.b64encode(message.body.encode()).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers,
            "properties": {
                "correlation_id": message.task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": builder.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": tag,
            },
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


@pytest.mark.parametrize("hard_limit_s", [None, 12.5])
@pytest.mark.parametrize("queue", ["studyq", f"q-{AWKWARD}"])
def test_the_template_gives_the_whole_encoding(hard_limit_s: float | None, queue: str) -> None:
    # Given one builder's messages with every kind of label, attempt and agent
    builder = MessageBuilder(queue=queue, origin=f"1@{AWKWARD}", hard_limit_s=hard_limit_s)
    tags = DeliveryTags()
    labels = ["", "terse | s20ms", AWKWARD, "x" * 300]
    for index in range(24):
        message = builder.build(_spec(index), index % 5, labels[index % 4])
        tag = tags()
        # When it is encoded (the first one makes the template, the others are cut from it)
        envelope = builder.envelope(message, tag)
        # Then it is the whole encoding, and kombu reads back the message's body
        assert envelope == _whole(builder, message, tag)
        assert base64.b64decode(json.loads(envelope)["body"]).decode() == message.body


def test_a_message_of_another_shape_is_encoded_whole() -> None:
    # Given a builder whose template was made from its first message
    builder = MessageBuilder(queue="studyq", origin="1@host", hard_limit_s=None)
    first = builder.build(_spec(0), 0, "a")
    builder.envelope(first, "tag-0")
    # When a message from another origin, or with an extra header, is encoded
    other = MessageBuilder(queue="studyq", origin="2@elsewhere", hard_limit_s=3.0).build(
        _spec(1), 0, "b"
    )
    extra = replace(first, headers={**first.headers, "x-extra": AWKWARD})
    # Then its own headers are what the envelope carries
    for message in (other, extra):
        envelope = builder.envelope(message, "tag-1")
        assert envelope == _whole(builder, message, "tag-1")
        assert json.loads(envelope)["headers"] == message.headers
