"""Operator CLI (`pushlib-admin`): apps and credentials, User-Agent mappings, devices, custom pushes.

Every command talks to the Redis store the proxy uses: `--redis-url-file PATH`, `--redis-url URL`, or
by default PUSHLIB_REDIS_URL / PUSHLIB_REDIS_URL_FILE (prefer a file or the environment when the URL
holds a password: a command line shows in `ps`). Credentials are validated before they are stored
and are never printed back.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pushlib.aor import Aor, AorError, aor_parts, parse_aor
from pushlib.credentials import Subscribers
from pushlib.logutil import redact_url, setup_logging
from pushlib.models import AppCredentials, Provider, PushJob, PushKind, UaMapping
from pushlib.params import PushParamError, parse_push_params
from pushlib.redisconn import StoreUnavailable, sync_client
from pushlib.schema import describe_app
from pushlib.settings import Settings, read_redis_url_file
from pushlib.store import SyncStore

# Socket timeouts of the `subscriber` command's own client (the store's are the SIP workers' 0.5 s).
SUBSCRIBER_TIMEOUT = 2.0


class CliError(Exception):
    """A bad argument or file: printed as one line, exit status 2."""


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_apns_key(path: str) -> str:
    """The .p8 token key as PEM text, checked to be an EC P-256 private key (what ES256 needs)."""
    pem = _read(path, "APNs key")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except ValueError as exc:
        raise CliError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CliError(f"{path} is not an EC P-256 key (APNs token keys are)")
    return pem


def load_apns_cert(cert_path: str, key_path: str) -> tuple[str, str]:
    """Certificate and key PEM, checked to parse and to belong together."""
    cert_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "certificate key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except ValueError as exc:
        raise CliError(f"cannot parse the certificate or key: {exc}") from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, spki) != key.public_key().public_bytes(enc, spki):
        raise CliError("the key does not belong to the certificate")
    return cert_pem, key_pem


def load_service_account(path: str) -> tuple[str, str]:
    """Service-account JSON text and its project id, checked for the fields google-auth needs."""
    text = _read(path, "service account")
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path} is not valid JSON") from exc
    if not isinstance(info, dict):
        raise CliError(f"{path} is not a service-account object")
    missing = [k for k in ("project_id", "client_email", "private_key", "token_uri") if not info.get(k)]
    if missing:
        raise CliError(f"{path} lacks {', '.join(missing)}")
    return text, str(info["project_id"])


def parse_data(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--data wants NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def check_fcm_alias(alias: str) -> str:
    """`alias` if an FCM device can name an app so: the Contact parser takes it verbatim as the app
    id of `pn-provider=fcm;pn-param=<alias>` (a sender id, a package name...)."""
    try:
        params = parse_push_params({"pn-provider": "fcm", "pn-param": alias, "pn-prid": "x"}, "", ())
    except PushParamError as exc:
        raise CliError(f"alias {alias[:80]!r} cannot be an FCM pn-param: {exc}") from None
    if params is None or params.app_id != alias:
        raise CliError(f"alias {alias[:80]!r} cannot be an FCM pn-param (a device names it differently)")
    return alias


def _aliases(given: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(check_fcm_alias(a) for a in given))


def _app_from_args(args: argparse.Namespace) -> AppCredentials:
    ca_pem = _read(args.ca_file, "CA file") if args.ca_file else None
    if ca_pem and not args.host:
        raise CliError("--ca-file is only trusted for a custom --host (the sandbox); give --host too")
    common = {"sandbox": args.sandbox, "custom_host": args.host, "ca_pem": ca_pem}
    if args.cmd == "set-apns":
        return AppCredentials(
            Provider.APNS, args.bundle_id, apns_key_pem=load_apns_key(args.key_file),
            apns_key_id=args.key_id, apns_team_id=args.team_id, **common,
        )
    if args.cmd == "set-apns-cert":
        cert_pem, key_pem = load_apns_cert(args.cert_file, args.key_file)
        return AppCredentials(
            Provider.APNS, args.bundle_id, apns_cert_pem=cert_pem, apns_cert_key_pem=key_pem, **common
        )
    text, project_id = load_service_account(args.service_account)
    return AppCredentials(Provider.FCM, project_id, fcm_service_account=text, aliases=_aliases(args.alias),
                          **common)


def _save_app(store: SyncStore, app: AppCredentials) -> None:
    try:
        store.save_app(app)
    except ValueError as exc:  # AppNameConflict, an alias that is the app's own id
        raise CliError(str(exc)) from None


def cmd_app(store: SyncStore, args: argparse.Namespace) -> None:
    if args.cmd in ("set-apns", "set-apns-cert", "set-fcm"):
        app = _app_from_args(args)
        if not getattr(args, "alias", None):
            # new credentials for an app keep its aliases (`--alias` replaces them)
            stored = store.app(app.provider, app.app_id)
            if stored is not None and stored.app_id == app.app_id:
                app = replace(app, aliases=stored.aliases)
        _save_app(store, app)
        print(f"saved {describe_app(app)}")
        return
    if args.cmd == "reindex":
        print(f"app index rebuilt: {store.reindex_apps()} apps")
        return
    found = store.app(args.provider, args.app_id)
    if found is None:
        raise CliError(f"no app {args.provider}:{args.app_id}")
    alias_of = found.app_id if found.app_id != args.app_id else None
    if args.cmd == "show":
        if alias_of:
            print(f"{args.provider}:{args.app_id} is an alias of {args.provider}:{alias_of}")
        print(describe_app(found))
        print(json.dumps(store.app_status(args.provider, found.app_id), indent=2, sort_keys=True))
        return
    if alias_of:
        hint = (f"; `app alias-remove {args.provider} {alias_of} {args.app_id}` removes the alias"
                if args.cmd == "remove" else "")
        raise CliError(f"{args.provider}:{args.app_id} is an alias of {args.provider}:{alias_of}, "
                       f"not an app: name the app{hint}")
    if args.cmd in ("enable", "disable"):
        changed = replace(found, enabled=args.cmd == "enable")
        _save_app(store, changed)
        print(f"saved {describe_app(changed)}")
    elif args.cmd == "remove":
        store.remove_app(args.provider, args.app_id)
        print(f"removed {args.provider}:{args.app_id}"
              + (f" and its aliases {', '.join(found.aliases)}" if found.aliases else ""))
    elif args.cmd == "aliases":
        for alias in found.aliases:
            print(alias)
    elif args.cmd == "alias-add":
        try:
            saved = store.add_app_aliases(args.provider, args.app_id, _aliases(args.alias))
        except ValueError as exc:  # AppNameConflict
            raise CliError(str(exc)) from None
        print(f"saved {describe_app(saved)}")
    elif args.cmd == "alias-remove":
        if not store.remove_app_alias(args.provider, args.app_id, args.alias):
            raise CliError(f"{args.provider}:{args.app_id} has no alias {args.alias}")
        print(f"removed alias {args.alias} of {args.provider}:{args.app_id}")


def cmd_uamap(store: SyncStore, args: argparse.Namespace) -> None:
    if args.cmd == "set":
        try:
            re.compile(args.regex)
        except re.error as exc:
            raise CliError(f"bad User-Agent regex: {exc}") from exc
        store.save_ua_mapping(
            UaMapping(args.name, args.regex, args.app_param, args.type_param, args.token_param)
        )
        print(f"saved UA mapping {args.name}")
    elif args.cmd == "list":
        for m in store.ua_mappings():
            print(f"{m.name}\t{m.user_agent_regex}\tapp={m.app_param} type={m.type_param} token={m.token_param}")
    elif args.cmd == "remove":
        if not store.remove_ua_mapping(args.name):
            raise CliError(f"no UA mapping {args.name}")
        print(f"removed UA mapping {args.name}")


DEVICES_USAGE = """pushlib-admin devices [-h] user@domain
       pushlib-admin devices remove user@domain (DEVICE_ID | --all)"""


def cmd_devices(store: SyncStore, args: argparse.Namespace) -> None:
    """List a user's devices, or remove one (`remove AOR DEVICE_ID`) or all (`remove AOR --all`)."""
    words = list(args.words)
    if words[0] == "remove":
        if len(words) == 2 and args.all:
            aor = _aor(words[1])
            removed = store.remove_all_devices(aor)
            print(f"removed {len(removed)} devices of {aor}" + (f": {', '.join(removed)}" if removed else ""))
        elif len(words) == 3 and not args.all:
            aor = _aor(words[1])
            if not store.remove_device(aor, words[2]):
                raise CliError(f"no device {words[2]} of {aor}")
            print(f"removed device {words[2]} of {aor}")
        else:
            raise CliError("want `devices remove user@domain DEVICE_ID` or `devices remove user@domain --all`")
        return
    if len(words) != 1 or args.all:
        raise CliError("want `devices user@domain` (list) or `devices remove user@domain (DEVICE_ID | --all)`")
    now = time.time()
    for d in store.devices(_aor(words[0])):
        p = d.params
        tokens = ",".join(k for k, v in (("voip", p.voip_token), ("alert", p.alert_token)) if v)
        quarantined = " quarantined" if d.quarantined_until > now else ""
        dead = " dead" if d.dead else ""
        print(
            f"{d.device_id}\t{p.provider.value}{'(sandbox)' if p.sandbox else ''}\t{p.app_id}\ttokens={tokens}"
            f"\tregistered {int(now - d.registered_at)}s ago\texpires in {int(d.expires_at - now)}s{quarantined}{dead}"
        )


