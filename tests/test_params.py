"""Contact parameter splitting and push-parameter parsing (RFC 8599 and legacy forms)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib import calls, params
from pushlib.models import Provider, PushParams, UaMapping
from pushlib.params import (
    MalformedPushParams,
    NameAddr,
    PushParamError,
    UnsupportedProvider,
    contact_header_params,
    contact_uri_params,
    device_id_for,
    has_legacy_params,
    parse_name_addr,
    parse_push_params,
    sip_reason,
)

VOIP = "a1" * 32
REMOTE = "B2" * 32
FCM_TOKEN = "dGVzdA:APA91b" + "x_Y-z0" * 25
KAZOO = UaMapping(name="kazoo-ios", user_agent_regex=r"^Kazoo-iOS/", app_param="x-app",
                  type_param="x-kind", token_param="x-token")
LINPHONE = UaMapping(name="linphone", user_agent_regex=r"(?i)linphone")


# --- Contact splitting -------------------------------------------------------------------

CONTACT = (
    '"Bob \\"B\\" <x>;y" <sip:bob;ext=1@example.com:5061;transport=TLS;PN-Provider=apns'
    ';pn-param=ABCD1234.org.example.phone.voip;pn-prid=' + VOIP + ';ob?Subject=hi>'
    ' ; expires = 600;+sip.instance="<urn:uuid:0C3D-11>";reg-id=1, <sip:second@example.com;a=b>'
)


def test_uri_params_only_inside_brackets_lowercased_and_first_contact_only():
    assert contact_uri_params(CONTACT) == {
        "transport": "TLS",
        "pn-provider": "apns",
        "pn-param": "ABCD1234.org.example.phone.voip",
        "pn-prid": VOIP,
        "ob": "",
    }


def test_header_params_unquoted_with_whitespace_and_instance():
    assert contact_header_params(CONTACT) == {
        "expires": "600",
        "+sip.instance": "<urn:uuid:0C3D-11>",
        "reg-id": "1",
    }


@pytest.mark.parametrize(
    ("contact", "uri", "header"),
    [
        # RFC 3261: without <> the parameters after the URI belong to the header.
        ("sip:u@h;pn-provider=fcm;expires=3", {}, {"pn-provider": "fcm", "expires": "3"}),
        ("<sip:u@h;pn-provider=fcm>;expires=3", {"pn-provider": "fcm"}, {"expires": "3"}),
        ("Bob <sip:u@h;A=1;a=2>", {"a": "1"}, {}),  # first occurrence wins
        ("*", {}, {}),
        ("", {}, {}),
        ("<sip:u@h;pn-param=T.com.x%2Eapp%26remote>", {"pn-param": "T.com.x.app&remote"}, {}),
        ("<sip:+1;phone-context=x@h;user=phone>", {"user": "phone"}, {}),
        ("<sip:h;lr>;q=0.5;ob", {"lr": ""}, {"q": "0.5", "ob": ""}),
        ('<sip:a@h>;x="a,b;c"', {}, {"x": "a,b;c"}),
    ],
)
def test_contact_param_splitting(contact, uri, header):
    assert contact_uri_params(contact) == uri
    assert contact_header_params(contact) == header


@pytest.mark.parametrize(
    "contact",
    [
        "<sip:u@h;pn-prid=%zz>",
        "<sip:u@h;pn-prid=ab%0>",
        "<sip:u@h;pn-prid=%00ab>",
        "<sip:u@h;pn-prid=%0d%0a>",
        "<sip:u@h;pn-prid=%ff%fe>",  # not UTF-8
        "<sip:u@h;pn-prid=a\x01b>",
        "<sip:u@h\r\nX: y>",
        "<sip:u@h;pn-prid=abc",
        '"Bob <sip:u@h>',
        "<sip:u@h>;x=\ud800",
    ],
)
def test_contact_junk_is_malformed(contact):
    with pytest.raises(MalformedPushParams):
        contact_uri_params(contact)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=300)
       | st.lists(st.sampled_from(['"', "<", ">", ";", ",", "=", "%", "@", "\\", "?", "sip:", "a", " ",
                                   "%4", "%zz", "%e2%82", "pn-prid"]), max_size=40).map("".join))
def test_contact_parsers_only_raise_push_param_errors(text):
    for parse in (contact_uri_params, contact_header_params):
        try:
            result = parse(text)
        except PushParamError as exc:
            assert_reason_phrase(str(exc))
        else:
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())
            assert all(k == k.lower() for k in result)


@pytest.mark.parametrize(
    ("value", "display", "uri", "params"),
    [
        ('"a<b" <sip:x@h>', "a<b", "sip:x@h", ""),
        ('"a>b;c,d" <sip:x@h;pn-prid=1>;expires=60', "a>b;c,d", "sip:x@h;pn-prid=1", ";expires=60"),
        ('"say \\"<hi>\\" \\\\" <sip:x@h>', 'say "<hi>" \\', "sip:x@h", ""),
        ("Bob Smith <sip:x@h>;q=1, <sip:y@h>", "Bob Smith", "sip:x@h", ";q=1"),
        ('<sip:x@h>;x="a,b";y=1, "c" <sip:z@h>', "", "sip:x@h", ';x="a,b";y=1'),
        ("sip:x@h;expires=60, sip:y@h", "", "sip:x@h", ";expires=60"),
        ("sip:x@h, sip:y@h;q=1", "", "sip:x@h", ""),
        ("  <sip:x@h>  ", "", "sip:x@h", ""),
        ("*", "", "*", ""),
        ("", "", "", ""),
    ],
)
def test_name_addr_split(value: str, display: str, uri: str, params: str) -> None:
    addr = parse_name_addr(value)
    assert (addr.display_name, addr.uri, addr.param_text) == (display, uri, params)
    assert calls.contact_uri(value) == uri


@pytest.mark.parametrize("value", ['"Bob" sip:x@h', '"Bob";tag=1', '"Bob <sip:x@h>', "<sip:x@h", "\x00<sip:x@h>"])
def test_name_addr_malformed(value: str) -> None:
    with pytest.raises(MalformedPushParams):
        parse_name_addr(value)
    assert calls.contact_uri(value) == ""  # never the wrong URI


def test_name_addr_repr_hides_the_uri() -> None:
    assert "abab" not in repr(parse_name_addr("<sip:x@h;pn-prid=abab>;x=abab"))


_DISPLAY_CHARS = st.characters(blacklist_categories=("Cs", "Cc"))
_URI_CHARS = st.sampled_from("abcXYZ019-_.!~*'()%=+$&:")


@settings(max_examples=300, deadline=None)
@given(
    st.text(_DISPLAY_CHARS, max_size=30),
    st.text(_URI_CHARS, min_size=1, max_size=20),
    st.lists(st.tuples(st.sampled_from(["expires", "q", "+sip.instance", "x"]),
                       st.text(_DISPLAY_CHARS, max_size=15)), max_size=3),
    st.booleans(),
)
def test_name_addr_round_trip(display: str, user: str, hparams: list[tuple[str, str]], more: bool) -> None:
    quoted = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
    uri = f"sip:{user}@host.example;transport=tcp"
    tail = "".join(f';{name}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                   for name, v in hparams)
    value = f"{quoted} <{uri}>{tail}" + (', "x" <sip:other@h>' if more else "")
    addr = parse_name_addr(value)
    assert addr == NameAddr(display, uri, tail)
    assert addr.uri_params() == {"transport": "tcp"}
    expected: dict[str, str] = {}
    for name, v in hparams:
        expected.setdefault(name, v)  # a quoted value is kept as quoted, spaces too
    assert addr.header_params() == expected
    assert calls.contact_uri(value) == uri


def test_sip_reason() -> None:
    reason = sip_reason("bad\r\ntoken 😀" + "x" * 200)
    assert reason.isascii() and "\r" not in reason and len(reason) == 80
    assert sip_reason("  ") == "Bad Request"
    assert str(MalformedPushParams("é\n")) == "??"


def assert_reason_phrase(reason: str) -> None:
    assert reason and len(reason) <= 80
    assert re.fullmatch(r"[ -~]+", reason), reason


# --- parse_push_params ---------------------------------------------------------------------

PARSE_CASES = [
    pytest.param(
        {"pn-provider": "apns", "pn-param": "ABCD1234.org.example.phone.voip", "pn-prid": VOIP},
        "Phone/1", PushParams(Provider.APNS, "org.example.phone", voip_token=VOIP, team_id="ABCD1234"),
        id="rfc8599-ios-voip",
    ),
    pytest.param(
        {"pn-provider": "apns", "pn-param": "ABCD1234.org.example.phone", "pn-prid": REMOTE},
        "Phone/1",
        PushParams(Provider.APNS, "org.example.phone", alert_token=REMOTE.lower(), team_id="ABCD1234"),
        id="rfc8599-ios-remote-lowercased",
    ),
    pytest.param(
        {"pn-provider": "apns.dev", "pn-param": "ABCD1234.org.example.phone.remote", "pn-prid": VOIP},
        "Phone/1",
        PushParams(Provider.APNS, "org.example.phone", alert_token=VOIP, team_id="ABCD1234", sandbox=True),
        id="apns.dev-sandbox",
    ),
    pytest.param(
        {"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.voip&remote",
         "pn-prid": f"{VOIP}:voip&{REMOTE}:remote"},
        "LinphoneiOS/5.0",
        PushParams(Provider.APNS, "org.linphone.phone", voip_token=VOIP, alert_token=REMOTE.lower(),
                   team_id="ABCD1234"),
        id="linphone-combined",
    ),
    pytest.param(
        {"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.remote&voip",
         "pn-prid": f"{REMOTE}&{VOIP}"},
        "LinphoneiOS/5.0",
        PushParams(Provider.APNS, "org.linphone.phone", voip_token=VOIP, alert_token=REMOTE.lower(),
                   team_id="ABCD1234"),
        id="linphone-untagged-in-pn-param-order",
    ),
    pytest.param(
        {"pn-provider": "apns", "pn-param": "org.example.phone.voip", "pn-prid": VOIP},
        "Phone/1", PushParams(Provider.APNS, "org.example.phone", voip_token=VOIP),
        id="apns-without-team-prefix",
    ),
    pytest.param(
        {"PN-Provider": "FCM", "pn-param": "my-project-42", "pn-prid": FCM_TOKEN},
        "Android/1", PushParams(Provider.FCM, "my-project-42", alert_token=FCM_TOKEN),
        id="rfc8599-fcm",
    ),
    pytest.param(
        {"x-app": "com.example.kz.voip.dev", "x-kind": "apple", "x-token": VOIP},
        "Kazoo-iOS/2.1", PushParams(Provider.APNS, "com.example.kz", voip_token=VOIP, sandbox=True),
        id="legacy-kazoo-custom-names",
    ),
    pytest.param(
        {"app-id": "org.linphone.phone.prod", "pn-type": "apple", "pn-tok": REMOTE},
        "Linphone/3.9", PushParams(Provider.APNS, "org.linphone.phone", alert_token=REMOTE.lower()),
        id="legacy-linphone-prod",
    ),
    pytest.param(
        {"app-id": "org.linphone.phone.dev.voip", "pn-type": "ios", "pn-tok": VOIP},
        "Linphone/3.9",
        PushParams(Provider.APNS, "org.linphone.phone", voip_token=VOIP, sandbox=True),
        id="legacy-dev-before-voip",
    ),
    pytest.param(
        {"app-id": "123456789", "pn-type": "firebase", "pn-tok": FCM_TOKEN},
        "Linphone-Android/4", PushParams(Provider.FCM, "123456789", alert_token=FCM_TOKEN),
        id="legacy-firebase",
    ),
    pytest.param({"transport": "tcp", "ob": ""}, "Phone/1", None, id="no-push-params"),
    pytest.param({"app-id": "org.x.app", "pn-type": "apple", "pn-tok": VOIP}, "Unknown/1", None,
                 id="legacy-no-ua-match"),
]


@pytest.mark.parametrize(("params", "ua", "expected"), PARSE_CASES)
def test_parse_push_params(params, ua, expected):
    assert parse_push_params(params, ua, [UaMapping("broken", "(["), KAZOO, LINPHONE]) == expected


def test_legacy_without_matching_mapping_is_reported_as_legacy():
    params = {"app-id": "org.x.app", "pn-type": "apple", "pn-tok": VOIP}
    assert parse_push_params(params, "Unknown/1", [LINPHONE]) is None
    assert has_legacy_params(params, [LINPHONE])
    assert has_legacy_params({"x-token": "t"}, [KAZOO])
    assert not has_legacy_params({"transport": "tcp"}, [KAZOO])


def test_broken_mapping_regex_is_skipped_not_fatal():
    params = {"app-id": "org.x.app", "pn-type": "apple", "pn-tok": VOIP}
    assert parse_push_params(params, "Linphone", [UaMapping("bad", "*oops")]) is None


@pytest.mark.parametrize(
    ("params", "error", "reason"),
    [
        ({"pn-provider": "webpush", "pn-param": "x", "pn-prid": "y"}, UnsupportedProvider, "webpush"),
        ({"pn-provider": "huawei", "pn-param": "x", "pn-prid": "y"}, UnsupportedProvider, "huawei"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": "zz" * 32}, MalformedPushParams, "hex"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": "abc"}, MalformedPushParams, "odd"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": "ab" * 8}, MalformedPushParams, "len"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": "ab" * 2560}, MalformedPushParams,
         "push token too long"),
        ({"pn-provider": "fcm", "pn-param": "p", "pn-prid": "a" * 5000}, MalformedPushParams,
         "push token too long"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.app"}, MalformedPushParams, "missing pn-prid"),
        ({"pn-provider": "apns", "pn-prid": VOIP}, MalformedPushParams, "missing pn-param"),
        ({"pn-param": "T.org.x.a", "pn-prid": VOIP}, MalformedPushParams, "missing pn-provider"),
        ({"pn-provider": "fcm", "pn-param": "p", "pn-prid": "tok en"}, MalformedPushParams, "FCM token"),
        ({"pn-provider": "fcm", "pn-param": "p/x", "pn-prid": "tok"}, MalformedPushParams, "project"),
        ({"pn-provider": "apns", "pn-param": "app.voip", "pn-prid": VOIP}, MalformedPushParams, "bundle"),
        ({"pn-provider": "apns", "pn-param": "T.org..app", "pn-prid": VOIP}, MalformedPushParams, "bundle"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.app.voip&remote", "pn-prid": VOIP}, MalformedPushParams,
         "does not match"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": f"{VOIP}:pushkit"}, MalformedPushParams,
         "service"),
        ({"pn-provider": "apns", "pn-param": "T.org.x.a", "pn-prid": "ab\r\ncd"}, MalformedPushParams,
         "control"),
        ({"app-id": "org.x.app", "pn-type": "blackberry", "pn-tok": "t"}, UnsupportedProvider, "blackberry"),
        ({"app-id": "org.x.app", "pn-type": "apple"}, MalformedPushParams, "missing pn-tok"),
    ],
)
def test_bad_push_params(params, error, reason):
    with pytest.raises(error) as info:
        parse_push_params(params, "Linphone/1", [LINPHONE])
    assert reason in str(info.value)
    assert_reason_phrase(str(info.value))


def test_sip_status_of_errors():
    assert UnsupportedProvider("x").sip_status == 555
    assert MalformedPushParams("x").sip_status == 400


def test_reason_phrase_is_sanitised_even_for_hostile_provider_names():
    with pytest.raises(UnsupportedProvider) as info:
        parse_push_params({"pn-provider": "évil\u2028x" * 50, "pn-param": "p", "pn-prid": "t"}, "", [])
    assert_reason_phrase(str(info.value))


def test_full_contact_to_params():
    params = parse_push_params(contact_uri_params(CONTACT), "Phone/1", [])
    assert params == PushParams(Provider.APNS, "org.example.phone", voip_token=VOIP, team_id="ABCD1234")


_names = st.sampled_from(["pn-provider", "pn-param", "pn-prid", "app-id", "pn-type", "pn-tok", "x-token",
                          "x-app", "x-kind", "PN-PRID"]) | st.text(max_size=10)
_values = st.sampled_from([
    "apns", "apns.dev", "fcm", "apple", "firebase", VOIP, f"{VOIP}:voip&{REMOTE}:remote",
    "ABCD1234.org.x.app.voip&remote", "org.x.app.dev", "",
]) | st.text(max_size=300)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_names, _values, max_size=6), st.text(max_size=40),
       st.lists(st.builds(UaMapping, st.text(max_size=5), st.text(max_size=12) | st.just(".*"), _names,
                          _names, _names), max_size=3))
def test_parse_push_params_only_raises_push_param_errors(params, ua, mappings):
    try:
        result = parse_push_params(params, ua, mappings)
    except PushParamError as exc:
        assert_reason_phrase(str(exc))
    else:
        if result is not None:
            assert result.voip_token or result.alert_token
            assert result.app_id


# --- device ids ------------------------------------------------------------------------------

APNS_PARAMS = PushParams(Provider.APNS, "org.x.app", voip_token=VOIP)


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ('"<urn:uuid:0C3D-11>"', "urn:uuid:0c3d-11"),
        ("<urn:uuid:abc>", "urn:uuid:abc"),
        (" urn:uuid:abc ", "urn:uuid:abc"),
    ],
)
def test_device_id_from_instance(instance, expected):
    assert device_id_for(APNS_PARAMS, instance) == expected


def test_device_id_without_instance_is_stable_short_hash_per_token():
    first = device_id_for(APNS_PARAMS, None)
    assert first == device_id_for(APNS_PARAMS, "") == device_id_for(APNS_PARAMS, '"<>"')
    assert re.fullmatch(r"pn:[0-9a-f]{24}", first)
    other = PushParams(Provider.APNS, "org.x.app", voip_token=REMOTE)
    assert device_id_for(other, None) != first


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=500))
def test_device_id_is_always_key_safe(instance):
    device_id = device_id_for(APNS_PARAMS, instance)
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", device_id)
    assert device_id == device_id_for(APNS_PARAMS, instance)


def _split_top_reference(text: str, sep: str) -> list[str]:
    """The character walk _split_top replaced: what it must still answer, split for split."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        raise params.MalformedPushParams("unterminated quoted string in Contact")
    parts.append("".join(current))
    return parts


@settings(max_examples=3000)
@given(st.text(alphabet='"\\;,a= <>\n', max_size=16), st.sampled_from([";", ","]))
def test_split_top_splits_as_the_character_walk_did(text: str, sep: str) -> None:
    try:
        expected: list[str] | str = _split_top_reference(text, sep)
    except params.MalformedPushParams as exc:
        expected = str(exc)
    try:
        got: list[str] | str = params._split_top(text, sep)
    except params.MalformedPushParams as exc:
        got = str(exc)
    assert got == expected
