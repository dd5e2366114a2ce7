"""Units: clustered nodes' heartbeats, call lists and the sweep of a dead node (pushlib.nodes),
and how a replicated binding is reached (calls.Binding.destination)."""

from __future__ import annotations

import time

import pytest

from pushlib import calls, nodes
from pushlib.redisconn import StoreUnavailable, sync_client


def _answer(key: str = "k1") -> nodes.CallerAnswer:
    return nodes.CallerAnswer(
        aor="sip:bob@example.com", key=key, dest=nodes.udp_destination("192.0.2.7", 5062),
        via="SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-1;rport, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-0",
        from_='"Alice" <sip:alice@example.org>;tag=a1', to="<sip:bob@example.com>",
        call_id="c-1@192.0.2.7", cseq="1 INVITE")


def test_a_caller_answer_survives_its_encoding_and_refuses_garbage() -> None:
    a = _answer()
    assert nodes.CallerAnswer.decode(a.encode()) == a
    for raw in ("", "null", "[]", '{"aor": "x"}', "{not json"):
        assert nodes.CallerAnswer.decode(raw) is None


def test_the_response_keeps_every_via_and_adds_our_to_tag() -> None:
    text = _answer().response(503, "Service Unavailable", "t0")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    assert lines[0] == "SIP/2.0 503 Service Unavailable" and body == ""
    assert "Via: SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK-1;rport, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-0" in lines
    assert "To: <sip:bob@example.com>;tag=t0" in lines
    assert "CSeq: 1 INVITE" in lines and "Content-Length: 0" in lines
    tagged = nodes.CallerAnswer(**{**_answer().__dict__, "to": "<sip:bob@example.com>;tag=x9"})
    assert "To: <sip:bob@example.com>;tag=x9" in tagged.response(503, "Service Unavailable", "t0")


def test_udp_destinations_and_node_ids() -> None:
    assert nodes.udp_destination("192.0.2.7", "5062") == "sip:192.0.2.7:5062;transport=udp"
    assert nodes.udp_destination("2001:db8::1", 5060) == "sip:[2001:db8::1]:5060;transport=udp"
    assert nodes.udp_destination("[2001:db8::1]", 5060) == "sip:[2001:db8::1]:5060;transport=udp"
    a, b = nodes.node_id("sip:10.0.0.1:5060"), nodes.node_id("sip:10.0.0.1:5060")
    assert a.startswith("10.0.0.1:5060/") and a != b  # a restarted node is a new node


def test_a_binding_from_another_node_is_reached_through_that_node() -> None:
    assert calls.first_route_uri("<sip:10.0.0.2:5060;lr;received=sip:1.2.3.4:5>,<sip:x;lr>") == \
        "sip:10.0.0.2:5060;lr;received=sip:1.2.3.4:5"
    assert calls.first_route_uri(" sip:10.0.0.2;lr ") == "sip:10.0.0.2;lr"
    via = calls.Binding(uri="sip:d@192.0.2.1", received="sip:198.51.100.1:4000", path="<sip:10.0.0.2;lr>")
    assert via.destination == "sip:10.0.0.2;lr"
    assert calls.Binding(uri="sip:d@192.0.2.1", received="sip:198.51.100.1:4000").destination == \
        "sip:198.51.100.1:4000"
    assert calls.Binding(uri="sip:d@192.0.2.1").destination == ""


def test_a_dead_node_is_swept_once_by_one_survivor(redis_url: str) -> None:
    client = sync_client(redis_url)
    try:
        a, b, c = (nodes.NodeBook(client, nodes.node_id(f"sip:10.0.0.{i}:5060")) for i in (1, 2, 3))
        for book in (a, b, c):
            book.heartbeat()
        a.list_call(_answer("k1"))
        a.list_call(_answer("k2"))
        a.unlist_call("k2")  # answered meanwhile: nobody owes its caller anything
        assert b.dead_nodes() == [] and c.dead_nodes() == []
        client.delete(nodes.alive_key(a.node))  # (as ALIVE_TTL after A's last heartbeat)
        assert b.dead_nodes() == [a.node] == c.dead_nodes()
        taken = b.take_over(a.node)
        assert taken is not None and [t.key for t in taken] == ["k1"] and taken[0] == _answer("k1")
        assert c.take_over(a.node) is None  # claimed by B: each caller is answered once
        assert c.dead_nodes() == [] and not client.exists(nodes.calls_key(a.node))
        assert client.ttl(nodes.alive_key(b.node)) <= nodes.ALIVE_TTL
    finally:
        client.close()


def test_the_heartbeat_expires_by_itself(redis_url: str) -> None:
    client = sync_client(redis_url)
    try:
        a, b = nodes.NodeBook(client, "a/1"), nodes.NodeBook(client, "b/1")
        a.heartbeat()
        b.heartbeat()
        client.pexpire(nodes.alive_key(a.node), 50)
        time.sleep(0.2)
        assert b.dead_nodes() == ["a/1"]
    finally:
        client.close()


def test_redis_down_is_store_unavailable() -> None:
    client = sync_client("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable):
        nodes.NodeBook(client, "a/1").heartbeat()
