"""`python -m pushsandbox` / `pushlib-sandbox`: run the sandbox providers, give apps credentials
for a running sandbox (`pushlib-sandbox credentials --url ... --ca ... --dir ... --apns BUNDLE ...`),
or look at what it received (`pushlib-sandbox pushes --url ... --ca ...`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import signal
import ssl
import sys
import tempfile
from pathlib import Path

import httpx

from pushlib.logutil import setup_logging
from pushsandbox.certs import SandboxPki
from pushsandbox.control import DEFAULT_TEAM_ID, SandboxControl, SandboxControlError
from pushsandbox.credentials import write_sandbox_credentials
from pushsandbox.server import SandboxApp, serve
from pushsandbox.state import DEFAULT_MAX_RECORDS, SandboxState

READY_PREFIX = "sandbox: listening on "


def _serve_command(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pushlib-sandbox-"))
    pki = SandboxPki.load_or_create(directory)
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    app = SandboxApp(SandboxState(max_records=args.max_records), pki, "", open_control=args.open_control)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        def ready(port: int) -> None:
            app.public_url = f"https://{url_host}:{port}"
            print(f"{READY_PREFIX}{app.public_url} ca={pki.ca_path}", flush=True)

        await serve(app, args.host, args.port, stop, ready)

    asyncio.run(run())
    logging.getLogger("pushsandbox").info("sandbox stopped")
    return 0


def _pushes_command(args: argparse.Namespace) -> int:
    control = SandboxControl(args.url, Path(args.ca).read_text())
    try:
        for record in control.pushes(args.token):
            print(json.dumps(record, sort_keys=True))
    finally:
        control.close()
    return 0


def _credentials_command(args: argparse.Namespace) -> int:
    try:
        ca_pem = Path(args.ca).read_text()
    except OSError as exc:
        print(f"pushlib-sandbox: cannot read the sandbox CA {args.ca}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        control = SandboxControl(args.url, ca_pem)
    except ssl.SSLError as exc:
        print(f"pushlib-sandbox: {args.ca} is not a PEM CA certificate: {exc}", file=sys.stderr)
        return 2
    with control:
        try:
            apps = write_sandbox_credentials(
                control, Path(args.out_dir), args.ca, apns=args.apns, apns_cert=args.apns_cert, fcm=args.fcm,
                key_id=args.key_id, team_id=args.team_id,
            )
        except ValueError as exc:
            print(f"pushlib-sandbox: {exc}", file=sys.stderr)
            return 2
        except (SandboxControlError, httpx.HTTPError) as exc:
            print(f"pushlib-sandbox: the sandbox at {args.url} did not register them: {exc}", file=sys.stderr)
            return 1
    for app in apps:
        print(f"pushlib-sandbox: {app.provider} {app.app_id}: {', '.join(map(str, app.files))}", file=sys.stderr)
        print(shlex.join(app.admin_argv))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pushlib-sandbox", description="Local APNs + FCM v1 sandbox providers (HTTP/2 over TLS)."
    )
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port (default 8443; 0 = any free port)")
    parser.add_argument("--dir", default=None,
                        help="directory for the CA and certs (default: a new temp dir)")
    parser.add_argument("--max-records", type=int, default=DEFAULT_MAX_RECORDS,
                        help="how many recent pushes to keep for the control API")
    parser.add_argument("--open-control", action="store_true",
                        help="answer the control API for non-loopback clients too")
    pushes = sub.add_parser("pushes", help="print the pushes a running sandbox recorded, one JSON per line")
    pushes.add_argument("--url", required=True, help="the sandbox URL, e.g. https://127.0.0.1:8443")
    pushes.add_argument("--ca", required=True, help="the sandbox's ca.pem")
    pushes.add_argument("--token", default=None, help="only pushes to this device token")
    creds = sub.add_parser(
        "credentials",
        help="make credentials for apps, register them with a running sandbox, write them into --dir "
             "and print the pushlib-admin lines that store them pointing at the sandbox",
    )
    creds.add_argument("--url", required=True, help="the sandbox URL, e.g. https://127.0.0.1:8443")
    creds.add_argument("--ca", required=True, help="the sandbox's ca.pem (named as --ca-file in the printed lines)")
    creds.add_argument("--dir", dest="out_dir", required=True, metavar="DIR",
                       help="where to write the key, certificate and service-account files (created if missing)")
    creds.add_argument("--apns", action="append", default=[], metavar="BUNDLE",
                       help="APNs token auth for this bundle id: one AuthKey_<KEYID>.p8 serves every --apns")
    creds.add_argument("--key-id", default=None, help="the token key's id (default: random, 10 characters)")
    creds.add_argument("--team-id", default=DEFAULT_TEAM_ID, help=f"the token key's team (default {DEFAULT_TEAM_ID})")
    creds.add_argument("--apns-cert", action="append", default=[], metavar="BUNDLE",
                       help="APNs certificate auth for this bundle id: BUNDLE-cert.pem + BUNDLE-key.pem")
    creds.add_argument("--fcm", action="append", default=[], metavar="PROJECT",
                       help="an FCM service account of this project: PROJECT-firebase-adminsdk.json")
    args = parser.parse_args(argv)
    if args.command == "credentials" and not (args.apns or args.apns_cert or args.fcm):
        creds.error("name at least one app: --apns, --apns-cert or --fcm")
    # Only the sandbox's own logger follows --log-level: h2/hpack debug logs are per frame (and
    # hold the bearer tokens the sandbox checks), so the shared set-up keeps them at WARNING.
    setup_logging(logging.WARNING)
    try:
        logging.getLogger("pushsandbox").setLevel(args.log_level.upper())
    except ValueError:
        parser.error(f"unknown --log-level {args.log_level!r}")
    if args.command == "pushes":
        sys.exit(_pushes_command(args))
    if args.command == "credentials":
        sys.exit(_credentials_command(args))
    sys.exit(_serve_command(args))


if __name__ == "__main__":
    main()
