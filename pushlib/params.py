"""Push parameters of a REGISTER's Contact: RFC 8599 and legacy (Kazoo / old Linphone) forms.

Pure functions, no I/O. Every error a client can provoke is a `PushParamError`:
`UnsupportedProvider` (answer SIP 555) or `MalformedPushParams` (answer SIP 400). Their
`str()` is a short ASCII reason phrase (no CR/LF, <= 80 chars) and `sip_status` the code.

`parse_name_addr` is the one parser of Contact (and From) header values; RFC 3261 §20.10:
in `"Name" <sip:u@h;a=1>;b=2` the URI parameter is `a` and the header parameter `b`. Without
angle brackets (`sip:u@h;b=2`) every parameter after the URI is a header parameter, so pass
the whole Contact header value (or wrap a bare URI in `<>`) to get URI parameters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar
from urllib.parse import unquote_to_bytes

from pushlib.models import Provider, PushParams, UaMapping
from pushlib.provider_limits import APNS_TOKEN_MAX_HEX, APNS_TOKEN_MIN_HEX, MAX_TOKEN_BYTES

MAX_REASON_CHARS = 80
MAX_DEVICE_ID_CHARS = 100

RFC8599_PARAMS = ("pn-provider", "pn-param", "pn-prid")
DEFAULT_LEGACY_PARAMS = ("app-id", "pn-type", "pn-tok")

_APNS_PROVIDERS = {"apns": False, "apns.dev": True}  # value: sandbox
_LEGACY_TYPES = {
    "apple": Provider.APNS, "ios": Provider.APNS, "apns": Provider.APNS,
    "firebase": Provider.FCM, "google": Provider.FCM, "android": Provider.FCM,
    "fcm": Provider.FCM, "gcm": Provider.FCM,
}
_SERVICES = ("voip", "remote")

_HEX = re.compile(r"[0-9A-Fa-f]+")
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:-]+")
_FCM_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_BUNDLE_PART = re.compile(r"[A-Za-z0-9_-]+")
# Apple team ids are 10 upper-case alphanumerics; accept any upper-case alphanumeric
# first component, since no real bundle id starts with an all-capitals component.
_TEAM_ID = re.compile(r"[A-Z0-9]{1,32}")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# the rest of a quoted string after its opening quote, through its closing one
_QUOTED_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.S)
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]+")
_REASON_WORD = re.compile(r"[^A-Za-z0-9._+-]")
MAX_BUNDLE_CHARS = 255


_UNSAFE_REASON = re.compile(r"[^\x20-\x7e]")


def sip_reason(text: str) -> str:
    """`text` made safe for a SIP reason phrase: printable ASCII, one line, <= 80 chars."""
    cleaned = _UNSAFE_REASON.sub("?", text).strip() or "Bad Request"
    return cleaned[:MAX_REASON_CHARS]


class PushParamError(ValueError):
    """Bad push parameters from a client. `str(exc)` is a safe SIP reason phrase."""

    sip_status: ClassVar[int] = 400

    def __init__(self, reason: str) -> None:
        super().__init__(sip_reason(reason))


class UnsupportedProvider(PushParamError):
    """A push service this proxy does not serve (RFC 8599: 555 Push Notification Service Not Supported)."""

    sip_status: ClassVar[int] = 555


class MalformedPushParams(PushParamError):
    """Push parameters that are present but unusable (SIP 400)."""


def _word(value: str) -> str:
    """A client-supplied name made safe and short enough to quote in a reason phrase."""
    return _REASON_WORD.sub("?", value)[:24]


# ---------------------------------------------------------------------------------------
# Contact header parsing


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double-quoted strings (backslash escapes honoured inside them).

    Jumps from quote to quote with str.find and a regex rather than walking the characters in
    Python: every REGISTER's Contact goes through here, and the walk was its costliest step."""
    if '"' not in text:
        return text.split(sep)
    parts: list[str] = []
    start = pos = 0
    while True:
        quote = text.find('"', pos)
        cut = text.find(sep, pos)
        if cut != -1 and (quote == -1 or cut < quote):
            parts.append(text[start:cut])
            start = pos = cut + 1
        elif quote == -1:
            parts.append(text[start:])
            return parts
        else:
            closed = _QUOTED_REST.match(text, quote + 1)
            if closed is None:
                raise MalformedPushParams("unterminated quoted string in Contact")
            pos = closed.end()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedPushParams("invalid characters in Contact") from None
    if _CONTROL.search(text):
        raise MalformedPushParams("control character in Contact")


