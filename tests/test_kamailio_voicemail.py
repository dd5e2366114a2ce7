"""Integration: voicemail notifications on real Kamailio + Redis + the sandbox providers.

- A voicemail server's RFC 3842 MWI NOTIFY (from VOICEMAIL_SOURCES) for a user with a push device
  is answered 200 and pushes voicemailReceived with the counts; only a rise in new messages pushes;
  a malformed summary gets 400, a wrong content type 415, and neither pushes.
- A stranger (any other source address, the proxy's own included) gets 403 and pushes nobody.
- The same push through the HTTP API (`POST /1.0/users/{user}/voicemail`, send scope, tenants).
- A user's own voicemail URI (set with `pushlib-admin subscriber voicemail` or the API) takes the
  unanswered parked call, with no FALLBACK_URI configured at all.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.apistack import api_process, create_key
from pushlib.apikeys import Scope
from pushlib.mwi import VoicemailStore
from tests.support import (
    DOMAIN,
    VENV_PYTHON,
    SipClient,
    SipResponse,
    Stack,
    asleep,
    fcm_token,
    free_port,
    payload_data,
    push_kind,
    push_stack,
    register,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    stop_all_sipp,
)

WAIT = 3.0
VM_SERVER = "127.0.0.3"  # the voicemail server's address (another loopback address plays another host)
STRANGER = "127.0.0.2"
VOICEMAIL = "voicemailReceived"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # no FALLBACK_URI: per-user voicemail URIs alone send unanswered calls to voicemail
    with push_stack(auth=True, wait_window=WAIT, extra_defines={"VOICEMAIL_SOURCES": f'"{VM_SERVER}"'}) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_stray_sipp() -> Iterator[None]:
    yield
    stop_all_sipp()


def _user() -> str:
    return "m" + uuid.uuid4().hex[:10]


def _summary(new: int, old: int) -> str:
    return f"Messages-Waiting: {'yes' if new else 'no'}\r\nMessage-Account: sip:*97@{DOMAIN}\r\n" \
           f"Voice-Message: {new}/{old} (0/0)\r\n"


def notify(stack: Stack, user: str, body: str, source: str = VM_SERVER,
           content_type: str = "application/simple-message-summary") -> SipResponse:
    """An unsolicited MWI NOTIFY (no To tag) from `source`, over UDP; its final response."""
    with SipClient(stack.kamailio.port, "udp", source=source) as c:
        raw = body.encode()
        lines = [
            f"NOTIFY sip:{user}@{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP {source}:{c.local_port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport",
            f"From: <sip:voicemail@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}",
            f"To: <sip:{user}@{DOMAIN}>",
            f"Call-ID: {uuid.uuid4().hex}",
            "CSeq: 1 NOTIFY",
            f"Contact: <sip:voicemail@{source}:{c.local_port}>",
            "Max-Forwards: 70",
            "Event: message-summary",
            "Subscription-State: active",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(raw)}",
        ]
        c.send("\r\n".join(lines) + "\r\n\r\n" + body)
        return c.response(5)


def _push_user(stack: Stack) -> tuple[str, str]:
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5960, tok, "udp"), "udp").status == 200
    return user, tok


def _voicemail_pushes(stack: Stack, tok: str) -> list[dict[str, object]]:
    return [p for p in stack.pushes(tok) if push_kind(p) == VOICEMAIL]


def test_mwi_notify_pushes_counts_and_only_a_rise_pushes(stack: Stack) -> None:
    user, tok = _push_user(stack)
    r = notify(stack, user, _summary(2, 8))
    assert r.status == 200, r.raw
    [push] = stack.wait_pushes(tok, 1, kind=VOICEMAIL)
    data = payload_data(push)
    assert data["new_messages"] == "2" and data["old_messages"] == "8" and data["body"] == "2 new voicemails"
    assert data["type"] == VOICEMAIL
    # the same counts again (a periodic resend), fewer new (the user listened): 200, no push
    assert notify(stack, user, _summary(2, 8)).status == 200
    assert notify(stack, user, _summary(1, 9)).status == 200
    time.sleep(0.5)
    assert len(_voicemail_pushes(stack, tok)) == 1
    # a rise from the last count (1 -> 3) pushes again
    assert notify(stack, user, _summary(3, 9)).status == 200
    pushes = stack.wait_pushes(tok, 2, kind=VOICEMAIL)
    assert [payload_data(p)["new_messages"] for p in pushes] == ["2", "3"]
    assert VoicemailStore(stack.store.client).counts(f"sip:{user}@{DOMAIN}") == (3, 9)
    log = stack.kamailio.log()
    assert f"pusher: mwi aor=sip:{user}@{DOMAIN} new=3 old=9 previous=1 pushed=True" in log


def test_malformed_summary_and_wrong_type_are_refused_without_a_push(stack: Stack) -> None:
    user, tok = _push_user(stack)
    r = notify(stack, user, "Messages-Waiting: perhaps\r\nVoice-Message: 9/9\r\n")
    assert (r.status, r.reason) == (400, "Bad Request (Malformed Message Summary)")
    r = notify(stack, user, "Voice-Message: 9/9\r\n")
    assert r.status == 400
    r = notify(stack, user, _summary(9, 9), content_type="text/plain")
    assert r.status == 415 and r.header("Accept") == ["application/simple-message-summary"]
    time.sleep(0.5)
    assert _voicemail_pushes(stack, tok) == []
    assert VoicemailStore(stack.store.client).counts(f"sip:{user}@{DOMAIN}") is None
    assert "pusher: mwi-refused aor=sip:" + user in stack.kamailio.log()


@pytest.mark.parametrize("source", [STRANGER, "127.0.0.1"])
def test_a_stranger_cannot_make_us_push_anyone(stack: Stack, source: str) -> None:
    user, tok = _push_user(stack)
    r = notify(stack, user, _summary(5, 0), source=source)
    assert (r.status, r.reason) == (403, "Forbidden (Not A Voicemail Server)")
    time.sleep(0.5)
    assert _voicemail_pushes(stack, tok) == []
    assert VoicemailStore(stack.store.client).counts(f"sip:{user}@{DOMAIN}") is None
    assert f"pusher: mwi-refused aor=sip:{user}@{DOMAIN} src={source} reason=not-a-voicemail-source" in \
        stack.kamailio.log()


def test_user_without_push_device_gets_the_notify_relayed_as_before(stack: Stack) -> None:
    """No push device: nothing kept, nothing pushed; the summary goes to the bindings (none: 404)."""
    user = _user()
    stack.add_user(user)
    assert notify(stack, user, _summary(1, 0)).status == 404
    assert VoicemailStore(stack.store.client).counts(f"sip:{user}@{DOMAIN}") is None


def test_http_api_voicemail_push(stack: Stack) -> None:
    user, tok = _push_user(stack)
    sender = create_key(stack.redis.url, frozenset({Scope.SEND}))
    reader = create_key(stack.redis.url, frozenset({Scope.READ}))
    with api_process(stack.redis.url, stack.tmpdir) as (url, _):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {sender}"}, timeout=20) as c:
            path = f"/1.0/users/{user}@{DOMAIN}/voicemail"
            r = c.post(path, json={"new_messages": 4, "old_messages": 1, "caller_name": "Bob"})
            assert r.status_code == 200, r.text
            assert r.json() == {"aor": f"sip:{user}@{DOMAIN}", "new_messages": 4, "old_messages": 1,
                                "previous_new": None, "pushed": True}
            [push] = stack.wait_pushes(tok, 1, kind=VOICEMAIL)
            assert payload_data(push)["new_messages"] == "4" and payload_data(push)["caller_name"] == "Bob"
            # no rise: no push (shared counts with the SIP side: a NOTIFY with 4 new does not push either)
            assert c.post(path, json={"new_messages": 4}).json()["pushed"] is False
            assert notify(stack, user, _summary(4, 1)).status == 200
            for bad in ({"new_messages": -1}, {"new_messages": "3"}, {"new_messages": 1, "x": 1}, {}):
                assert c.post(path, json=bad).status_code == 422, bad
            assert c.post(f"/1.0/users/nobody-{uuid.uuid4().hex[:6]}@{DOMAIN}/voicemail",
                          json={"new_messages": 1}).status_code == 409  # no device a push can reach
        r = httpx.post(f"{url}{path}", json={"new_messages": 9}, headers={"Authorization": f"Bearer {reader}"})
        assert r.status_code == 403  # the send scope is needed
        assert httpx.post(f"{url}{path}", json={"new_messages": 9}).status_code == 401
    time.sleep(0.5)
    assert len(_voicemail_pushes(stack, tok)) == 1


def test_per_user_voicemail_uri_takes_the_unanswered_call(stack: Stack, tmp_path: Path) -> None:
    user, _ = _push_user(stack)
    vm_port = free_port()
    uri = f"sip:box-{{user}}@127.0.0.1:{vm_port}"
    cli = [str(VENV_PYTHON), "-m", "pushlib.cli", "--redis-url", stack.redis.url, "subscriber", "voicemail",
           f"{user}@{DOMAIN}"]
    assert subprocess.run([*cli, "tel:+1234"], capture_output=True, text=True, check=False).returncode == 2
    done = subprocess.run([*cli, uri], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert uri in subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    voicemail = sipp_device(tmp_path, "udp", port=vm_port)
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 15) == 0, caller.logs() + caller.messages()[-3000:]
    assert caller.final_codes() == [200]  # answered by the user's voicemail (no FALLBACK_URI configured)
    assert voicemail.wait(10) == 0 and voicemail.received("INVITE") == 1
    invite = voicemail.messages()[voicemail.messages().index("INVITE sip:"):]
    assert invite.startswith(f"INVITE sip:box-{user}@127.0.0.1:{vm_port}")
    assert f"Diversion: <sip:{user}@{DOMAIN}>;reason=no-answer" in invite
    # cleared: the next unanswered call gets the plain 480 again
    assert subprocess.run([*cli, "--clear"], capture_output=True, text=True, check=False).returncode == 0
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    caller.wait(WAIT + 15)
    assert caller.final_codes() == [480]


def test_api_sets_and_clears_the_voicemail_uri(stack: Stack) -> None:
    user = _user()
    stack.add_user(user)
    admin = create_key(stack.redis.url, frozenset({Scope.ADMIN, Scope.READ}))
    with api_process(stack.redis.url, stack.tmpdir) as (url, _), \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=20) as c:
        path = f"/1.0/subscribers/{user}@{DOMAIN}/voicemail"
        assert c.put(path, json={"uri": "sip:vm@127.0.0.1:5099"}).status_code == 204
        assert c.get(f"/1.0/subscribers/{user}@{DOMAIN}").json()["voicemail_uri"] == "sip:vm@127.0.0.1:5099"
        for bad in ("tel:+123", "sip:a b@c", "sip:" + "x" * 300, "http://x"):
            r = c.put(path, json={"uri": bad})
            assert r.status_code == 422, (bad, r.text)
        assert c.delete(path).status_code == 204
        assert c.delete(path).status_code == 404
        assert c.get(f"/1.0/subscribers/{user}@{DOMAIN}").json()["voicemail_uri"] is None
    assert VoicemailStore(stack.store.client).uri(f"sip:{user}@{DOMAIN}") is None

