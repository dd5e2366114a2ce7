"""Operator CLI (`pushlib-admin`): apps and credentials, User-Agent mappings, devices, custom pushes.

Every command talks to the Redis store the proxy uses: `--redis-url-file PATH`, `--redis-url URL`, or
by default PUSHLIB_REDIS_URL / PUSHLIB_REDIS_URL_FILE (prefer a file or the environment when the URL
holds a password: a command line shows in `ps`). Credentials are validated before they are stored
and are never printed back.

Every command prints text, or with `--json` one JSON object (`ok`, `message`, its fields; `error`
when it fails), and exits 0 when it did what was asked, 1 when it failed (no such app, device, key,
tenant...; a name another app or tenant holds; `app check` refused; Redis unavailable), 2 on a usage
error (argparse's, or an invalid argument value: nothing is written then).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from pushlib.aor import Aor, AorError, aor_parts, parse_aor
from pushlib.apikeys import ApiKeyError, ApiKeyStore, Scope, parse_scopes
from pushlib.appcheck import check_app
from pushlib.appcreds import (
    CredentialsError,
    check_aliases,
    check_apns_cert,
    check_apns_key,
    check_service_account,
    credentials_view,
    public_view,
)
from pushlib.credentials import Subscribers
from pushlib.logutil import redact_url, setup_logging
from pushlib.models import AppCredentials, Provider, PushJob, PushKind, UaMapping
from pushlib.mwi import MwiError, VoicemailStore
from pushlib.redisconn import StoreUnavailable, async_client, sync_client
from pushlib.schema import describe_app
from pushlib.settings import Settings, read_redis_url_file
from pushlib.store import AppNameConflict, SyncStore
from pushlib.tenants import TenantError, TenantStore, check_domain, check_tenant_id, check_tenant_name
from pushlib.users import UserMap, check_user_uuid, device_view

_T = TypeVar("_T")

# Socket timeouts of the `subscriber` command's own client (the store's are the SIP workers' 0.5 s).
SUBSCRIBER_TIMEOUT = 2.0


class CliError(Exception):
    """Usage: an invalid argument value (or the file an argument names is unreadable or invalid), found
    before anything is written: printed as one line, exit status 2 (as argparse's own usage errors)."""


class CliFailure(Exception):
    """The command ran and failed: what it names does not exist, conflicts with what is stored, or a
    provider refused the credentials: exit status 1 (as an unavailable store)."""


class Output:
    """What a command prints: lines of text, or with `--json` one JSON object at the end
    (`{"ok": true, "message": ..., <fields>}`; lists under their own key)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.messages: list[str] = []
        self.fields: dict[str, Any] = {}

    def say(self, text: str, **fields: Any) -> None:
        if self.as_json:
            self.messages.append(text)
            self.fields.update(fields)
        else:
            print(text)

    def text(self, line: str) -> None:
        """A line for people only (the JSON document carries the same in its fields)."""
        if not self.as_json:
            print(line)

    def rows(self, key: str, rows: list[dict[str, Any]], lines: list[str]) -> None:
        if self.as_json:
            self.fields[key] = rows
        else:
            for line in lines:
                print(line)

    def flush(self, ok: bool = True) -> None:
        if self.as_json:
            doc = {"ok": ok, **({"message": "; ".join(self.messages)} if self.messages else {}), **self.fields}
            print(json.dumps(doc, sort_keys=True))


def out(args: argparse.Namespace) -> Output:
    output: Output = args.output
    return output


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_apns_key(path: str) -> str:
    """The .p8 token key as PEM text, checked to be an EC P-256 private key (what ES256 needs)."""
    try:
        return check_apns_key(_read(path, "APNs key"), what=path)
    except CredentialsError as exc:
        raise CliError(str(exc)) from None


def load_apns_cert(cert_path: str, key_path: str) -> tuple[str, str]:
    """Certificate and key PEM, checked to parse and to belong together."""
    try:
        return check_apns_cert(_read(cert_path, "certificate"), _read(key_path, "certificate key"))
    except CredentialsError as exc:
        raise CliError(str(exc)) from None


def load_service_account(path: str) -> tuple[str, str]:
    """Service-account JSON text and its project id, checked for the fields google-auth needs."""
    try:
        return check_service_account(_read(path, "service account"), what=path)
    except CredentialsError as exc:
        raise CliError(str(exc)) from None


def parse_data(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--data wants NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def _aliases(given: Sequence[str]) -> tuple[str, ...]:
    try:
        return check_aliases(list(given))
    except CredentialsError as exc:
        raise CliError(str(exc)) from None


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
    except AppNameConflict as exc:  # the name is another app's
        raise CliFailure(str(exc)) from None
    except ValueError as exc:  # an alias that is the app's own id, or given twice
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
        out(args).say(f"saved {describe_app(app)}", app=public_view(app))
        return
    if args.cmd == "reindex":
        count = store.reindex_apps()
        out(args).say(f"app index rebuilt: {count} apps", apps=count)
        return
    found = store.app(args.provider, args.app_id)
    if found is None:
        raise CliFailure(f"no app {args.provider}:{args.app_id}")
    alias_of = found.app_id if found.app_id != args.app_id else None
    if args.cmd == "show":
        status = store.app_status(args.provider, found.app_id)
        if out(args).as_json:
            out(args).say(describe_app(found), app=public_view(found, status), alias_of=alias_of)
            return
        if alias_of:
            print(f"{args.provider}:{args.app_id} is an alias of {args.provider}:{alias_of}")
        print(describe_app(found))
        print(json.dumps(credentials_view(found), sort_keys=True))
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    if args.cmd == "check":
        result = asyncio.run(check_app(found))
        out(args).say(f"{'ok' if result.ok else 'FAILED'}: {found.provider.value}:{found.app_id} at {result.host}: "
                      f"{result.detail}", check=result.public())
        if not result.ok:
            raise CliFailure(f"app check failed: {result.detail}")
        return
    if alias_of:
        hint = (f"; `app alias-remove {args.provider} {alias_of} {args.app_id}` removes the alias"
                if args.cmd == "remove" else "")
        raise CliFailure(f"{args.provider}:{args.app_id} is an alias of {args.provider}:{alias_of}, "
                         f"not an app: name the app{hint}")
    if args.cmd in ("enable", "disable"):
        changed = replace(found, enabled=args.cmd == "enable")
        _save_app(store, changed)
        out(args).say(f"saved {describe_app(changed)}", app=public_view(changed))
    elif args.cmd == "remove":
        store.remove_app(args.provider, args.app_id)
        out(args).say(f"removed {args.provider}:{args.app_id}"
                      + (f" and its aliases {', '.join(found.aliases)}" if found.aliases else ""))
    elif args.cmd == "aliases":
        out(args).rows("aliases", [{"alias": a} for a in found.aliases], list(found.aliases))
    elif args.cmd == "alias-add":
        try:
            saved = store.add_app_aliases(args.provider, args.app_id, _aliases(args.alias))
        except (AppNameConflict, LookupError) as exc:  # another app's name; the app went meanwhile
            raise CliFailure(str(exc)) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
        out(args).say(f"saved {describe_app(saved)}", app=public_view(saved))
    elif args.cmd == "alias-remove":
        if not store.remove_app_alias(args.provider, args.app_id, args.alias):
            raise CliFailure(f"{args.provider}:{args.app_id} has no alias {args.alias}")
        out(args).say(f"removed alias {args.alias} of {args.provider}:{args.app_id}")


def cmd_uamap(store: SyncStore, args: argparse.Namespace) -> None:
    if args.cmd == "set":
        try:
            re.compile(args.regex)
        except re.error as exc:
            raise CliError(f"bad User-Agent regex: {exc}") from exc
        store.save_ua_mapping(
            UaMapping(args.name, args.regex, args.app_param, args.type_param, args.token_param)
        )
        out(args).say(f"saved UA mapping {args.name}")
    elif args.cmd == "list":
        found = store.ua_mappings()
        out(args).rows("mappings", [asdict(m) for m in found], [
            f"{m.name}\t{m.user_agent_regex}\tapp={m.app_param} type={m.type_param} token={m.token_param}"
            for m in found])
    elif args.cmd == "remove":
        if not store.remove_ua_mapping(args.name):
            raise CliFailure(f"no UA mapping {args.name}")
        out(args).say(f"removed UA mapping {args.name}")


DEVICES_USAGE = """pushlib-admin devices [-h] user@domain
       pushlib-admin devices remove user@domain (DEVICE_ID | --all)"""


def cmd_devices(store: SyncStore, args: argparse.Namespace) -> None:
    """List a user's devices, or remove one (`remove AOR DEVICE_ID`) or all (`remove AOR --all`)."""
    words = list(args.words)
    if words[0] == "remove":
        if len(words) == 2 and args.all:
            aor = _aor(words[1])
            removed = store.remove_all_devices(aor)
            out(args).say(f"removed {len(removed)} devices of {aor}" + (f": {', '.join(removed)}" if removed else ""),
                          removed=removed)
        elif len(words) == 3 and not args.all:
            aor = _aor(words[1])
            if not store.remove_device(aor, words[2]):
                raise CliFailure(f"no device {words[2]} of {aor}")
            out(args).say(f"removed device {words[2]} of {aor}", removed=[words[2]])
        else:
            raise CliError("want `devices remove user@domain DEVICE_ID` or `devices remove user@domain --all`")
        return
    if len(words) != 1 or args.all:
        raise CliError("want `devices user@domain` (list) or `devices remove user@domain (DEVICE_ID | --all)`")
    now = time.time()
    devices = store.devices(_aor(words[0]))
    lines = []
    for d in devices:
        p = d.params
        tokens = ",".join(k for k, v in (("voip", p.voip_token), ("alert", p.alert_token)) if v)
        quarantined = " quarantined" if d.quarantined_until > now else ""
        dead = " dead" if d.dead else ""
        lines.append(
            f"{d.device_id}\t{p.provider.value}{'(sandbox)' if p.sandbox else ''}\t{p.app_id}\ttokens={tokens}"
            f"\tregistered {int(now - d.registered_at)}s ago\texpires in {int(d.expires_at - now)}s{quarantined}{dead}"
        )
    out(args).rows("devices", [device_view(d, now) for d in devices], lines)


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
            out(args).say(f"saved credentials of {user}@{domain}")
        elif args.cmd == "voicemail":
            _voicemail_uri(VoicemailStore(client), _aor(args.aor), args)
        else:
            subscribers.remove([(user, domain)])
            out(args).say(f"removed credentials of {user}@{domain}")
    finally:
        client.close()


def _voicemail_uri(vm: VoicemailStore, aor: Aor, args: argparse.Namespace) -> None:
    """`subscriber voicemail AOR [URI | --clear]`: set, clear or show the user's voicemail URI."""
    if args.clear:
        changed = vm.set_uri(aor, None)
        out(args).say(f"cleared the voicemail URI of {aor}" if changed else f"{aor} had no voicemail URI",
                      voicemail_uri=None)
    elif args.uri:
        try:
            vm.set_uri(aor, args.uri)
        except MwiError as exc:
            raise CliError(str(exc)) from None
        out(args).say(f"voicemail URI of {aor}: {args.uri}", voicemail_uri=args.uri)
    else:
        uri = vm.uri(aor)
        out(args).say(f"voicemail URI of {aor}: {uri or '(none: FALLBACK_URI applies)'}", voicemail_uri=uri)


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
    out(args).say(f"queued {job.kind.value} job {job.job_id} for {job.aor}", job_id=job.job_id)


# --- the HTTP API's records: keys, tenants, user uuids ---------------------------------------------


def _with_async_redis(store: SyncStore, work: Callable[[Any], Awaitable[_T]]) -> _T:
    """Run `work(client)` on a redis.asyncio client of the store's Redis (the API's stores are async)."""

    async def run() -> _T:
        client = async_client(store.settings.redis_url, timeout=SUBSCRIBER_TIMEOUT, connect_timeout=SUBSCRIBER_TIMEOUT)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def cmd_keys(store: SyncStore, args: argparse.Namespace) -> None:
    """API keys: create (the token is printed once), list, revoke."""

    async def work(client: Any) -> None:
        keys = ApiKeyStore(client)
        if args.cmd == "create":
            try:
                scopes = parse_scopes(args.scope)
            except ApiKeyError as exc:
                raise CliError(str(exc)) from None
            if args.tenant is not None and await TenantStore(client).get(args.tenant) is None:
                raise CliFailure(f"no tenant {args.tenant}")
            try:
                token, key = await keys.create(scopes, args.tenant, args.name)
            except ApiKeyError as exc:
                raise CliError(str(exc)) from None
            note = (f"created key {key.key_id} scopes={','.join(sorted(key.scopes))} "
                    f"tenant={key.tenant or '-'} (the token is shown once: store it now)")
            if out(args).as_json:
                out(args).say(note, token=token, key=key.public())
            else:  # the token alone on stdout (`KEY=$(pushlib-admin keys create ...)`), the note on stderr
                print(note, file=sys.stderr)
                print(token)
        elif args.cmd == "list":
            found = await keys.all()
            out(args).rows("keys", [k.public() for k in found], [
                f"{k.key_id}\tscopes={','.join(sorted(k.scopes))}\ttenant={k.tenant or '-'}\t{k.name}" for k in found])
        elif not await keys.revoke(args.key_id):
            raise CliFailure(f"no key {args.key_id}")
        else:
            out(args).say(f"revoked key {args.key_id}")

    _with_async_redis(store, work)


def cmd_tenants(store: SyncStore, args: argparse.Namespace) -> None:
    """Tenants and what they own: SIP domains, apps."""
    try:  # invalid values are usage (2); what the store then refuses is a failure (1)
        if args.cmd != "list":
            check_tenant_id(args.tenant_id)
        if args.cmd == "create":
            check_tenant_name(args.name)
        domains = getattr(args, "domain", [])  # domain-add: a list; domain-remove: one
        for domain in [domains] if isinstance(domains, str) else domains:
            check_domain(domain)
    except TenantError as exc:
        raise CliError(str(exc)) from None

    async def work(client: Any) -> None:
        tenants = TenantStore(client)
        try:
            if args.cmd == "create":
                tenant = await tenants.create(args.tenant_id, args.name)
                out(args).say(f"created tenant {tenant.tenant_id}", tenant=tenant.public())
            elif args.cmd == "list":
                found = await tenants.all()
                out(args).rows("tenants", [t.public() for t in found], [
                    f"{t.tenant_id}\t{t.name}\tdomains={','.join(sorted(t.domains)) or '-'}"
                    f"\tapps={','.join(sorted(t.apps)) or '-'}" for t in found])
            elif args.cmd == "show":
                found_one = await tenants.get(args.tenant_id)
                if found_one is None:
                    raise CliFailure(f"no tenant {args.tenant_id}")
                out(args).text(json.dumps(found_one.public(), sort_keys=True))
                out(args).say(f"tenant {args.tenant_id}", tenant=found_one.public())
            elif args.cmd == "delete":
                if not await tenants.delete(args.tenant_id):
                    raise CliFailure(f"no tenant {args.tenant_id}")
                revoked = await ApiKeyStore(client).revoke_tenant(args.tenant_id)
                out(args).say(f"deleted tenant {args.tenant_id} and revoked its {len(revoked)} keys", revoked=revoked)
            elif args.cmd == "domain-add":
                added = [await tenants.add_domain(args.tenant_id, d) for d in args.domain]
                out(args).say(f"tenant {args.tenant_id} owns {', '.join(added)}", domains=added)
            elif args.cmd == "domain-remove":
                if not await tenants.remove_domain(args.tenant_id, args.domain):
                    raise CliFailure(f"tenant {args.tenant_id} does not own {args.domain}")
                out(args).say(f"tenant {args.tenant_id} no longer owns {args.domain}")
            elif args.cmd == "app-add":
                await tenants.add_app(args.tenant_id, args.provider, args.app_id)
                out(args).say(f"tenant {args.tenant_id} owns app {args.provider}:{args.app_id}")
            elif not await tenants.remove_app(args.tenant_id, args.provider, args.app_id):
                raise CliFailure(f"tenant {args.tenant_id} does not own app {args.provider}:{args.app_id}")
            else:
                out(args).say(f"tenant {args.tenant_id} no longer owns app {args.provider}:{args.app_id}")
        except TenantError as exc:  # exists, no such tenant, a domain or app another tenant owns
            raise CliFailure(str(exc)) from None

    _with_async_redis(store, work)


def cmd_users(store: SyncStore, args: argparse.Namespace) -> None:
    """User uuids (Wazo's user_uuid) mapped to addresses of record."""
    try:
        check_user_uuid(args.user_uuid)
    except AorError as exc:
        raise CliError(str(exc)) from None

    async def work(client: Any) -> None:
        users = UserMap(client)
        if args.cmd == "map":
            aor = _aor(args.aor)
            await users.set(args.user_uuid, aor)
            out(args).say(f"user {args.user_uuid} is {aor}", user_uuid=args.user_uuid, aor=aor)
        elif args.cmd == "show":
            found = await users.get(args.user_uuid)
            if found is None:
                raise CliFailure(f"no user {args.user_uuid}")
            out(args).say(f"user {args.user_uuid} is {found}", user_uuid=args.user_uuid, aor=found)
        elif not await users.delete(args.user_uuid):
            raise CliFailure(f"no user {args.user_uuid}")
        else:
            out(args).say(f"forgot user {args.user_uuid}")

    _with_async_redis(store, work)


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
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (ok, message, the command's fields) instead of text")
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
    for name in ("show", "enable", "disable", "remove", "check"):
        p = app.add_parser(name, help="connect to the app's provider and check its authentication (exit 1: it fails)"
                           if name == "check" else None)
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
    p = subs.add_parser("voicemail", help="the user's voicemail URI: unanswered push calls go there "
                                          "(before FALLBACK_URI); no URI: show it")
    p.add_argument("aor", help="user@domain")
    p.add_argument("uri", nargs="?", help="sip: or sips: URI ({user}/{domain} are filled in)")
    p.add_argument("--clear", action="store_true", help="forget it (FALLBACK_URI applies again)")

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

    keys = sub.add_parser("keys", help="HTTP API keys").add_subparsers(dest="cmd", required=True)
    p = keys.add_parser("create", help="create a key; its token is printed once")
    p.add_argument("--scope", action="append", required=True, choices=[s.value for s in Scope],
                   help="send, read or admin (admin implies the others); repeatable")
    p.add_argument("--tenant", help="bind the key to a tenant: it sees only the tenant's users and apps")
    p.add_argument("--name", default="", help="a note: who or what uses the key")
    keys.add_parser("list")
    keys.add_parser("revoke").add_argument("key_id")

    ten = sub.add_parser("tenants", help="tenants: their SIP domains and apps").add_subparsers(
        dest="cmd", required=True)
    p = ten.add_parser("create")
    p.add_argument("tenant_id")
    p.add_argument("--name", default="")
    ten.add_parser("list")
    for name in ("show", "delete"):
        ten.add_parser(name, help="delete: also revokes the tenant's keys" if name == "delete" else None
                       ).add_argument("tenant_id")
    p = ten.add_parser("domain-add")
    p.add_argument("tenant_id")
    p.add_argument("domain", nargs="+")
    p = ten.add_parser("domain-remove")
    p.add_argument("tenant_id")
    p.add_argument("domain")
    for name in ("app-add", "app-remove"):
        p = ten.add_parser(name)
        p.add_argument("tenant_id")
        p.add_argument("provider", choices=[p.value for p in Provider])
        p.add_argument("app_id")

    users = sub.add_parser("users", help="user uuids (the API's user_uuid) and their addresses of record"
                           ).add_subparsers(dest="cmd", required=True)
    p = users.add_parser("map")
    p.add_argument("user_uuid")
    p.add_argument("aor", help="user@domain")
    users.add_parser("show").add_argument("user_uuid")
    users.add_parser("unmap").add_argument("user_uuid")
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
    args.output = Output(args.json)
    handlers = {
        "app": cmd_app, "uamap": cmd_uamap, "subscriber": cmd_subscriber, "devices": cmd_devices, "push": cmd_push,
        "keys": cmd_keys, "tenants": cmd_tenants, "users": cmd_users,
    }
    try:
        setup_logging(args.log_level)
        settings = settings_from_args(args)
        store = SyncStore(settings.redis_url, settings)
    except ValueError as exc:  # SettingsError (unreadable URL file, refused rediss options), bad level: usage
        return _fail(args, str(exc), 2)
    try:
        handlers[args.area](store, args)
    except CliError as exc:
        return _fail(args, str(exc), 2)
    except CliFailure as exc:
        return _fail(args, str(exc), 1)
    except StoreUnavailable as exc:
        return _fail(args, f"Redis unavailable at {redact_url(settings.redis_url)}: {exc}", 1)
    finally:
        store.close()
    args.output.flush()
    return 0


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    """One line on stderr (exit 2: usage, 1: the command failed); with --json the JSON document goes
    to stdout too, with `ok` false and the error."""
    print(f"pushlib-admin: {message}", file=sys.stderr)
    if args.output.as_json:
        args.output.fields["error"] = message
        args.output.flush(ok=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
