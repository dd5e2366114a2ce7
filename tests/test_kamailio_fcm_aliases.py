"""Integration: FCM apps as devices name them. Real Kamailio (KEMI mode, push role, auth on) +
redis-server + sandbox + SIPp; the operator registers the app's aliases with `pushlib-admin`.

An Android app puts whatever it likes in `pn-param` (often the sender id / project number, or the
package name); the push must still go to the service account's project.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pushlib.cli import main
from tests.support import (
    DOMAIN,
    FCM_PROJECT,
    Stack,
    asleep,
    fcm_token,
    payload_data,
    push_kind,
    push_stack,
    register,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
)

WAIT = 4.0
SENDER = "123456789012"  # the project number, as FCM's sender id
PACKAGE = "com.example.phone"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with push_stack(auth=True, wait_window=WAIT, awake_window=10) as s:
        # the operator's command: the stack's FCM app again, now with the names its devices use
        files = tmp_path_factory.mktemp("fcm-app")
        app = s.fcm_app
        assert app.fcm_service_account and app.ca_pem and app.custom_host
        (files / "sa.json").write_text(app.fcm_service_account)
        (files / "ca.pem").write_text(app.ca_pem)
        assert main(["--redis-url", s.redis.url, "app", "set-fcm", "--service-account", str(files / "sa.json"),
                     "--host", app.custom_host, "--ca-file", str(files / "ca.pem"),
                     "--alias", SENDER, "--alias", PACKAGE]) == 0
        yield s


def _user() -> str:
    return "u" + uuid.uuid4().hex[:10]


def test_device_naming_the_app_by_its_sender_id_gets_its_call(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), fcm_token()
    phone = sipp_device(tmp, "udp")
    contact = rfc8599_fcm_contact(phone.port, tok, project=SENDER)
    r = register(stack, user, contact, "udp")
    assert r.status == 200, r.raw[:300]
    assert r.header("Feature-Caps") == ['*;+sip.pns="fcm"']
    assert [d.params.app_id for d in stack.store.devices(f"sip:{user}@{DOMAIN}")] == [SENDER]
    asleep(stack, user)

    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    pushes = stack.wait_pushes(tok, 1, kind="incomingCall")
    assert len(pushes) == 1, stack.pushes(tok)
    push = pushes[0]
    # sent with the project's service account to the project's URL, whatever name the device used
    assert push["project_id"] == FCM_PROJECT
    assert str(push["name"]).startswith(f"projects/{FCM_PROJECT}/messages/")
    assert push_kind(push) == "incomingCall" and payload_data(push)["call_id"]

    assert register(stack, user, contact, "udp").status == 200  # the woken app
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert phone.wait(15) == 0 and phone.received("INVITE") == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_pn_param_nobody_configured_still_gets_555(stack: Stack, transport: str) -> None:
    user = _user()
    r = register(stack, user, rfc8599_fcm_contact(5960, fcm_token(), transport, project="999999999999"), transport)
    assert r.status == 555 and "App Not Configured" in r.reason, r.raw[:300]
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []


def test_a_removed_alias_is_refused(stack: Stack) -> None:
    assert main(["--redis-url", stack.redis.url, "app", "alias-remove", "fcm", FCM_PROJECT, PACKAGE]) == 0
    user = _user()
    r = register(stack, user, rfc8599_fcm_contact(5961, fcm_token(), project=PACKAGE), "udp")
    assert r.status == 555 and "App Not Configured" in r.reason, r.raw[:300]
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []
    # the app itself and its other alias are untouched
    for name in (FCM_PROJECT, SENDER):
        assert register(stack, user, rfc8599_fcm_contact(5962, fcm_token(), project=name), "udp").status == 200
