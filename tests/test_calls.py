"""Unit tests of the pure call-flow decisions (pushlib.calls); the parked-call state is tested in test_parked."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pushlib import calls
from pushlib.access import Limits
from pushlib.models import Device, ParkedCall, Provider, PushKind, PushParams
from pushlib.settings import Settings

# kemi/ is not a package: Kamailio loads router.py as a script that puts kemi/ on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kemi"))
import ksrlog

NOW = 1_800_000_000.0


def dev(device_id: str, contact: str, registered_ago: float, token: str = "", **kw: float) -> Device:
    return Device(
        aor="sip:bob@example.com",
        device_id=device_id,
        params=PushParams(Provider.APNS, "com.example.phone",
                          voip_token=token or hashlib.sha256(device_id.encode()).hexdigest()),
        contact=contact,
        registered_at=NOW - registered_ago,
        expires_at=kw.get("expires_at", NOW + 3600),
        quarantined_until=kw.get("quarantined_until", 0.0),
    )


PUSH_URI = "sip:bob@10.0.0.1:5060;pn-provider=apns;pn-param=T.com.example.phone.voip;pn-prid=abab"


# --------------------------------------------------------------------------- plan_invite


def test_plain_contact_rings_at_once() -> None:
    plan = calls.plan_invite([calls.Binding("sip:desk@10.0.0.2")], [], NOW, 10)
    assert plan.verdict is calls.Verdict.RING and [b.uri for b in plan.ring] == ["sip:desk@10.0.0.2"]


def test_recent_push_contact_rings_old_one_is_pushed() -> None:
    b = calls.Binding(PUSH_URI)
    assert calls.plan_invite([b], [dev("d1", PUSH_URI, 3)], NOW, 10).verdict is calls.Verdict.RING
    plan = calls.plan_invite([b], [dev("d1", PUSH_URI, 30)], NOW, 10)
    assert plan.verdict is calls.Verdict.PARK and [d.device_id for d in plan.push] == ["d1"] and not plan.ring


def test_one_phone_is_pushed_once_and_rung_once() -> None:
    """A phone registered without, then with +sip.instance (same token) left two records and two
    bindings with one contact: one push and one fork, never two."""
    token = "cd" * 32
    old, new = dev("tok-id", PUSH_URI, 60, token=token), dev("instance-id", PUSH_URI, 30, token=token)
    plan = calls.plan_invite([calls.Binding(PUSH_URI), calls.Binding(PUSH_URI)], [old, new], NOW, 10)
    assert plan.verdict is calls.Verdict.PARK and [d.device_id for d in plan.push] == ["instance-id"]
    desk = calls.Binding("sip:desk@10.0.0.2")
    plan = calls.plan_invite([desk, calls.Binding("sip:desk@10.0.0.2"), calls.Binding(PUSH_URI)],
                             [old, new], NOW, 120)
    assert [b.uri for b in plan.ring] == ["sip:desk@10.0.0.2", PUSH_URI] and not plan.push
    # another app with the same token string is another device
    other = Device(old.aor, "other-app", PushParams(Provider.APNS, "com.example.other", voip_token=token),
                   contact="sip:x@10.0.0.3", registered_at=NOW - 60, expires_at=NOW + 3600)
    plan = calls.plan_invite([], [old, other], NOW, 10)
    assert sorted(d.device_id for d in plan.push) == ["other-app", "tok-id"]


def test_awake_window_zero_always_pushes() -> None:
    plan = calls.plan_invite([calls.Binding(PUSH_URI)], [dev("d1", PUSH_URI, 0)], NOW, 0)
    assert plan.verdict is calls.Verdict.PARK


def test_awake_and_sleeping_devices_in_parallel() -> None:
    plan = calls.plan_invite(
        [calls.Binding("sip:desk@10.0.0.2"), calls.Binding(PUSH_URI)], [dev("d1", PUSH_URI, 300)], NOW, 10
    )
    assert plan.verdict is calls.Verdict.PARK
    assert [b.uri for b in plan.ring] == ["sip:desk@10.0.0.2"] and [d.device_id for d in plan.push] == ["d1"]


def test_device_without_binding_after_restart_is_pushed() -> None:
    plan = calls.plan_invite([], [dev("d1", PUSH_URI, 300)], NOW, 10)
    assert plan.verdict is calls.Verdict.PARK


def test_expired_and_quarantined_devices_are_skipped() -> None:
    devices = [dev("d1", PUSH_URI, 300, expires_at=NOW - 1), dev("d2", "sip:x@h", 300, quarantined_until=NOW + 60)]
    assert calls.plan_invite([], devices, NOW, 10).verdict is calls.Verdict.UNAVAILABLE


def test_unknown_user_is_not_found() -> None:
    assert calls.plan_invite([], [], NOW, 10).verdict is calls.Verdict.NOT_FOUND


def test_store_down_rings_plain_contacts_only() -> None:
    plan = calls.plan_invite(
        [calls.Binding("sip:desk@10.0.0.2"), calls.Binding(PUSH_URI, modified=NOW - 300)], None, NOW, 10
    )
    assert plan.verdict is calls.Verdict.RING and [b.uri for b in plan.ring] == ["sip:desk@10.0.0.2"]
    only_push = calls.plan_invite([calls.Binding(PUSH_URI, modified=NOW - 300)], None, NOW, 10)
    assert only_push.verdict is calls.Verdict.UNAVAILABLE
    assert calls.plan_invite([], None, NOW, 10).verdict is calls.Verdict.UNAVAILABLE


# --------------------------------------------------------------------------- failures, register helpers


@pytest.mark.parametrize(
    ("code", "parked", "canceled", "action"),
    [
        (486, True, False, calls.FailureAction.END_ALL),
        (603, False, False, calls.FailureAction.END_ALL),
        (600, True, False, calls.FailureAction.END_ALL),
        (408, True, False, calls.FailureAction.KEEP_WAITING),
        (480, True, False, calls.FailureAction.KEEP_WAITING),
        (503, True, False, calls.FailureAction.KEEP_WAITING),
        (408, False, False, calls.FailureAction.RELAY),
        (487, True, True, calls.FailureAction.RELAY),
    ],
)
def test_failure_action(code: int, parked: bool, canceled: bool, action: calls.FailureAction) -> None:
    assert calls.failure_action(code, parked, canceled) is action


def test_feature_caps_and_reason() -> None:
    assert calls.feature_caps("apns") == '*;+sip.pns="apns"'
    assert calls.feature_caps(None) == '*;+sip.pns="apns,fcm"'
    reason = calls.sip_reason("bad\r\ntoken 😀" + "x" * 200)
    assert reason.isascii() and "\r" not in reason and len(reason) == 80


def test_contact_uri_and_expires() -> None:
    assert calls.contact_uri('"Bob" <sip:b@h;pn-prid=1>;expires=60') == "sip:b@h;pn-prid=1"
    assert calls.contact_uri("sip:b@h;expires=60") == "sip:b@h"
    assert calls.register_expires("0", "3600") == 0
    assert calls.register_expires(None, "120") == 120
    assert calls.register_expires("junk", None) == 3600


@pytest.mark.parametrize(
    ("param", "header", "expected"),
    [
        (None, "99999999999", 3600), (None, "5", 60), ("0", "300", 0), (None, "0", 0),
        ("\u0661\u0662\u0660", "300", 3600), ("+120", "300", 3600), ("1_200", None, 3600), ("-5", None, 3600),
        (" 120\t", None, 120), (None, "\u00b2", 3600), ("", "300", 3600),
    ],
)
def test_register_expires_ascii_digits_only_and_clamped(param: str | None, header: str | None,
                                                        expected: int) -> None:
    assert calls.register_expires(param, header, minimum=60, maximum=3600) == expected


def test_stale_bindings_same_device_other_uri() -> None:
    old = calls.Binding("sip:d@1.2.3.4:1111;pn-prid=abab", ruid="r1")
    new = calls.Binding("sip:d@1.2.3.4:2222;pn-prid=abab", ruid="r2")
    other = calls.Binding("sip:desk@h", ruid="r3")
    ids = {old.uri: "d1", new.uri: "d1", other.uri: None}
    stale = calls.stale_bindings([old, new, other], "d1", new.uri, lambda b: ids[b.uri])
    assert stale == [old]


def test_caller_identity_with_quotes_and_emoji() -> None:
    assert calls.caller_identity('"Bob \\"B\\" 😀" <sip:+1555@h>;tag=1', "+1555") == ('Bob "B" 😀', "+1555")
    assert calls.caller_identity("<sip:+1555@h>;tag=1", "+1555") == ("+1555", "+1555")
    assert calls.caller_identity("Alice <sip:a@h>", "a") == ("Alice", "a")
    assert calls.caller_identity('"A <b>; c" <sip:a@h>;tag=1', "a") == ("A <b>; c", "a")
    assert calls.caller_identity("sip:a@h;tag=1", "a") == ("a", "a")
    assert calls.caller_identity('"broken <sip:a@h>', "a") == ("a", "a")


def test_proxy_config_from_defines() -> None:
    defs = {"WITH_PUSHER": "", "WITH_AUTH": "", "REDIS_URL": '"redis://h:1/2"', "WAIT_WINDOW": "12",
            "AWAKE_WINDOW": "0", "AUTH_REALM": '"example.com"'}
    cfg = calls.proxy_config(defs.get, env={})
    assert cfg.pusher and cfg.auth
    assert cfg.settings.redis_url == "redis://h:1/2" and cfg.settings.wait_window == 12.0
    assert cfg.awake_window == 0.0 and cfg.realm == "example.com"
    assert not calls.proxy_config(lambda name: None, env={}).pusher
    assert cfg.fallback_uri == ""
    with_vm = calls.proxy_config({"FALLBACK_URI": '"sip:{user}@vm.example.com"'}.get, env={})
    assert with_vm.fallback_uri == "sip:{user}@vm.example.com"


@pytest.mark.parametrize(
    ("code", "parked", "canceled", "fallback_due", "action"),
    [
        (408, True, False, False, calls.FailureRouteAction.WINDOW_END),  # the parking branch timed out
        (480, True, False, False, calls.FailureRouteAction.WINDOW_END),
        (486, True, False, False, calls.FailureRouteAction.END_ALL),
        (487, False, False, True, calls.FailureRouteAction.FALLBACK),  # ringing branches canceled by the timer
        (487, True, True, False, calls.FailureRouteAction.RELAY),  # the caller hung up
        (487, False, True, True, calls.FailureRouteAction.RELAY),
        (408, False, False, False, calls.FailureRouteAction.RELAY),  # not a parked call
    ],
)
def test_failure_route_action(code: int, parked: bool, canceled: bool, fallback_due: bool,
                              action: calls.FailureRouteAction) -> None:
    assert calls.failure_route_action(code, parked, canceled, fallback_due) is action


def test_fallback_target_and_diversion() -> None:
    assert calls.fallback_target("", "sip:bob@example.com") == ""
    assert calls.fallback_target("sip:vm@10.0.0.9:5080", "sip:bob@example.com") == "sip:vm@10.0.0.9:5080"
    assert calls.fallback_target("sip:{user}@vm.{domain}", "sip:bob@example.com") == "sip:bob@vm.example.com"
    assert calls.diversion_header("sip:bob@example.com") == "<sip:bob@example.com>;reason=no-answer;counter=1"


def parked(pushed: tuple[str, ...], woken: tuple[str, ...] = (), caller: tuple[str, str] = ("A", "1")) -> ParkedCall:
    return ParkedCall("sip:b@h", "k1", "c1", "1", caller[0], caller[1], NOW + 30, pushed, woken)


def test_end_of_call_jobs() -> None:
    s = Settings()
    answered = calls.end_of_call_jobs(parked(("d1", "d2"), woken=("d2",)), True, NOW, s, "answered")
    assert [j.kind for j in answered] == [PushKind.CANCEL_INCOMING_CALL]
    assert answered[0].device_ids == ("d1",)  # d2 woke: it got the INVITE, and tm's CANCEL
    assert calls.end_of_call_jobs(parked(("d1",), woken=("d1",)), True, NOW, s, "answered") == []
    missed = calls.end_of_call_jobs(parked(("d1", "d2"), woken=("d2",)), False, NOW, s, "timeout")
    assert [j.kind for j in missed] == [PushKind.CANCEL_INCOMING_CALL, PushKind.MISSED_CALL]
    assert missed[0].device_ids == ("d1", "d2") and missed[0].data["reason"] == "timeout"
    assert missed[1].deadline == NOW + s.message_ttl
    # the payload builders make title/body (honouring HIDE_CALLER): the job carries no copy
    assert set(missed[1].data) == {"call_id", "callee", "caller_name", "caller_number"}
    assert {j.data["callee"] for j in [*answered, *missed]} == {"sip:b@h"}  # apps refuse pushes not for them
    job = calls.incoming_call_job("sip:b@h", "c1", ("A", "1"), ["d1"], NOW, 30)
    assert job.deadline == NOW + 30 and job.data["call_id"] == "c1" and job.device_ids == ("d1",)
    assert "deadline" not in job.data  # the payload's deadline is the job's
    assert job.job_id == calls.incoming_call_job("sip:b@h", "c1", ("A", "1"), ["d1"], NOW + 1, 30).job_id


def test_hide_caller_keeps_the_name_out_of_redis() -> None:
    hidden = Settings(hide_caller=True)
    missed = calls.end_of_call_jobs(parked(("d1",), caller=("Alice", "100")), False, NOW, hidden, "timeout")
    assert "Alice" not in repr(missed[-1].data) and "100" not in repr(missed[-1].data)
    assert calls.pushed_caller(("Alice", "100"), True) == ("", "")
    assert calls.pushed_caller(("Alice", "100"), False) == ("Alice", "100")


# --------------------------------------------------------------------------- pnwait entry


def test_wait_entry_round_trip_and_rearm() -> None:
    entry = calls.WaitEntry("sip:bob@example.com", "abc@1.2.3.4", "7")
    assert calls.WaitEntry.decode(entry.encode()) == entry and entry.code == 0
    busy = calls.WaitEntry.decode(entry.with_code(486).encode())
    assert busy is not None and busy.code == 486 and busy.aor == "sip:bob@example.com"
    # a second busy re-arms with a replaced code, never "aor|486|486"
    again = calls.WaitEntry.decode(busy.with_code(600).encode())
    assert again == calls.WaitEntry("sip:bob@example.com", "abc@1.2.3.4", "7", 600)


@pytest.mark.parametrize("call_id", ["a|b|c", "x%7Cy", "\udcff-raw", "sp ace;=@[]"])
def test_wait_entry_separators_and_raw_bytes_survive(call_id: str) -> None:
    entry = calls.WaitEntry("sip:odd|user@h", call_id, "1", 603)
    encoded = entry.encode()
    assert encoded.count("|") == 3 and encoded.isascii()
    assert calls.WaitEntry.decode(encoded) == entry


@pytest.mark.parametrize("value", [None, "", "sip:b@h", "sip:b@h|486", "x|1|sip:b@h|c", "0|1||c", "1|2|3"])
def test_wait_entry_malformed_is_none(value: str | None) -> None:
    assert calls.WaitEntry.decode(value) is None


@pytest.mark.parametrize(
    ("code", "fallback", "end"),
    [
        (0, False, calls.WindowEnd(480, "timeout", False)),
        (0, True, calls.WindowEnd(0, "timeout", True)),  # cancel the ringing branches: the fallback follows
        (480, True, calls.WindowEnd(0, "timeout", True)),
        (486, True, calls.WindowEnd(486, "rejected-486", False)),  # busy is busy, fallback or not
        (603, False, calls.WindowEnd(603, "rejected-603", False)),
    ],
)
def test_window_end(code: int, fallback: bool, end: calls.WindowEnd) -> None:
    assert calls.WaitEntry("sip:b@h", "c1", "1", code).window_end(fallback) == end


@pytest.mark.parametrize(
    ("code", "reason"),
    [(200, "answered"), (202, "answered"), (487, "canceled"), (0, "timeout"), (480, "timeout"),
     (486, "rejected-486"), (600, "rejected-600"), (603, "rejected-603")],
)
def test_end_reason(code: int, reason: str) -> None:
    assert calls.end_reason(code) == reason


# --------------------------------------------------------------------------- bindings


def test_stale_bindings_include_evicted_devices_never_the_new_one() -> None:
    new = calls.Binding("sip:d@1.2.3.4:2222;pn-prid=abab", ruid="r1")
    old = calls.Binding("sip:d@1.2.3.4:1111;pn-prid=abab", ruid="r2")
    evicted = calls.Binding("sip:e@1.2.3.4:3333;pn-prid=cdcd", ruid="r3")
    plain = calls.Binding("sip:desk@h", ruid="r4")
    ids = {new.uri: "d1", old.uri: "d1", evicted.uri: "d9", plain.uri: None}
    bindings = [new, old, evicted, plain]
    assert calls.stale_bindings(bindings, "d1", new.uri, lambda b: ids[b.uri], evicted=["d9", "d1"]) == [old, evicted]


def test_binding_device_id_matches_the_registered_device() -> None:
    instance = "<urn:uuid:abc>"
    contact = "<" + PUSH_URI.replace("abab", "ab" * 32) + ">"
    plan = calls.plan_register(calls.aor_of("bob", "example.com"), contact, None, "Phone/1", [],
                               lambda provider, app: True, Limits(), NOW)
    assert isinstance(plan, calls.SaveDevice)
    binding = calls.Binding(plan.device.contact, instance="", user_agent="Phone/1")
    assert calls.binding_device_id(binding, []) == plan.device.device_id
    assert calls.binding_device_id(calls.Binding(plan.device.contact, instance=instance), []) == "urn:uuid:abc"
    assert calls.binding_device_id(calls.Binding("sip:desk@h"), []) is None
    assert calls.binding_device_id(calls.Binding("sip:x@h;pn-provider=apns;pn-prid=zz"), []) is None


def test_looks_push() -> None:
    assert calls.looks_push(PUSH_URI) and calls.looks_push("sip:b@h;%70n-prid=1")
    assert not calls.looks_push("sip:desk@h;transport=tcp") and not calls.looks_push("sip:b@h;pn-prid=%zz")


# --------------------------------------------------------------------------- kemi/ksrlog


class _FakeKsr:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[[str], None]:
        return lambda text: self.lines.append((level, text))


@pytest.mark.parametrize(("debug", "level"), [
    ("3", logging.DEBUG), ("4", logging.DEBUG), ("2", logging.INFO), (None, logging.INFO),
    ("1", ksrlog.NOTICE), ("0", logging.WARNING), ("-1", logging.ERROR), ("junk", logging.INFO),
])
def test_ksrlog_level_from_kamailio_debug(debug: str | None, level: int) -> None:
    assert ksrlog.python_level(debug) == level


def test_ksrlog_handler_one_line_per_record_by_level() -> None:
    fake = _FakeKsr()
    logger = logging.getLogger("pushlib.test-ksrlog")
    handler = ksrlog.KsrHandler(fake)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.debug("d")
        logger.info("push outcome=%s", "delivered")
        logger.log(ksrlog.NOTICE, "n")
        logger.warning("w")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("e")
    finally:
        logger.removeHandler(handler)
    assert [lvl for lvl, _ in fake.lines] == ["dbg", "info", "notice", "warn", "err"]
    assert fake.lines[1][1] == "pushlib.test-ksrlog: push outcome=delivered\n"
    assert all(text.count("\n") == 1 and text.endswith("\n") for _, text in fake.lines)
    assert "ValueError: boom" in fake.lines[-1][1]


def test_caller_identity_never_holds_lone_surrogates() -> None:
    raw = b'"Bob \xff\xfe" <sip:b\xffob@example.com>'.decode("utf-8", "surrogateescape")
    name, number = calls.caller_identity(raw, b"b\xffob".decode("utf-8", "surrogateescape"))
    assert (name + number).encode("utf-8")  # storable
    assert "\ufffd" in name and number == "b\ufffdob"


def test_awake_device_whose_connection_is_gone_is_pushed() -> None:
    uri = PUSH_URI + ";transport=tcp"
    awake = dev("d1", uri, 2)
    assert calls.plan_invite([calls.Binding(uri)], [awake], NOW, 10).verdict is calls.Verdict.RING
    plan = calls.plan_invite([calls.Binding(uri)], [awake], NOW, 10, frozenset({uri}))
    assert plan.verdict is calls.Verdict.PARK and [d.device_id for d in plan.push] == ["d1"] and not plan.ring


def test_silent_or_unavailable_push_device_is_pushed_other_answers_stand() -> None:
    awake = dev("d1", PUSH_URI, 2)
    assert calls.device_to_push_on_failure(PUSH_URI, 408, [awake], NOW) == awake  # silent: tm's 408
    assert calls.device_to_push_on_failure(PUSH_URI, 503, [awake], NOW) == awake
    for code in (404, 480, 486, 487, 500, 603):
        assert calls.device_to_push_on_failure(PUSH_URI, code, [awake], NOW) is None
    assert calls.device_to_push_on_failure("sip:desk@10.0.0.2", 408, [awake], NOW) is None  # plain phone
    quarantined = dev("d1", PUSH_URI, 2, quarantined_until=NOW + 60)
    assert calls.device_to_push_on_failure(PUSH_URI, 408, [quarantined], NOW) is None
    expired = dev("d1", PUSH_URI, 2, expires_at=NOW - 1)
    assert calls.device_to_push_on_failure(PUSH_URI, 408, [expired], NOW) is None
    older, newer = dev("old", PUSH_URI, 50), dev("new", PUSH_URI, 2)
    assert calls.device_to_push_on_failure(PUSH_URI, 408, [older, newer], NOW) == newer


def test_only_calls_ringing_a_push_device_are_watched_for_silence() -> None:
    awake = dev("d1", PUSH_URI, 2)
    assert calls.rings_push_device([calls.Binding("sip:desk@10.0.0.2"), calls.Binding(PUSH_URI)], [awake])
    assert not calls.rings_push_device([calls.Binding("sip:desk@10.0.0.2")], [awake])


def test_push_on_silence_define() -> None:
    assert calls.proxy_config(lambda name: None, env={}).push_on_silence_ms == 3000
    assert calls.proxy_config({"PUSH_ON_SILENCE": "1500"}.get, env={}).push_on_silence_ms == 1500
    assert calls.proxy_config({"PUSH_ON_SILENCE": "0"}.get, env={}).push_on_silence_ms == 0


def test_pending_calls_of_a_device() -> None:
    assert calls.pending_key("sip:b@h", "urn:uuid:1") == "sip:b@h|urn:uuid:1"
    assert calls.pending_calls(None) == []
    value = calls.add_pending_call(None, "k1")
    value = calls.add_pending_call(value, "k2")
    assert calls.add_pending_call(value, "k1") == value == "k1,k2"  # once each
    assert calls.pending_calls(value) == ["k1", "k2"]


def test_reached_over_stream() -> None:
    assert calls.reached_over_stream("sip:d@10.0.0.1:5070;transport=tcp;pn-prid=ab")
    assert calls.reached_over_stream("sip:d@10.0.0.1;transport=TLS")
    assert calls.reached_over_stream("sips:d@10.0.0.1")
    assert not calls.reached_over_stream("sip:d@10.0.0.1:5070")  # UDP, whatever the REGISTER came over
    assert not calls.reached_over_stream("sip:d@10.0.0.1:5070;transport=udp")


def test_call_alert_repeat_define_reaches_the_in_process_dispatcher() -> None:
    assert calls.proxy_config(lambda name: None, env={}).settings.call_alert_repeat == 10.0
    assert calls.proxy_config({"CALL_ALERT_REPEAT": "4"}.get, env={}).settings.call_alert_repeat == 4.0


def test_a_dead_devices_binding_is_dropped_never_rung_or_pushed() -> None:
    from dataclasses import replace as dc_replace

    dead = dc_replace(dev("d1", PUSH_URI, 2), dead=True)
    b = calls.Binding(PUSH_URI, ruid="r1")
    plan = calls.plan_invite([b], [dead], NOW, 10)
    assert plan.verdict is calls.Verdict.UNAVAILABLE and plan.drop == (b,) and not plan.ring and not plan.push
    asleep_dead = dc_replace(dev("d1", PUSH_URI, 60), dead=True)
    assert calls.plan_invite([b], [asleep_dead], NOW, 10).drop == (b,)
    # a dead record without a binding is simply skipped
    assert calls.plan_invite([], [asleep_dead], NOW, 10).verdict is calls.Verdict.UNAVAILABLE


# --------------------------------------------------------------------------- ends Redis missed


def test_owed_end_round_trips_with_and_without_jobs() -> None:
    call = parked(("d1", "d2"))
    jobs = tuple(calls.owed_end_jobs(call, ["d1"], True, NOW, Settings(), "answered"))
    for owed in (calls.OwedEnd("sip:b@h", "k1", "answered", True, NOW),
                 calls.OwedEnd("sip:b@h", "k1", "answered", True, NOW, jobs, attempt=3)):
        assert calls.OwedEnd.decode(owed.encode()) == owed


@pytest.mark.parametrize("raw", [None, "", "{", "[]", '{"aor": "a"}',
                                 '{"aor":"a","key":"k","reason":"r","answered":true,"ended_at":"nan",'
                                 '"attempt":0,"jobs":null}',
                                 '{"aor":"a","key":"k","reason":"r","answered":true,"ended_at":1,'
                                 '"attempt":0,"jobs":[{"kind":"nope"}]}'])
def test_owed_end_refuses_what_it_did_not_write(raw: object) -> None:
    assert calls.OwedEnd.decode(raw) is None


def test_owed_end_retries_under_a_new_key_until_it_gives_up() -> None:
    owed = calls.OwedEnd("sip:b@h", "k1", "timeout", False, NOW, attempt=2)
    assert owed.retry_key() == "k1|3"
    assert not owed.given_up(NOW + calls.OWED_END_KEEP)
    assert owed.given_up(NOW + calls.OWED_END_KEEP + 1)


def test_devices_that_joined_while_redis_was_away_get_no_cancel_push() -> None:
    call = parked(("d1", "d2", "d3"), woken=("d3",))
    jobs = calls.owed_end_jobs(call, ["d1", "d3"], True, NOW, Settings(), "answered")
    assert [(j.kind, j.device_ids) for j in jobs] == [(PushKind.CANCEL_INCOMING_CALL, ("d2",))]
    missed = calls.owed_end_jobs(call, ["d1"], False, NOW, Settings(), "timeout")
    assert [j.kind for j in missed] == [PushKind.CANCEL_INCOMING_CALL, PushKind.MISSED_CALL]
    assert missed[0].device_ids == ("d1", "d2", "d3")


def test_a_parked_call_waits_while_anyone_can_still_answer_it() -> None:
    call = parked(("d1", "d2"), woken=("d2",))
    assert calls.nobody_can_answer(call, ["d1"], open_branches=0)
    assert not calls.nobody_can_answer(call, ["d1"], open_branches=1)  # d2 (woken) still rings
    assert not calls.nobody_can_answer(call, [], open_branches=0)  # d1 may still wake
    assert not calls.nobody_can_answer(None, ["d1"], open_branches=0)  # already ended


def test_stale_bindings_do_not_identify_the_binding_just_saved() -> None:
    """Parsing a binding's push parameters is the costly part: the one just saved is never stale
    unless devices were evicted (then an evicted device's binding may share its URI)."""
    new = calls.Binding("sip:d@1.2.3.4:2222;pn-prid=abab", ruid="r2", instance="<urn:uuid:new>")
    twin = calls.Binding("sip:d@1.2.3.4:2222;pn-prid=abab", ruid="r1", instance="<urn:uuid:old>")
    asked: list[str] = []

    def identify(b: calls.Binding) -> str | None:
        asked.append(b.ruid)
        return "d1" if b.ruid == "r2" else "d0"

    assert calls.stale_bindings([new], "d1", new.uri, identify) == [] and asked == []
    assert calls.stale_bindings([twin, new], "d1", new.uri, identify, evicted=["d0"]) == [twin]
    assert asked == ["r1", "r2"]
