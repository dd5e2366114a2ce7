"""Payload builders: the push-kind table of design.md §5, caller hiding, size limits."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib.models import ApnsRequest, Device, FcmMessage, Provider, PushKind, PushParams
from pushlib.payloads import (
    PayloadTooLarge,
    build_apns,
    build_fcm,
    is_alert_call,
)
from pushlib.provider_limits import APNS_PAYLOAD_BYTES, APNS_VOIP_PAYLOAD_BYTES, FCM_DATA_BYTES
from pushlib.settings import Settings

VOIP = "a1" * 32
REMOTE = "b2" * 32
FCM_TOKEN = "fcm:" + "T" * 150
NOW = 1_700_000_000.25
DEADLINE = NOW + 29.5
SETTINGS = Settings(message_ttl=7200, cancel_ttl=60, refresh_ttl=900)
IOS = Device("sip:alice@example.com", "d1", PushParams(Provider.APNS, "org.x.phone", voip_token=VOIP,
                                                          alert_token=REMOTE, team_id="ABCD1234"))
ALERT_ONLY = Device("sip:alice@example.com", "d3", PushParams(Provider.APNS, "org.x.phone", alert_token=REMOTE))
VOIP_ONLY = Device("sip:alice@example.com", "d4", PushParams(Provider.APNS, "org.x.phone", voip_token=VOIP))
ANDROID = Device("sip:alice@example.com", "d2", PushParams(Provider.FCM, "proj-1", alert_token=FCM_TOKEN))
CALL = {"call_id": "abc123@10.0.0.1", "caller_name": "Bob", "caller_number": "+15550100"}
K = PushKind

# kind: (token, topic, push-type, priority, expiration - int(NOW) or None for the deadline, fcm priority, ttl)
TABLE = [
    (K.INCOMING_CALL, VOIP, "org.x.phone.voip", "voip", "10", None, "high", "30s"),
    (K.CANCEL_INCOMING_CALL, REMOTE, "org.x.phone", "background", "5", 60, "high", "60s"),
    (K.MISSED_CALL, REMOTE, "org.x.phone", "alert", "10", 7200, "high", "7200s"),
    (K.MESSAGE, REMOTE, "org.x.phone", "alert", "10", 7200, "high", "7200s"),
    (K.VOICEMAIL, REMOTE, "org.x.phone", "alert", "5", 7200, "normal", "7200s"),
    (K.REGISTRATION_REFRESH, REMOTE, "org.x.phone", "background", "5", 900, "normal", "900s"),
    (K.CUSTOM, REMOTE, "org.x.phone", "alert", "10", 7200, "high", "7200s"),
]


def apns_json(kind: PushKind, data: dict[str, str], device: Device = IOS,
              cfg: Settings = SETTINGS) -> tuple[ApnsRequest, Any]:
    request = build_apns(kind, device, data, DEADLINE, NOW, cfg)
    assert request is not None
    return request, json.loads(request.payload)


def fcm_json(kind: PushKind, data: dict[str, str], device: Device = ANDROID,
             cfg: Settings = SETTINGS) -> tuple[FcmMessage, Any]:
    message = build_fcm(kind, device, data, DEADLINE, NOW, cfg)
    assert message is not None
    return message, json.loads(message.body)["message"]


@pytest.mark.parametrize(
    ("kind", "token", "topic", "push_type", "priority", "ttl", "fcm_priority", "fcm_ttl"), TABLE
)
def test_apns_headers_follow_the_push_kind_table(kind, token, topic, push_type, priority, ttl, fcm_priority,
                                                 fcm_ttl):
    request, _ = apns_json(kind, CALL)
    assert request.token == token
    assert request.headers["apns-topic"] == topic
    assert request.headers["apns-push-type"] == push_type
    assert request.headers["apns-priority"] == priority
    expected = int(DEADLINE) if ttl is None else int(NOW) + ttl
    assert request.headers["apns-expiration"] == str(expected)
    assert uuid.UUID(request.headers["apns-id"]).version == 4


@pytest.mark.parametrize(
    ("kind", "token", "topic", "push_type", "priority", "ttl", "fcm_priority", "fcm_ttl"), TABLE
)
def test_fcm_message_follows_the_push_kind_table(kind, token, topic, push_type, priority, ttl, fcm_priority,
                                                 fcm_ttl):
    message, body = fcm_json(kind, CALL)
    assert message.token == body["token"] == FCM_TOKEN
    assert body["android"] == {"priority": fcm_priority, "ttl": fcm_ttl}
    assert body["data"]["type"] == kind.value
    assert all(isinstance(v, str) for v in body["data"].values())


def test_incoming_call_apns_payload_carries_call_fields():
    request, payload = apns_json(K.INCOMING_CALL, CALL)
    assert payload["aps"] == {}
    assert payload["type"] == "incomingCall"
    assert payload["call_id"] == CALL["call_id"]
    assert payload["caller_name"] == "Bob" and payload["caller_number"] == "+15550100"
    assert payload["deadline"] == DEADLINE and payload["sent_at"] == NOW
    assert request.headers["apns-collapse-id"] == CALL["call_id"]


def test_incoming_call_fcm_data_carries_call_fields_as_strings():
    _, body = fcm_json(K.INCOMING_CALL, CALL)
    assert body["data"] == {"type": "incomingCall", "call_id": CALL["call_id"], "caller_name": "Bob",
                            "caller_number": "+15550100", "deadline": str(DEADLINE), "sent_at": str(NOW)}
    assert "notification" not in body


def test_incoming_call_fcm_ttl_is_time_left_rounded_up_and_never_negative():
    late = build_fcm(K.INCOMING_CALL, ANDROID, CALL, NOW - 5, NOW, SETTINGS)
    assert late is not None
    assert json.loads(late.body)["message"]["android"]["ttl"] == "0s"


def test_cancel_is_content_available_without_alert():
    request, payload = apns_json(K.CANCEL_INCOMING_CALL, CALL)
    assert payload["aps"] == {"content-available": 1}
    assert payload["call_id"] == CALL["call_id"]
    assert request.headers["apns-collapse-id"] == CALL["call_id"]


def test_missed_call_alert_names_the_caller():
    _, payload = apns_json(K.MISSED_CALL, {**CALL, "badge": "4"})
    assert payload["aps"]["alert"] == {"title": "Missed Call", "body": "Bob (+15550100)"}
    assert payload["aps"]["badge"] == 4
    assert payload["call_id"] == CALL["call_id"]
    _, body = fcm_json(K.MISSED_CALL, CALL)
    assert body["data"]["title"] == "Missed Call" and body["data"]["body"] == "Bob (+15550100)"
    assert body["data"]["call_id"] == CALL["call_id"]


def test_missed_call_without_caller_says_unknown():
    _, payload = apns_json(K.MISSED_CALL, {"call_id": "c"})
    assert payload["aps"]["alert"]["body"] == "Unknown caller"


@pytest.mark.parametrize("kind", [K.INCOMING_CALL, K.MISSED_CALL, K.VOICEMAIL])
def test_hide_caller_leaves_name_and_number_out(kind):
    hidden = replace(SETTINGS, hide_caller=True)
    for raw in (apns_json(kind, CALL, cfg=hidden)[0].payload, fcm_json(kind, CALL, cfg=hidden)[0].body):
        text = raw.decode()
        assert "Bob" not in text and "+15550100" not in text
        assert CALL["call_id"] in text


def test_message_title_is_sender_and_body_is_text():
    data = {"sender": "Carol", "message": "See you at 5", "message_id": "m-1"}
    _, payload = apns_json(K.MESSAGE, data)
    assert payload["aps"]["alert"] == {"title": "Carol", "body": "See you at 5"}
    assert payload["message_id"] == "m-1"
    _, body = fcm_json(K.MESSAGE, data)
    assert body["data"]["title"] == "Carol" and body["data"]["body"] == "See you at 5"


def test_message_without_text_has_no_empty_body():
    _, payload = apns_json(K.MESSAGE, {"sender": "Carol"})
    assert payload["aps"]["alert"] == {"title": "Carol"}


def test_registration_refresh_is_background_only():
    _, payload = apns_json(K.REGISTRATION_REFRESH, CALL)
    assert payload == {"aps": {"content-available": 1}, "type": "registrationRefresh", "sent_at": NOW}


def test_custom_push_carries_alert_extra_fields_and_notification_block():
    data = {"title": "Hi", "body": "There", "room": "42", "ttl": "120", "google.x": "no", "type": "mine"}
    request, payload = apns_json(K.CUSTOM, data)
    assert payload["aps"]["alert"] == {"title": "Hi", "body": "There"}
    assert payload["room"] == "42" and payload["type"] == "custom"
    assert request.headers["apns-expiration"] == str(int(NOW) + 120)
    _, body = fcm_json(K.CUSTOM, data)
    assert body["notification"] == {"title": "Hi", "body": "There"}
    assert body["data"]["room"] == "42" and "google.x" not in body["data"] and "ttl" not in body["data"]
    assert body["android"]["ttl"] == "120s"


def test_custom_without_text_is_silent_and_bad_ttl_falls_back():
    request, payload = apns_json(K.CUSTOM, {"ttl": "-5", "room": "1"})
    assert payload["aps"] == {"content-available": 1}
    assert request.headers["apns-expiration"] == str(int(NOW) + SETTINGS.message_ttl)
    _, body = fcm_json(K.CUSTOM, {"room": "1"})
    assert "notification" not in body


def test_none_when_device_lacks_the_needed_token():
    no_token = replace(IOS, params=replace(IOS.params, voip_token=None, alert_token=None))
    no_remote = replace(IOS, params=replace(IOS.params, alert_token=None))
    assert build_apns(K.INCOMING_CALL, no_token, CALL, DEADLINE, NOW, SETTINGS) is None
    assert build_apns(K.CANCEL_INCOMING_CALL, no_remote, CALL, DEADLINE, NOW, SETTINGS) is None
    assert build_apns(K.MISSED_CALL, no_remote, CALL, DEADLINE, NOW, SETTINGS) is None
    assert build_apns(K.INCOMING_CALL, no_remote, CALL, DEADLINE, NOW, SETTINGS) is not None
    assert build_apns(K.MISSED_CALL, ANDROID, CALL, DEADLINE, NOW, SETTINGS) is None
    assert build_fcm(K.MISSED_CALL, IOS, CALL, DEADLINE, NOW, SETTINGS) is None


def test_long_call_id_gets_hashed_collapse_id_but_stays_intact_in_payload():
    call_id = "x" * 300 + "@host"
    request, payload = apns_json(K.MISSED_CALL, {"call_id": call_id})
    assert len(request.headers["apns-collapse-id"].encode()) <= 64
    assert payload["call_id"] == call_id


def test_ids_that_cannot_fit_raise_payload_too_large():
    with pytest.raises(PayloadTooLarge):
        build_apns(K.MISSED_CALL, IOS, {"call_id": "c" * 5000}, DEADLINE, NOW, SETTINGS)
    with pytest.raises(PayloadTooLarge):
        build_fcm(K.CUSTOM, ANDROID, {"blob": "b" * 5000}, DEADLINE, NOW, SETTINGS)


def test_non_finite_deadline_is_refused():
    with pytest.raises(ValueError, match="finite"):
        build_apns(K.INCOMING_CALL, IOS, CALL, float("inf"), NOW, SETTINGS)


def test_long_text_is_truncated_with_ellipsis():
    _, payload = apns_json(K.MESSAGE, {"sender": "S", "message": "m" * 10_000})
    assert payload["aps"]["alert"]["body"].endswith("…")
    assert len(payload["aps"]["alert"]["body"]) <= 1025


_hostile = st.text(alphabet=st.characters(), max_size=300) | st.sampled_from(
    ['"\\\u0000\ud800', "😀" * 3000, "\\" * 5000, "\x01" * 4000, "é" * 7000]
) | st.builds(
    lambda piece, n: (piece * n)[:20_000],  # up to 20 KB built from a repeated random piece
    st.text(alphabet=st.characters(), min_size=1, max_size=40), st.integers(100, 2_000),
)
_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.@+_", min_size=1, max_size=256)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(PushKind)), name=_hostile, number=_hostile, text=_hostile, call_id=_ids,
       message_id=_ids)
def test_any_text_gives_valid_json_within_limits_with_ids_intact(
    kind, name, number, text, call_id, message_id
):
    data = {"call_id": call_id, "message_id": message_id, "caller_name": name, "caller_number": number,
            "sender": name, "message": text, "title": name, "body": text}
    if kind is K.CUSTOM:  # custom fields other than title/body are opaque and never truncated
        data = {k: data[k] for k in ("call_id", "message_id", "title", "body")}
    request = build_apns(kind, IOS, data, DEADLINE, NOW, SETTINGS)
    assert request is not None
    limit = APNS_VOIP_PAYLOAD_BYTES if kind is K.INCOMING_CALL else APNS_PAYLOAD_BYTES
    assert len(request.payload) <= limit
    payload = json.loads(request.payload.decode("utf-8"))
    alert_request = build_apns(kind, ALERT_ONLY, data, DEADLINE, NOW, SETTINGS)  # the alert-style call kinds
    assert alert_request is not None and len(alert_request.payload) <= APNS_PAYLOAD_BYTES
    alert_payload = json.loads(alert_request.payload.decode("utf-8"))
    if kind in (K.INCOMING_CALL, K.CANCEL_INCOMING_CALL):
        assert alert_payload["call_id"] == call_id and "title" in alert_payload["aps"]["alert"]
    message = build_fcm(kind, ANDROID, data, DEADLINE, NOW, SETTINGS)
    assert message is not None
    body = json.loads(message.body.decode("utf-8"))["message"]
    size = len(json.dumps({k: body[k] for k in ("data", "notification") if k in body}, ensure_ascii=False,
                          separators=(",", ":")).encode())
    assert size <= FCM_DATA_BYTES
    if kind in (K.INCOMING_CALL, K.CANCEL_INCOMING_CALL, K.MISSED_CALL, K.VOICEMAIL, K.CUSTOM):
        assert payload["call_id"] == call_id and body["data"]["call_id"] == call_id
    if kind in (K.MESSAGE, K.VOICEMAIL, K.CUSTOM):
        assert payload["message_id"] == message_id and body["data"]["message_id"] == message_id


# --- iOS devices without a VoIP token: the call is a visible alert (as Flexisip's "remote" pushes) -------

CALLEE = "sip:alice@example.com"
ALERT_CALL = {**CALL, "callee": CALLEE}


def test_alert_only_incoming_call_headers():
    request, _ = apns_json(K.INCOMING_CALL, ALERT_CALL, device=ALERT_ONLY)
    assert request.token == REMOTE
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-topic"] == "org.x.phone"  # the bundle: no .voip
    assert request.headers["apns-collapse-id"] == CALL["call_id"]
    assert request.headers["apns-expiration"] == str(int(DEADLINE))  # the wait window's end
    assert uuid.UUID(request.headers["apns-id"]).version == 4
    assert is_alert_call(K.INCOMING_CALL, request)


def test_alert_only_incoming_call_payload_rings_visibly_with_the_call_fields():
    _, payload = apns_json(K.INCOMING_CALL, ALERT_CALL, device=ALERT_ONLY)
    assert payload["aps"] == {
        "alert": {"title": "Incoming call", "body": "Bob (+15550100)"},
        "sound": "default",
        "interruption-level": "time-sensitive",
    }
    assert payload["type"] == "incomingCall"
    assert payload["call_id"] == CALL["call_id"] and payload["callee"] == CALLEE
    assert payload["deadline"] == DEADLINE and payload["sent_at"] == NOW
    assert payload["caller_name"] == "Bob" and payload["caller_number"] == "+15550100"
    assert "title" not in payload and "body" not in payload  # shown through aps.alert only


@pytest.mark.parametrize(
    ("caller", "body"),
    [({"caller_name": "Bob"}, "Bob"), ({"caller_number": "+15550100"}, "+15550100"), ({}, "Unknown caller")],
)
def test_alert_only_incoming_call_body_is_the_caller_line(caller, body):
    _, payload = apns_json(K.INCOMING_CALL, {"call_id": "c1", **caller}, device=ALERT_ONLY)
    assert payload["aps"]["alert"] == {"title": "Incoming call", "body": body}


def test_alert_only_incoming_call_respects_hide_caller():
    hidden = replace(SETTINGS, hide_caller=True)
    request, payload = apns_json(K.INCOMING_CALL, ALERT_CALL, device=ALERT_ONLY, cfg=hidden)
    assert payload["aps"]["alert"] == {"title": "Incoming call", "body": "Hidden caller"}
    assert "Bob" not in request.payload.decode() and "+15550100" not in request.payload.decode()
    assert "caller_name" not in payload and "caller_number" not in payload


def test_alert_only_incoming_call_fits_the_alert_limit():
    request, payload = apns_json(K.INCOMING_CALL, {**ALERT_CALL, "caller_name": "😀" * 5000}, device=ALERT_ONLY)
    assert len(request.payload) <= APNS_PAYLOAD_BYTES
    assert payload["aps"]["alert"]["body"].endswith("…") and payload["call_id"] == CALL["call_id"]


@pytest.mark.parametrize(
    ("reason", "body"),
    [
        ("answered", "Answered elsewhere"),
        ("canceled", "The caller hung up"),
        ("timeout", "Not answered"),
        ("rejected-486", "Busy"),
        ("rejected-603", "Declined"),
    ],
)
def test_alert_only_cancel_replaces_the_ringing_alert_silently(reason, body):
    request, payload = apns_json(K.CANCEL_INCOMING_CALL, {**ALERT_CALL, "reason": reason}, device=ALERT_ONLY)
    assert request.token == REMOTE
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-topic"] == "org.x.phone"
    assert request.headers["apns-collapse-id"] == CALL["call_id"]
    assert request.headers["apns-expiration"] == str(int(NOW) + SETTINGS.cancel_ttl)
    assert payload["aps"] == {"alert": {"title": "Call ended", "body": body}, "interruption-level": "passive"}
    assert "sound" not in payload["aps"] and "content-available" not in payload["aps"]
    assert payload["type"] == "cancelIncomingCall"
    assert payload["call_id"] == CALL["call_id"] and payload["callee"] == CALLEE
    assert not is_alert_call(K.CANCEL_INCOMING_CALL, request)


def test_alert_only_cancel_without_a_known_reason_has_a_title_only():
    _, payload = apns_json(K.CANCEL_INCOMING_CALL, ALERT_CALL, device=ALERT_ONLY)
    assert payload["aps"]["alert"] == {"title": "Call ended"}


@pytest.mark.parametrize("call_id", [CALL["call_id"], "x" * 300 + "@host", "call é id"])
def test_alert_only_call_pushes_share_one_collapse_id(call_id):
    data = {**ALERT_CALL, "call_id": call_id, "reason": "timeout"}
    ids = {apns_json(kind, data, device=ALERT_ONLY)[0].headers["apns-collapse-id"]
           for kind in (K.INCOMING_CALL, K.CANCEL_INCOMING_CALL, K.MISSED_CALL)}
    assert len(ids) == 1
    [collapse_id] = ids
    assert len(collapse_id.encode()) <= 64 and collapse_id.isascii()
    _, missed = apns_json(K.MISSED_CALL, data, device=ALERT_ONLY)
    assert missed["aps"]["alert"] == {"title": "Missed Call", "body": "Bob (+15550100)"}


@pytest.mark.parametrize("device", [IOS, VOIP_ONLY], ids=["voip+alert", "voip-only"])
def test_devices_with_a_voip_token_keep_the_voip_call_and_background_cancel(device):
    request, payload = apns_json(K.INCOMING_CALL, ALERT_CALL, device=device)
    assert request.token == VOIP
    assert (request.headers["apns-push-type"], request.headers["apns-topic"]) == ("voip", "org.x.phone.voip")
    assert payload["aps"] == {} and not is_alert_call(K.INCOMING_CALL, request)
    cancel = build_apns(K.CANCEL_INCOMING_CALL, device, {**ALERT_CALL, "reason": "answered"}, DEADLINE, NOW,
                        SETTINGS)
    if device is VOIP_ONLY:
        assert cancel is None  # no alert token: Apple forbids a VoIP push that reports no call
    else:
        assert cancel is not None and json.loads(cancel.payload)["aps"] == {"content-available": 1}
        assert (cancel.headers["apns-push-type"], cancel.headers["apns-priority"]) == ("background", "5")


def test_android_call_pushes_are_unchanged_by_the_alert_style():
    for kind in (K.INCOMING_CALL, K.CANCEL_INCOMING_CALL):
        message, body = fcm_json(kind, {**ALERT_CALL, "reason": "answered"})
        assert "title" not in body["data"] and "notification" not in body
        assert not is_alert_call(kind, message)
