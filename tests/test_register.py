"""The push role's REGISTER decision (pushlib.calls.plan_register), without Kamailio."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib import calls, params
from pushlib.access import Limits
from pushlib.aor import aor_of
from pushlib.models import Provider, PushParams, UaMapping

NOW = 1_800_000_000.0
AOR = aor_of("bob", "example.com")
VOIP = "ab" * 32
FCM_TOKEN = "dGVzdA:APA91b" + "x_Y-z0" * 10
APNS = f"<sip:bob@10.0.0.1:5060;pn-provider=apns;pn-param=TEAM000001.com.example.phone.voip;pn-prid={VOIP}>"
LINPHONE = UaMapping("linphone", r"(?i)linphone")
LIMITS = Limits(min_expires=60, max_expires=3600)


class Apps:
    """app_enabled() as the router gives it, recording what it was asked."""

    def __init__(self, state: bool | None = True) -> None:
        self.state = state
        self.asked: list[tuple[str, str]] = []

    def __call__(self, provider: str, app_id: str) -> bool | None:
        self.asked.append((provider, app_id))
        return self.state


def plan(contact: str, expires: str | None = None, ua: str = "Phone/1", apps: Apps | None = None,
         mappings: tuple[UaMapping, ...] = ()) -> calls.RegisterPlan:
    return calls.plan_register(AOR, contact, expires, ua, mappings, apps or Apps(), LIMITS, NOW)


def test_query_and_star() -> None:
    assert plan("") == calls.SaveBinding()  # no Contact: a query, no Feature-Caps
    assert plan("  ") == calls.SaveBinding()
    assert plan(" * ", "0") == calls.UnregisterAll()


def test_push_device_is_saved_with_its_fields_and_feature_caps() -> None:
    apps = Apps()
    result = plan(f'"Bob" {APNS};expires=600;+sip.instance="<urn:uuid:ABC>"', apps=apps)
    assert isinstance(result, calls.SaveDevice)
    d = result.device
    assert (d.aor, d.device_id, d.user_agent) == (AOR, "urn:uuid:abc", "Phone/1")
    assert d.contact == APNS[1:-1]
    assert d.params == PushParams(Provider.APNS, "com.example.phone", voip_token=VOIP, team_id="TEAM000001")
    assert (d.registered_at, d.expires_at) == (NOW, NOW + 600)
    assert result.feature_caps == '*;+sip.pns="apns"'
    assert apps.asked == [("apns", "com.example.phone")]


def test_a_display_name_with_angle_brackets_does_not_change_the_stored_uri() -> None:
    result = plan(f'"a<b" {APNS}')
    assert isinstance(result, calls.SaveDevice) and result.device.contact == APNS[1:-1]


@pytest.mark.parametrize(
    ("contact", "pns"),
    [
        (APNS.replace("pn-provider=apns", "pn-provider=APNS.dev"), "apns.dev"),  # echoed as named, lower-case
        (f"<sip:b@h;pn-provider=fcm;pn-param=proj-1;pn-prid={FCM_TOKEN}>", "fcm"),
        (f"<sip:b@h;app-id=org.linphone.phone;pn-type=apple;pn-tok={VOIP}>", "apns"),  # legacy: the provider
    ],
)
def test_feature_caps_names_the_pns(contact: str, pns: str) -> None:
    result = plan(contact, ua="Linphone/5", mappings=(LINPHONE,))
    assert isinstance(result, calls.SaveDevice) and result.feature_caps == f'*;+sip.pns="{pns}"'


@pytest.mark.parametrize(
    ("contact", "header", "expires_at"),
    [
        (f"{APNS};expires=99999", None, NOW + 3600),
        (f"{APNS};expires=5", None, NOW + 60),
        (APNS, "120", NOW + 120),
        (f"{APNS};expires=300", "120", NOW + 300),  # the contact's param beats the header
        (APNS, None, NOW + 3600),
    ],
)
def test_expiry_is_clamped_to_the_limits(contact: str, header: str | None, expires_at: float) -> None:
    result = plan(contact, header)
    assert isinstance(result, calls.SaveDevice) and result.device.expires_at == expires_at


@pytest.mark.parametrize(("contact", "header"), [(f"{APNS};expires=0", "3600"), (APNS, "0")])
def test_expires_zero_removes_the_device(contact: str, header: str) -> None:
    result = plan(contact + ';+sip.instance="<urn:uuid:abc>"', header)
    assert result == calls.RemoveDevice("urn:uuid:abc")


def test_plain_binding_learns_every_pns() -> None:
    apps = Apps()
    assert plan("<sip:desk@10.0.0.2>;expires=60", apps=apps) == calls.SaveBinding('*;+sip.pns="apns,fcm"')
    assert apps.asked == []  # no app is looked up for a plain binding


def test_legacy_params_without_ua_mapping_are_flagged() -> None:
    contact = f"<sip:b@h;app-id=org.x.app;pn-type=apple;pn-tok={VOIP}>"
    result = plan(contact, ua="Unknown/1 " + "x" * 200, mappings=(LINPHONE,))
    assert isinstance(result, calls.SaveBinding) and result.feature_caps == '*;+sip.pns="apns,fcm"'
    assert result.legacy_ua is not None and result.legacy_ua.startswith("Unknown/1") and len(result.legacy_ua) == 80


@pytest.mark.parametrize(
    ("contact", "code", "reason", "log_reason"),
    [
        ("<sip:b@h;x=" + "a" * 520 + ">", 400, "Contact URI Too Long", "contact-uri-too-long"),
        ('"Bob <sip:b@h>', 400, "unterminated quoted string in Contact", "unterminated quoted string in Contact"),
        ("<sip:b@h;pn-provider=webpush;pn-param=x;pn-prid=y>", 555, calls.PNS_NOT_SUPPORTED,
         "unsupported pn-provider webpush"),
        ("<sip:b@h;pn-provider=apns;pn-param=T.org.x.a;pn-prid=zz>", 400, "APNs token is not hex",
         "APNs token is not hex"),
    ],
)
def test_refusals(contact: str, code: int, reason: str, log_reason: str) -> None:
    assert plan(contact) == calls.RegisterReply(code, reason, (("reason", log_reason),))


@pytest.mark.parametrize(("state", "refusal"), [(None, "App Not Configured"), (False, "App Disabled")])
def test_apps_we_do_not_push_for_get_555(state: bool | None, refusal: str) -> None:
    assert plan(APNS, apps=Apps(state)) == calls.RegisterReply(
        555, f"Push Notification Service Not Supported ({refusal})",
        (("app", "com.example.phone"), ("reason", refusal)),
    )


_PIECES = st.sampled_from(['"', "<", ">", ";", ",", "=", "%", "@", "\\", "sip:", "a", " ", "*", "expires=0",
                           "pn-provider=apns", "pn-provider=fcm", "pn-param=TEAM000001.com.x.app", "pn-param=p",
                           f"pn-prid={VOIP}", "app-id=org.x", "pn-type=apple", "+sip.instance=", "\udcff"])


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200) | st.lists(_PIECES, max_size=30).map("".join), st.none() | st.text(max_size=12),
       st.sampled_from([True, False, None]))
def test_any_contact_gets_a_plan_never_an_exception(contact: str, expires: str | None, app: bool | None) -> None:
    result = plan(contact, expires, ua="Linphone/1", apps=Apps(app), mappings=(LINPHONE,))
    if isinstance(result, calls.RegisterReply):
        assert result.code in (400, 555)
        assert re.fullmatch(r"[ -~]{1,80}", result.reason) or result.reason.startswith(calls.PNS_NOT_SUPPORTED)
    elif isinstance(result, calls.SaveDevice):
        assert result.device.contact == params.parse_name_addr(contact).uri
        assert NOW + 60 <= result.device.expires_at <= NOW + 3600
