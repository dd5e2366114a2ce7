"""Unit tests of the pure parts of voicemail notifications and re-registration pushes:
the RFC 3842 message-summary parser (with hypothesis fuzzing), rise detection, who may send
summaries, the voicemail URI check, the voicemailReceived / registrationRefresh payloads, and the
due-set logic of re-registration pushes (lead, due time, members, +sip.pnsreg)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib import mwi, reregister
from pushlib.models import Device, Provider, PushKind, PushParams
from pushlib.payloads import build_apns, build_fcm
from pushlib.settings import Settings

ASTERISK = "Messages-Waiting: yes\r\nMessage-Account: sip:*97@vm.example.com\r\nVoice-Message: 2/8 (0/2)\r\n"


# --------------------------------------------------------------------------- the parser


def test_a_typical_summary_parses() -> None:
    s = mwi.parse_summary(ASTERISK)
    assert s == mwi.MessageSummary(True, 2, 8, 0, 2, "sip:*97@vm.example.com")


@pytest.mark.parametrize("body, new, old", [
    ("Messages-Waiting: no\r\n", 0, 0),  # no Voice-Message line: nothing counted
    ("messages-waiting:YES\nvoice-message: 3/0\n", 3, 0),  # case, LF only, no urgent part
    ("Messages-Waiting: yes\r\nFax-Message: 1/1\r\nVoice-Message: 4 / 5 ( 1 / 0 )\r\n", 4, 5),
    ("Messages-Waiting: yes\r\nVoice-Message: 1/2\r\n\r\nTo: <sip:a@b>\r\nSubject: hi\r\n", 1, 2),  # msg headers
    ("\r\nMessages-Waiting: yes\r\nX-Vendor: whatever\r\nVoice-Message: 7/0\r\n", 7, 0),  # extension header
])
def test_valid_variants(body: str, new: int, old: int) -> None:
    s = mwi.parse_summary(body)
    assert (s.new, s.old) == (new, old)


@pytest.mark.parametrize("body", [
    "",
    "Voice-Message: 2/8\r\n",  # no status line
    "Messages-Waiting: maybe\r\n",
    "Messages-Waiting: yes\r\nMessages-Waiting: no\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: two/8\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: -1/8\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: 1/2 (3)\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: 1/2\r\nVoice-Message: 3/4\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: 1234567890/0\r\n",  # 10 digits: not a count
    "Messages-Waiting: yes\r\nthis is not a header\r\n",
    "Messages-Waiting: yes\r\nVoice-Message: 1/2\x00\r\n",
    "Messages-Waiting: yes\r\nX: " + "a" * 5000,  # too big
    "Messages-Waiting: yes\r\n" + "X-A: b\r\n" * 70,  # too many lines
    "Messages-Waiting: yes\r\nX-Bad: \udcff\r\n",  # not UTF-8 (as the router hands raw bytes on)
])
def test_malformed_summaries_are_refused(body: str) -> None:
    with pytest.raises(mwi.MwiError):
        mwi.parse_summary(body)


def test_bytes_input_must_be_utf8_and_small() -> None:
    assert mwi.parse_summary(ASTERISK.encode()).new == 2
    with pytest.raises(mwi.MwiError):
        mwi.parse_summary(b"Messages-Waiting: yes\r\nX-A: \xff\r\n")
    with pytest.raises(mwi.MwiError):
        mwi.parse_summary(b"Messages-Waiting: yes\r\n" + b" " * mwi.MAX_BODY_BYTES)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=600), st.binary(max_size=600)))
def test_fuzz_anything_parses_or_is_refused_cleanly(body: str | bytes) -> None:
    try:
        s = mwi.parse_summary(body)
    except mwi.MwiError:
        return
    assert 0 <= s.new <= mwi.MAX_COUNT and 0 <= s.old <= mwi.MAX_COUNT


counts = st.integers(min_value=0, max_value=mwi.MAX_COUNT)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), counts, counts, counts, counts,
       st.sampled_from(["", "sip:*97@vm.example.com", "sips:alice@example.org"]))
def test_fuzz_formatted_summaries_round_trip(waiting: bool, new: int, old: int, un: int, uo: int,
                                              account: str) -> None:
    summary = mwi.MessageSummary(waiting, new, old, un, uo, account)
    assert mwi.parse_summary(mwi.format_summary(summary)) == summary


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "Messages-Waiting: yes", "Voice-Message: 1/2", "Voice-Message: x", "Fax-Message: 3/4 (0/0)", "X-A: b",
    "", "garbage", "Message-Account: sip:a@b", "Messages-Waiting: no", ":", "None: 0/0",
]), max_size=8))
def test_fuzz_line_mixtures(lines: list[str]) -> None:
    body = "\r\n".join(lines)
    try:
        s = mwi.parse_summary(body)
    except mwi.MwiError:
        return
    assert s.new in (0, 1)


# --------------------------------------------------------------------------- rise, counts, jobs


@pytest.mark.parametrize("previous, new, pushes", [
    (None, 0, False), (None, 1, True), (0, 1, True), (2, 2, False), (2, 1, False), (2, 3, True), (5, 0, False),
])
def test_only_a_rise_in_new_messages_pushes(previous: int | None, new: int, pushes: bool) -> None:
    assert mwi.rises(previous, new) is pushes


def test_counts_are_checked() -> None:
    assert mwi.check_counts(0, mwi.MAX_COUNT) == (0, mwi.MAX_COUNT)
    for bad in ((-1, 0), (0, mwi.MAX_COUNT + 1), (True, 0)):
        with pytest.raises(mwi.MwiError):
            mwi.check_counts(*bad)


def _ios() -> Device:
    return Device("sip:a@b", "d1", PushParams(Provider.APNS, "com.example.phone", "aa" * 32, "bb" * 32, "T1"))


def _android() -> Device:
    return Device("sip:a@b", "d2", PushParams(Provider.FCM, "example-phone", alert_token="tok123"))


def test_voicemail_job_and_payloads_carry_the_counts() -> None:
    job = mwi.voicemail_job("sip:a@b", 2, 8, 1000.0, 3600)
    assert job.kind is PushKind.VOICEMAIL and job.deadline == 4600.0 and job.device_ids == ()
    apns = build_apns(job.kind, _ios(), dict(job.data), job.deadline, 1000.0, Settings())
    assert apns is not None
    body = json.loads(apns.payload)
    assert body["new_messages"] == "2" and body["old_messages"] == "8"
    assert body["aps"]["alert"] == {"title": "Voicemail", "body": "2 new voicemails"}
    assert apns.headers["apns-push-type"] == "alert" and apns.headers["apns-priority"] == "5"
    assert apns.token == "bb" * 32  # the remote token, never the VoIP one
    fcm = build_fcm(job.kind, _android(), dict(job.data), job.deadline, 1000.0, Settings())
    assert fcm is not None
    msg = json.loads(fcm.body)["message"]
    assert msg["data"]["new_messages"] == "2" and msg["android"]["priority"] == "normal"
    assert mwi.voicemail_body(1) == "1 new voicemail"


# --------------------------------------------------------------------------- sources, URI


def test_sources_parse_and_match() -> None:
    nets = mwi.parse_sources("10.0.0.5, 192.168.1.0/24 ::1")
    assert mwi.source_allowed("10.0.0.5", nets) and mwi.source_allowed("192.168.1.77", nets)
    assert mwi.source_allowed("[::1]", nets)
    assert not mwi.source_allowed("10.0.0.6", nets) and not mwi.source_allowed("not-an-ip", nets)
    assert mwi.parse_sources(None) == () and not mwi.source_allowed("127.0.0.1", ())
    with pytest.raises(ValueError, match="VOICEMAIL_SOURCES"):
        mwi.parse_sources("10.0.0.1,vm.example.com")


@pytest.mark.parametrize("uri", ["sip:vm@127.0.0.1:5070", "sips:alice@vm.example.com;transport=tls",
                                 "sip:{user}@vm.example.com", "sip:voicemail.example.com"])
def test_good_voicemail_uris(uri: str) -> None:
    assert mwi.check_voicemail_uri(uri) == uri


@pytest.mark.parametrize("uri", ["", "tel:+123", "http://x", "sip:", "sip:a b@host", "sip:<a@b>", 'sip:"a"@b',
                                 "sip:a@b\r\nX: y", "sip:" + "a" * 300 + "@b", "sip:a@"])
def test_bad_voicemail_uris(uri: str) -> None:
    with pytest.raises(mwi.MwiError):
        mwi.check_voicemail_uri(uri)


# --------------------------------------------------------------------------- re-registration: the due set


def test_lead_is_the_setting_but_at_most_half_the_lifetime() -> None:
    assert reregister.lead(300, 3600) == 300
    assert reregister.lead(300, 120) == 60  # a short registration is not pushed the moment it is made
    assert reregister.lead(0, 3600) == 0 and reregister.lead(300, 0) == 0
    assert reregister.due_at(1000.0, 4600.0, 300) == 4300.0
    assert reregister.due_at(1000.0, 4600.0, 0) is None


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_members_round_trip(aor: str, device_id: str) -> None:
    assert reregister.parse_member(reregister.member(aor, device_id)) == (aor, device_id)


def test_bad_members_and_claim_replies() -> None:
    for raw in ("", "x", "[]", '["a"]', '["a", 1]', '{"a": 1}', '["", "d"]'):
        assert reregister.parse_member(raw) is None
    flat = [reregister.member("sip:a@b", "d1"), "12.5", "junk", "3", reregister.member("sip:c@d", "d2"), "14"]
    assert reregister.parse_claimed(flat) == [("sip:a@b", "d1", 12.5), ("sip:c@d", "d2", 14.0)]


def test_pnsreg_indicator_only_when_the_contact_asks_for_it() -> None:
    caps = '*;+sip.pns="apns"'
    tagged = "<sip:dev@1.2.3.4;pn-provider=apns;pn-prid=ab;pn-param=T.x.voip>;+sip.pnsreg;expires=600"
    plain = "<sip:dev@1.2.3.4;pn-provider=apns;pn-prid=ab;pn-param=T.x.voip>;expires=600"
    assert reregister.with_pnsreg(caps, tagged, 300, 3600) == '*;+sip.pns="apns";+sip.pnsreg="300"'
    assert reregister.with_pnsreg(caps, tagged, 300, 200) == '*;+sip.pns="apns";+sip.pnsreg="100"'
    assert reregister.with_pnsreg(caps, plain, 300, 3600) == caps
    assert reregister.with_pnsreg(caps, tagged, 0, 3600) == caps  # feature off
    assert reregister.with_pnsreg(caps, "<<<", 300, 3600) == caps


def test_refresh_job_is_one_background_push_per_binding_and_period() -> None:
    a = reregister.refresh_job("sip:a@b", "d1", 4300.0, 4600.0, 4300.5)
    b = reregister.refresh_job("sip:a@b", "d1", 4300.0, 4700.0, 4301.0)
    c = reregister.refresh_job("sip:a@b", "d1", 8000.0, 8300.0, 8000.0)
    assert a.job_id == b.job_id != c.job_id
    assert a.kind is PushKind.REGISTRATION_REFRESH and a.deadline == 4600.0 and a.device_ids == ("d1",)
    apns = build_apns(a.kind, _ios(), dict(a.data), a.deadline, 4300.5, Settings())
    assert apns is not None and apns.token == "bb" * 32
    assert apns.headers["apns-push-type"] == "background" and apns.headers["apns-priority"] == "5"
    assert apns.headers["apns-topic"] == "com.example.phone"  # never the .voip topic
    assert json.loads(apns.payload) == {"aps": {"content-available": 1}, "type": "registrationRefresh",
                                        "sent_at": 4300.5, "aor": "sip:a@b"}
    voip_only = Device("sip:a@b", "d3", PushParams(Provider.APNS, "com.example.phone", voip_token="cc" * 32))
    assert build_apns(a.kind, voip_only, dict(a.data), a.deadline, 4300.5, Settings()) is None
    fcm = build_fcm(a.kind, _android(), dict(a.data), a.deadline, 4300.5, Settings())
    assert fcm is not None
    msg = json.loads(fcm.body)["message"]
    assert msg["android"]["priority"] == "normal" and "notification" not in msg