def _aor(text: str) -> Aor:
    """`user@domain` or `sip:user@domain`, in the one spelling the proxy stores (pushlib.aor)."""
    try:
        return parse_aor(text)
    except AorError as exc:
        raise CliError(f"want user@domain: {exc}") from None


def _read_password(given: str | None) -> str:
    # A password on the command line shows in the process list: prefer the prompt or stdin.
    if given is not None:
        password = given
    elif sys.stdin.isatty():
        password = getpass.getpass("SIP password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("empty password")
    return password


def cmd_subscriber(store: SyncStore, args: argparse.Namespace) -> None:
    """SIP digest credentials (stored as HA1 only) for the proxy's digest auth."""
    user, domain = aor_parts(_aor(args.aor))
    client = sync_client(store.settings.redis_url, timeout=SUBSCRIBER_TIMEOUT)
    try:
        subscribers = Subscribers(client)
        if args.cmd == "set":
            subscribers.set_password(user, domain, _read_password(args.password), realm=args.realm)
            print(f"saved credentials of {user}@{domain}")
        else:
            subscribers.remove([(user, domain)])
            print(f"removed credentials of {user}@{domain}")
    finally:
        client.close()


def cmd_push(store: SyncStore, args: argparse.Namespace) -> None:
    data = parse_data(args.data)
    for name in ("title", "body"):
        if getattr(args, name):
            data[name] = getattr(args, name)
    if args.ttl is not None:
        data["ttl"] = str(args.ttl)
    job = PushJob(
        job_id=str(uuid.uuid4()), kind=PushKind(args.kind), aor=_aor(args.aor),
        deadline=time.time() + (args.ttl or store.settings.message_ttl), data=data, created_at=time.time(),
    )
    store.enqueue(job)
    print(f"queued {job.kind.value} job {job.job_id} for {job.aor}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushlib-admin", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", default=None,
                       help="default: PUSHLIB_REDIS_URL, PUSHLIB_REDIS_URL_FILE or redis://127.0.0.1:6379/0. "
                            "Visible in `ps`: when the URL holds a password use --redis-url-file or the environment")
    where.add_argument("--redis-url-file", default=None, metavar="PATH",
                       help="read the Redis URL from this file (stripped): keeps a password out of `ps`")
    parser.add_argument("--log-level", default=os.environ.get("PUSHLIB_LOG_LEVEL", "WARNING"),
                        help="Python logging level (default: PUSHLIB_LOG_LEVEL or WARNING)")
    sub = parser.add_subparsers(dest="area", required=True)

    app = sub.add_parser("app", help="push apps and their credentials").add_subparsers(dest="cmd", required=True)
    for name, help_text in (
        ("set-apns", "APNs app with a token key (.p8)"),
        ("set-apns-cert", "APNs app with a client certificate"),
        ("set-fcm", "FCM app from a service-account JSON"),
    ):
        p = app.add_parser(name, help=help_text)
        if name == "set-apns":
            p.add_argument("bundle_id")
            p.add_argument("--key-file", required=True)
            p.add_argument("--key-id", required=True)
            p.add_argument("--team-id", required=True)
        elif name == "set-apns-cert":
            p.add_argument("bundle_id")
            p.add_argument("--cert-file", required=True)
            p.add_argument("--key-file", required=True)
        else:
            p.add_argument("--service-account", required=True)
            p.add_argument("--alias", action="append", default=[], metavar="NAME",
                           help="another name devices give the app in pn-param (the sender id, the package "
                                "name...); repeatable. Replaces the app's aliases; without it a saved app "
                                "keeps them")
        p.add_argument("--sandbox", action="store_true", help="APNs development environment")
        p.add_argument("--host", help="custom host:port instead of Apple's or Google's (e.g. the sandbox)")
        p.add_argument("--ca-file", help="the only CA trusted for --host (e.g. the sandbox CA)")
    app.add_parser("reindex", help="rebuild the list of configured apps the SIP workers check REGISTERs against")
    for name in ("show", "enable", "disable", "remove"):
        p = app.add_parser(name)
        p.add_argument("provider", choices=[p.value for p in Provider])
        p.add_argument("app_id")
    for name, help_text in (
        ("aliases", "list the other names devices may give an FCM app"),
        ("alias-add", "add names devices may give an FCM app (sender id, package name...)"),
        ("alias-remove", "remove a name: devices using it are refused (555) and no longer pushed"),
    ):
        p = app.add_parser(name, help=help_text)
        p.add_argument("provider", choices=[Provider.FCM.value])
        p.add_argument("app_id", metavar="project_id")
        if name == "alias-add":
            p.add_argument("alias", nargs="+")
        elif name == "alias-remove":
            p.add_argument("alias")

    ua = sub.add_parser("uamap", help="legacy User-Agent mappings").add_subparsers(dest="cmd", required=True)
    p = ua.add_parser("set")
    p.add_argument("name")
    p.add_argument("regex", help="regular expression searched in the User-Agent")
    p.add_argument("--app-param", default="app-id", help="Contact param holding Token-App")
    p.add_argument("--type-param", default="pn-type", help="Contact param holding Token-Type")
    p.add_argument("--token-param", default="pn-tok", help="Contact param holding Token-ID")
    ua.add_parser("list")
    ua.add_parser("remove").add_argument("name")

    subs = sub.add_parser("subscriber", help="SIP digest credentials").add_subparsers(dest="cmd", required=True)
    p = subs.add_parser("set", help="set a password (read from the terminal or stdin)")
    p.add_argument("aor", help="user@domain")
    p.add_argument("--realm", help="digest realm (default: the domain)")
    p.add_argument("--password", help="avoid: visible in the process list")
    subs.add_parser("remove").add_argument("aor", help="user@domain")

    p = sub.add_parser("devices", help="a user's push devices: list them, or remove one or all",
                       usage=DEVICES_USAGE)
    p.add_argument("words", nargs="+", metavar="ARG",
                   help="user@domain to list; remove user@domain DEVICE_ID (or --all) to remove")
    p.add_argument("--all", action="store_true", help="with remove: every device of the user")

    p = sub.add_parser("push", help="send a notification to a user's devices")
    p.add_argument("aor", help="user@domain")
    p.add_argument("--kind", default=PushKind.CUSTOM.value, choices=[k.value for k in PushKind if k != "incomingCall"])
    p.add_argument("--title")
    p.add_argument("--body")
    p.add_argument("--ttl", type=int, help="seconds the provider may store it")
    p.add_argument("--data", action="append", default=[], metavar="NAME=VALUE")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """PUSHLIB_* settings with the Redis URL of `--redis-url-file` or `--redis-url` when given.
    Raises SettingsError (a ValueError)."""
    settings = Settings.from_env()
    if args.redis_url_file:
        return replace(settings, redis_url=read_redis_url_file(args.redis_url_file))
    if args.redis_url:
        return replace(settings, redis_url=args.redis_url)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "app": cmd_app, "uamap": cmd_uamap, "subscriber": cmd_subscriber, "devices": cmd_devices, "push": cmd_push,
    }
    try:
        setup_logging(args.log_level)
        settings = settings_from_args(args)
        store = SyncStore(settings.redis_url, settings)
    except ValueError as exc:  # SettingsError (unreadable URL file, refused rediss options), bad level
        print(f"pushlib-admin: {exc}", file=sys.stderr)
        return 2
    try:
        handlers[args.area](store, args)
    except CliError as exc:
        print(f"pushlib-admin: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"pushlib-admin: Redis unavailable at {redact_url(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