def _percent_decode(value: str) -> str:
    if _BAD_PERCENT.search(value):
        raise MalformedPushParams("bad percent-encoding in Contact")
    try:
        if "%" in value:
            decoded = unquote_to_bytes(value).decode("utf-8")
        else:  # nothing to decode (the common case): only the UTF-8 check, at C speed
            value.encode("utf-8")
            decoded = value
    except UnicodeError:
        raise MalformedPushParams("bad UTF-8 in Contact parameter") from None
    if _CONTROL.search(decoded):
        raise MalformedPushParams("control character in Contact parameter")
    return decoded


def _param_pairs(text: str, decode: bool) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in _split_top(text, ";"):
        name, _, value = item.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if decode:
            name = _percent_decode(name)
            value = _percent_decode(value)
        else:
            value = _unquote(value)
        if name and name not in params:  # first occurrence wins
            params[name] = value
    return params


@dataclass(frozen=True)
class NameAddr:
    """The first value of a Contact (or From / To) header, split (RFC 3261 §20.10, §25.1).

    In `"Bob" <sip:u@h;a=1>;b=2` the display name is `Bob`, the URI `sip:u@h;a=1` (URI
    parameter `a`) and the header-parameter text `;b=2`. Without angle brackets
    (`sip:u@h;b=2`) every parameter after the URI belongs to the header.
    """

    display_name: str
    uri: str = field(repr=False)  # a push binding's URI carries the token
    param_text: str = field(default="", repr=False)

    def uri_params(self) -> dict[str, str]:
        """URI parameters: names lower-cased, names and values percent-decoded, a parameter
        without a value maps to "", the first of a repeated name wins; URI headers (`?...`) and a
        telephone-subscriber user part (`+1;phone-context=x@h`) are not parameters."""
        uri = self.uri.split("?", 1)[0]
        at = uri.find("@")
        _, sep, params = (uri[at + 1:] if at >= 0 else uri).partition(";")
        return _param_pairs(params, decode=True) if sep else {}

    def header_params(self) -> dict[str, str]:
        """Header parameters (`;expires=60;+sip.instance="<urn:...>"`): names lower-cased, quoted
        values unquoted (not percent-decoded: header parameters are tokens or quoted strings), a
        flag such as `;ob` maps to ""."""
        return _param_pairs(self.param_text, decode=False)


def _display_name(text: str) -> str:
    text = text.strip()
    return _unquote(text) if text.startswith('"') else text


def parse_name_addr(value: str) -> NameAddr:
    """Split the first contact of a header value (name-addr or addr-spec, then parameters).

    Quoted strings may hold `<`, `>`, `;` and `,` (`"a<b" <sip:x@h>` is the URI `sip:x@h`);
    `*` and "" come back as the URI itself. Raises MalformedPushParams on broken quoting or
    brackets, a quoted display name without `<>`, non-UTF-8 text or a control character.
    """
    _check_text(value)
    text = value.strip()
    quoted = escaped = had_quotes = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == '"':
            quoted = had_quotes = True
        elif ch == "<":
            end = text.find(">", i + 1)
            if end < 0:
                raise MalformedPushParams("unterminated <> in Contact")
            return NameAddr(_display_name(text[:i]), text[i + 1:end].strip(), _split_top(text[end + 1:], ",")[0])
        elif ch in ";,":
            break
    else:
        i = len(text)
    if quoted:
        raise MalformedPushParams("unterminated quoted string in Contact")
    if had_quotes:
        raise MalformedPushParams("display name without <> in Contact")
    # an addr-spec: the parameters after the URI belong to the header (RFC 3261 §20.10)
    rest = text[i:] if text[i:i + 1] == ";" else ""
    return NameAddr("", text[:i].strip(), _split_top(rest, ",")[0])


def contact_uri_params(contact: str) -> dict[str, str]:
    """URI parameters of the first contact of a Contact header value (see NameAddr.uri_params);
    for a bare URI wrap it in `<>`. Raises MalformedPushParams, never anything else."""
    return parse_name_addr(contact).uri_params()


def contact_header_params(contact: str) -> dict[str, str]:
    """Header parameters of the first contact (see NameAddr.header_params). Raises
    MalformedPushParams, never anything else."""
    return parse_name_addr(contact).header_params()


# ---------------------------------------------------------------------------------------
# Push parameters


