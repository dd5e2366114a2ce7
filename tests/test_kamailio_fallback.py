"""Integration: FALLBACK_URI (voicemail) at the end of the wait window, KEMI and role mode.

The voicemail is a SIPp UAS that answers. A call nobody answers within the window goes there
instead of getting 480: the caller is answered by the voicemail, and the user still gets a
missedCall push (voicemail answered, the user did not; a voicemailReceived push is the voicemail
server's business) while the pushed devices get cancelIncomingCall. Without FALLBACK_URI the
behaviour is the plain 480 (tests/test_kamailio_flows.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    NATIVE_HOST_CFG,
    Stack,
    asleep,
    check_config,
    fcm_token,
    free_port,
    push_kind,
    push_stack,
    register,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    stop_all_sipp,
)

WAIT = 3.0


def _fallback_defines(vm_port: int) -> dict[str, str | None]:
    return {"FALLBACK_URI": f'"sip:{{user}}@127.0.0.1:{vm_port}"'}


@pytest.fixture(scope="module")
def vm_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(vm_port: int) -> Iterator[Stack]:
    with push_stack(auth=True, wait_window=WAIT, awake_window=10, extra_defines=_fallback_defines(vm_port)) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_stray_sipp() -> Iterator[None]:
    yield
    stop_all_sipp()


def _user() -> str:
    return "v" + uuid.uuid4().hex[:10]


def _assert_voicemail_got_call(vm_messages: str, user: str) -> None:
    invite = vm_messages[vm_messages.index("INVITE sip:"):]
    assert invite.startswith(f"INVITE sip:{user}@127.0.0.1:")  # {user} of FALLBACK_URI filled in
    assert f"Diversion: <sip:{user}@127.0.0.1>;reason=no-answer" in invite
    assert "Record-Route:" in invite  # in-dialog requests keep going through the proxy


def _assert_missed_and_cancel(stack: Stack, token: str) -> None:
    kinds = [push_kind(p) for p in stack.wait_pushes(token, 3)]
    assert kinds[0] == "incomingCall" and sorted(kinds[1:]) == ["cancelIncomingCall", "missedCall"], kinds
    time.sleep(0.3)
    assert len(stack.pushes(token)) == 3


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_unanswered_parked_call_goes_to_voicemail(stack: Stack, tmp_path: Path, vm_port: int,
                                                  transport: str) -> None:
    user, tok = _user(), fcm_token()
    voicemail = sipp_device(tmp_path, "udp", port=vm_port)
    assert register(stack, user, rfc8599_fcm_contact(5950, tok, transport), transport).status == 200
    asleep(stack, user)
    started = time.monotonic()
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, transport)
    assert caller.wait(WAIT + 15) == 0, caller.logs() + caller.messages()[-3000:]
    assert caller.final_codes() == [200]  # answered by the voicemail, not 480
    assert time.monotonic() - started >= WAIT - 0.2  # ... only once the window is over
    assert voicemail.wait(10) == 0, voicemail.logs()
    assert voicemail.received("INVITE") == 1 and voicemail.received("BYE") == 1
    _assert_voicemail_got_call(voicemail.messages(), user)
    _assert_missed_and_cancel(stack, tok)
    assert "pusher: fallback" in stack.kamailio.log()


def test_device_still_ringing_at_window_end_is_canceled_for_voicemail(stack: Stack, tmp_path: Path,
                                                                      vm_port: int) -> None:
    # (an FCM phone: an iOS VoIP-only token gets no alert pushes such as missedCall)
    user, tok = _user(), fcm_token()
    desk = sipp_device(tmp_path, "udp", scenario="device-ring.xml")  # rings until CANCELed
    voicemail = sipp_device(tmp_path, "udp", port=vm_port)
    assert register(stack, user, rfc8599_fcm_contact(5951, tok, instance=str(uuid.uuid4())), "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, f"<sip:desk@127.0.0.1:{desk.port}>", "udp").status == 200
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 15) == 0, caller.logs() + caller.messages()[-3000:]
    assert caller.final_codes() == [200]
    assert desk.wait(10) == 0, desk.logs()  # INVITE, 180, CANCEL, 487
    assert voicemail.wait(10) == 0 and voicemail.received("INVITE") == 1
    _assert_voicemail_got_call(voicemail.messages(), user)
    _assert_missed_and_cancel(stack, tok)


def test_voicemail_unreachable_caller_gets_its_failure(stack: Stack, tmp_path: Path) -> None:
    """The fallback fails too (nobody listens on the voicemail port): no loop, a final error."""
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5952, tok), "tcp").status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 30) == 0, caller.logs()
    [code] = caller.final_codes()
    assert code >= 400
    assert stack.kamailio.log().count("pusher: fallback aor=sip:" + user) == 1
    _assert_missed_and_cancel(stack, tok)


def test_role_mode_fallback(tmp_path: Path) -> None:
    vm = free_port()
    result = check_config(NATIVE_HOST_CFG, {"SIP_PORT": "5999", **_fallback_defines(vm)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with push_stack(auth=False, wait_window=WAIT, cfg=NATIVE_HOST_CFG, extra_defines=_fallback_defines(vm)) as s:
        user, tok = "n" + uuid.uuid4().hex[:10], fcm_token()
        voicemail = sipp_device(tmp_path, "udp", port=vm)
        assert register(s, user, rfc8599_fcm_contact(5953, tok), "udp").status == 200
        asleep(s, user)
        caller = sipp_caller(tmp_path, s.kamailio.port, user, "udp")
        assert caller.wait(WAIT + 15) == 0, caller.logs()
        assert caller.final_codes() == [200]
        assert voicemail.wait(10) == 0 and voicemail.received("INVITE") == 1
        _assert_voicemail_got_call(voicemail.messages(), user)
        _assert_missed_and_cancel(s, tok)
