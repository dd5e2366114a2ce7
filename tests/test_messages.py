"""Unit tests: pushlib.messages (pure) and pushlib.msgstore (against the session's redis-server)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from pushlib import messages as m
from pushlib.calls import Binding
from pushlib.models import PushKind
from pushlib.msgstore import MessageStore, StoreOutcome
from pushlib.payloads import build_fcm
from pushlib.redisconn import sync_client
from pushlib.settings import Settings
from tests.support import android

AOR = "sip:bob@example.com"
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(("ctype", "kind"), [
    ("text/plain", m.BodyKind.TEXT), ("Text/Plain; charset=UTF-8", m.BodyKind.TEXT),
    ("message/cpim", m.BodyKind.CPIM), ("application/im-iscomposing+xml", m.BodyKind.COMPOSING),
    ("application/json", m.BodyKind.OTHER), ("", m.BodyKind.OTHER),
])
def test_classify(ctype: str, kind: m.BodyKind) -> None:
    assert m.classify(ctype) is kind


@pytest.mark.parametrize(("ctype", "ok"), [
    ("text/plain", True), ('text/plain; charset="utf-8"', True), ("application/vnd.a+json;v=1", True),
    ("", False), ("text", False), ("text/plain\r\nX-Evil: 1", False), ("text/plain; a=\x01", False),
    ("a/" + "b" * 300, False),
])
def test_content_type_written_back_only_when_well_formed(ctype: str, ok: bool) -> None:
    assert m.valid_content_type(ctype) is ok


def test_preview_texts() -> None:
    cpim = "From: <sip:a@b>\r\n\r\nContent-Type: text/plain\r\n\r\nhi\x07 there"
    assert m.preview(m.BodyKind.TEXT, " hello\x00 ") == "hello"
    assert m.preview(m.BodyKind.CPIM, cpim) == "hi there"
    assert m.preview(m.BodyKind.CPIM, "garbage") == m.GENERIC_TEXT
    assert m.preview(m.BodyKind.CPIM, "a: b\n\nContent-Type: image/png\n\nxx") == m.GENERIC_TEXT
    assert m.preview(m.BodyKind.OTHER, "{}") == m.GENERIC_TEXT
    assert len(m.preview(m.BodyKind.TEXT, "x" * 5000)) == m.PREVIEW_CHARS


@pytest.mark.parametrize(("header", "user", "name", "value"), [
    ('"Alice" <sip:alice@ex.com>;tag=1', "alice", "Alice", '"Alice" <sip:alice@ex.com>'),
    ("<sip:bob@ex.com>;tag=2", "bob", "bob", "<sip:bob@ex.com>"),
    ('"A \\"q\\"" <sip:a@ex.com>', "a", 'A "q"', '"A q" <sip:a@ex.com>'),
    ('"x" <http://evil>', "x", "x", '"x" <sip:anonymous@anonymous.invalid>'),
    ("broken <<", "u", "u", "<sip:anonymous@anonymous.invalid>"),
])
def test_sender_identity_rebuilds_a_safe_from(header: str, user: str, name: str, value: str) -> None:
    assert m.sender_identity(header, user) == (name, value)


def test_limits_from_defines() -> None:
    defs = {"MESSAGE_MAX_BODY": "99999", "MESSAGE_QUEUE_MAX": "5", "MESSAGE_TTL": "0", "MESSAGE_QUEUE_BYTES": "x"}
    limits = m.message_limits(defs.get)
    assert limits.max_body == m.HARD_MAX_BODY and limits.max_count == 5
    assert limits.ttl == m.MessageLimits().ttl and limits.max_bytes == m.MessageLimits().max_bytes


def _plan(kind: m.BodyKind = m.BodyKind.TEXT, size: int = 10, ok: bool = True, awake: bool = False,
          devices: bool | None = True) -> m.MessagePlan:
    dev = android(AOR, "d1", "tok1")
    registered = NOW - (1 if awake else 3600)
    dev = replace(dev, contact="sip:d@1.2.3.4:5060", registered_at=registered, expires_at=NOW + 3600)
    bindings = [Binding(uri="sip:d@1.2.3.4:5060"), Binding(uri="sip:desk@5.6.7.8")]
    return m.plan_message(kind, size, ok, bindings, None if devices is None else [dev], NOW, 10.0, m.MessageLimits())


def test_plan_stores_for_sleeping_devices_and_copies_to_awake_bindings() -> None:
    plan = _plan()
    assert plan.action is m.Action.STORE
    assert [d.device_id for d in plan.store_for] == ["d1"] and [b.uri for b in plan.ring] == ["sip:desk@5.6.7.8"]


def test_plan_relays_when_nobody_sleeps_and_refuses_what_cannot_be_stored() -> None:
    assert _plan(awake=True).action is m.Action.RELAY
    assert (_plan(size=9000).code, _plan(size=9000).reason) == (413, m.TOO_LARGE_REASON)
    assert _plan(ok=False).code == 415
    composing = _plan(kind=m.BodyKind.COMPOSING)
    assert composing.action is m.Action.RELAY_AWAKE and [b.uri for b in composing.ring] == ["sip:desk@5.6.7.8"]
    nobody = m.plan_message(m.BodyKind.TEXT, 1, True, [], [], NOW, 10.0, m.MessageLimits())
    assert nobody.code == 404


def test_message_job_and_its_payload() -> None:
    job = m.message_job(AOR, "abc123", "Zoë", "x" * 3000, ["d1"], NOW, 3600)
    assert job.kind is PushKind.MESSAGE and job.deadline == NOW + 3600
    assert job.job_id == m.message_job(AOR, "abc123", "", "", [], NOW + 5, 1).job_id  # from the message id
    msg = build_fcm(job.kind, android(AOR, "d1", "tok1"), job.data, job.deadline, NOW, Settings())
    assert msg is not None
    body = msg.body.decode()
    assert '"title":"Zoë"' in body and '"message_id":"abc123"' in body and "…" in body


def test_delivery_step_round_trip() -> None:
    step = m.DeliveryStep(AOR, "urn:uuid:1", "sip:d@h;transport=tcp", "", "1-0", "tok", 3)
    assert m.DeliveryStep.decode(step.encode()) == step
    assert m.DeliveryStep.decode("a\tb") is None and m.DeliveryStep.decode(None) is None


def test_delivery_headers() -> None:
    msg = m.StoredMessage("id", "<sip:a@b>", "text/plain", "hi", NOW)
    assert m.delivery_headers(msg) == "Content-Type: text/plain\r\nDate: Fri, 15 Jan 2027 08:00:00 GMT\r\n"


# --------------------------------------------------------------------------- the queue in Redis


@pytest.fixture()
def store(redis_url: str) -> Iterator[MessageStore]:
    client = sync_client(redis_url, 2.0)
    yield MessageStore(client, m.MessageLimits(max_body=100, max_count=5, max_bytes=40, ttl=60))
    client.close()


def _msg(text: str) -> m.StoredMessage:
    return m.StoredMessage(m.new_message_id(), "<sip:a@b>", "text/plain", text, time.time())


def test_each_device_gets_each_message_once_in_order(store: MessageStore) -> None:
    ids = [store.store(AOR, ("a", "b"), _msg(f"m{i}")).entry_id for i in range(3)]
    store.store(AOR, ("b",), _msg("only b"))
    got = []
    while (nxt := store.next_for(AOR, "a")) is not None:
        got.append(nxt.body)
        assert store.ack(AOR, "a", nxt.entry_id)
    assert got == ["m0", "m1", "m2"]
    assert not store.ack(AOR, "a", ids[1])  # a late 2xx: nothing moves back
    assert store.queued(AOR)[0] == 4  # b has them all still
    got = []
    while (nxt := store.next_for(AOR, "b")) is not None:
        got.append(nxt.body)
        store.ack(AOR, "b", nxt.entry_id)
    assert got == ["m0", "m1", "m2", "only b"]
    assert store.queued(AOR) == (0, 0)


def test_unacknowledged_message_is_offered_again(store: MessageStore) -> None:
    store.store(AOR, ("a",), _msg("x"))
    first = store.next_for(AOR, "a")
    assert first is not None and store.next_for(AOR, "a") == first  # no 2xx yet: the same again


def test_limits_refuse_without_touching_what_is_stored(store: MessageStore) -> None:
    for i in range(4):
        assert store.store(AOR, ("a",), _msg(f"{i}" * 10)).outcome is StoreOutcome.STORED
    full = store.store(AOR, ("a",), _msg("y"))
    assert (full.outcome, full.queued) == (StoreOutcome.FULL_BYTES, 40)
    nxt = store.next_for(AOR, "a")
    assert nxt is not None and store.ack(AOR, "a", nxt.entry_id)
    assert store.queued(AOR) == (3, 30)
    for text in ("b", "c"):
        store.store(AOR, ("a",), _msg(text))
    full = store.store(AOR, ("a",), _msg("d"))
    assert (full.outcome, full.queued) == (StoreOutcome.FULL_COUNT, 5)
    assert store.queued(AOR) == (5, 32)


def test_expired_messages_are_neither_offered_nor_counted(store: MessageStore) -> None:
    short = MessageStore(store._r, m.MessageLimits(max_count=5, max_bytes=40, ttl=1))
    short.store(AOR, ("a",), _msg("old"))
    time.sleep(1.1)
    assert short.next_for(AOR, "a") is None
    short.store(AOR, ("a",), _msg("new"))  # (storing drops the expired ones)
    assert short.queued(AOR) == (1, 3)


def test_chain_lock_one_per_binding_taken_over_by_a_new_binding(store: MessageStore) -> None:
    token = store.lock(AOR, "a", "sip:old\t")
    assert token is not None
    assert store.lock(AOR, "a", "sip:old\t") is None  # that chain goes on
    newer = store.lock(AOR, "a", "sip:new\t")
    assert newer is not None
    assert not store.refresh(AOR, "a", token, "sip:old\t")  # the old chain stops at its next step
    store.unlock(AOR, "a", token, "sip:old\t")  # (a no-op: not its lock any more)
    assert store.lock(AOR, "a", "sip:new\t") is None
    store.unlock(AOR, "a", newer, "sip:new\t")
    assert store.lock(AOR, "a", "sip:new\t") is not None
    store.ask_again(AOR, "a", "sip:x\t")
    assert store.take_again(AOR, "a") == "sip:x\t" and store.take_again(AOR, "a") is None


def test_ack_refuses_a_malformed_entry_id(store: MessageStore) -> None:
    with pytest.raises(ValueError):
        store.ack(AOR, "a", "1-0'; DEL")