def _clean(value: str, name: str, is_token: bool = False) -> str:
    value = value.strip()
    _check_text(value)
    if len(value.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise MalformedPushParams("push token too long" if is_token else f"{_word(name)} too long")
    return value


def _apns_token(token: str) -> str:
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise MalformedPushParams("push token too long")
    if not token:
        raise MalformedPushParams("empty push token")
    if not _HEX.fullmatch(token):
        raise MalformedPushParams("APNs token is not hex")
    if len(token) % 2:
        raise MalformedPushParams("odd-length APNs token")
    if not APNS_TOKEN_MIN_HEX <= len(token) <= APNS_TOKEN_MAX_HEX:
        raise MalformedPushParams("bad APNs token length")
    return token.lower()


def _fcm_token(token: str) -> str:
    if len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
        raise MalformedPushParams("push token too long")
    if not _FCM_TOKEN.fullmatch(token):
        raise MalformedPushParams("bad FCM token")
    return token


def _check_bundle(bundle: str) -> str:
    parts = bundle.split(".")
    if len(bundle) > MAX_BUNDLE_CHARS or len(parts) < 2 or not all(_BUNDLE_PART.fullmatch(p) for p in parts):
        raise MalformedPushParams("bad APNs bundle id")
    return bundle


def _services_suffix(app: str) -> tuple[str, tuple[str, ...]]:
    """Split `bundle.voip&remote` into (`bundle`, ("voip", "remote")); no suffix → remote."""
    head, dot, last = app.rpartition(".")
    services = tuple(s.lower() for s in last.split("&"))
    if dot and services and all(s in _SERVICES for s in services):
        if len(set(services)) != len(services):
            raise MalformedPushParams("repeated service in pn-param")
        return head, services
    return app, ("remote",)


def _apns_tokens(prid: str, services: tuple[str, ...]) -> dict[str, str]:
    """Tokens by service from `tok`, `tok:voip` or Linphone's `tok1:voip&tok2:remote`."""
    tokens: dict[str, str] = {}
    untagged: list[str] = []
    for part in prid.split("&"):
        token, colon, tag = part.partition(":")
        if not colon:
            untagged.append(token.strip())
            continue
        tag = tag.strip().lower()
        if tag not in _SERVICES:
            raise MalformedPushParams(f"unknown pn-prid service {_word(tag)}")
        if tag in tokens:
            raise MalformedPushParams("repeated service in pn-prid")
        tokens[tag] = _apns_token(token.strip())
    if untagged:
        free = [s for s in services if s not in tokens]
        if len(untagged) != len(free):
            raise MalformedPushParams("pn-prid does not match pn-param")
        for service, token in zip(free, untagged, strict=True):
            tokens[service] = _apns_token(token)
    return tokens


def _apns_params(app: str, prid: str, sandbox: bool, with_team: bool) -> PushParams:
    bundle, services = _services_suffix(app)
    team: str | None = None
    parts = bundle.split(".")
    # RFC 8599 prefixes the team id; a pn-param without it (just the bundle) is accepted
    # when the first component cannot be a team id (team ids are upper-case).
    if with_team and len(parts) >= 3 and _TEAM_ID.fullmatch(parts[0]):
        team, bundle = parts[0], ".".join(parts[1:])
    tokens = _apns_tokens(prid, services)
    return PushParams(
        provider=Provider.APNS,
        app_id=_check_bundle(bundle),
        voip_token=tokens.get("voip"),
        alert_token=tokens.get("remote"),
        team_id=team,
        sandbox=sandbox,
    )


def _fcm_params(project: str, prid: str) -> PushParams:
    if not _FCM_PROJECT.fullmatch(project):
        raise MalformedPushParams("bad FCM project id")
    return PushParams(provider=Provider.FCM, app_id=project, alert_token=_fcm_token(prid))


def _rfc8599(params: Mapping[str, str]) -> PushParams:
    provider_name = _clean(params.get("pn-provider", ""), "pn-provider").lower()
    if not provider_name:
        raise MalformedPushParams("missing pn-provider")
    if provider_name not in _APNS_PROVIDERS and provider_name != "fcm":
        raise UnsupportedProvider(f"unsupported pn-provider {_word(provider_name)}")
    prid = _clean(params.get("pn-prid", ""), "pn-prid", is_token=True)
    if not prid:
        raise MalformedPushParams("missing pn-prid")
    app = _clean(params.get("pn-param", ""), "pn-param")
    if not app:
        raise MalformedPushParams("missing pn-param")
    if provider_name == "fcm":
        return _fcm_params(app, prid)
    return _apns_params(app, prid, sandbox=_APNS_PROVIDERS[provider_name], with_team=True)


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None  # an operator's broken regex must not break registrations


def _mapping_names(mapping: UaMapping) -> tuple[str, str, str]:
    return mapping.app_param.lower(), mapping.type_param.lower(), mapping.token_param.lower()


def _legacy(params: Mapping[str, str], mapping: UaMapping) -> PushParams:
    app_name, type_name, token_name = _mapping_names(mapping)
    app = _clean(params.get(app_name, ""), app_name)
    kind = _clean(params.get(type_name, ""), type_name).lower()
    token = _clean(params.get(token_name, ""), token_name, is_token=True)
    if not token:
        raise MalformedPushParams(f"missing {_word(token_name)}")
    if not kind:
        raise MalformedPushParams(f"missing {_word(type_name)}")
    if not app:
        raise MalformedPushParams(f"missing {_word(app_name)}")
    provider = _LEGACY_TYPES.get(kind)
    if provider is None:
        raise UnsupportedProvider(f"unsupported {_word(type_name)} {_word(kind)}")
    if provider is Provider.FCM:
        return _fcm_params(app, token)
    # Old Linphone marks the APNs environment with an app-id suffix, before or after `.voip`.
    sandbox = False
    for env in (".dev", ".prod"):
        if app.endswith(env + ".voip"):
            app = app[: -len(env + ".voip")] + ".voip"
        elif app.endswith(env):
            app = app[: -len(env)]
        else:
            continue
        sandbox = env == ".dev"
        break
    return _apns_params(app, token, sandbox=sandbox, with_team=False)


def _lowered(uri_params: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for name, value in uri_params.items():
        lowered.setdefault(name.lower(), value)
    return lowered


def has_legacy_params(uri_params: Mapping[str, str], mappings: Sequence[UaMapping]) -> bool:
    """True when the Contact carries a parameter some legacy mapping (or the default
    `app-id`/`pn-type`/`pn-tok` names) would read: lets the caller log "legacy push
    parameters but no User-Agent mapping" when `parse_push_params` returns None."""
    names = set(DEFAULT_LEGACY_PARAMS)
    for mapping in mappings:
        names.update(_mapping_names(mapping))
    return any(name in names for name in _lowered(uri_params))


def parse_push_params(
    uri_params: Mapping[str, str], user_agent: str, mappings: Sequence[UaMapping]
) -> PushParams | None:
    """Push parameters of a Contact, from its (decoded) URI parameters.

    RFC 8599 (`pn-provider`/`pn-param`/`pn-prid`) wins when any of them is present:
    `apns` (production), `apns.dev` (sandbox) or `fcm`. APNs `pn-param` is
    `TEAMID.bundle.id[.service]` (or just the bundle id); service `voip` marks a PushKit
    token, `remote` or none an alert token; Linphone's `...voip&remote` pairs with
    `pn-prid=<tok>:voip&<tok>:remote`. APNs tokens must be 64..200 hex digits and are
    lower-cased; FCM tokens are [A-Za-z0-9_:-], pn-param is the project/sender id.

    Otherwise legacy parameters are read through the first mapping whose regex
    `re.search`-es the User-Agent and whose parameter names appear in the Contact
    (broken regexes are skipped). Legacy app ids may end in `.dev` (sandbox) or `.prod`,
    and in `.voip` before that (PushKit token).

    Returns None when there are no push parameters or no mapping applies (see
    `has_legacy_params`). Raises UnsupportedProvider or MalformedPushParams, nothing else.
    """
    params = _lowered(uri_params)
    if any(name in params for name in RFC8599_PARAMS):
        return _rfc8599(params)
    for mapping in mappings:
        if not any(name in params for name in _mapping_names(mapping)):
            continue
        pattern = _compiled(mapping.user_agent_regex)
        if pattern is not None and pattern.search(user_agent):
            return _legacy(params, mapping)
    return None


def device_id_for(params: PushParams, instance: str | None) -> str:
    """A stable device id, safe as a Redis key part (only [A-Za-z0-9._:-], <= 100 chars).

    From `+sip.instance` when present (quotes and <> stripped, lower-cased: it survives
    token rotation), hashed when it is long or has other characters; else `pn:` plus a
    short hash of provider, app id and the first token.
    """
    if instance is not None:
        normalised = instance.strip().strip('"').strip().strip("<>").strip().lower()
        if normalised:
            if len(normalised) <= MAX_DEVICE_ID_CHARS and _SAFE_ID.fullmatch(normalised):
                return normalised
            raw = normalised.encode("utf-8", "surrogatepass")
            return "inst:" + hashlib.sha256(raw).hexdigest()[:32]
    token = params.voip_token or params.alert_token or ""
    key = "\0".join((params.provider.value, params.app_id, token)).encode("utf-8", "surrogatepass")
    return "pn:" + hashlib.sha256(key).hexdigest()[:24]
