"""`python -m pushsandbox` / `pushlib-sandbox`: run the sandbox providers, or look at what
a running sandbox received (`pushlib-sandbox pushes --url ... --ca ...`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

from pushlib.logutil import setup_logging
from pushsandbox.certs import SandboxPki
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
    from pushsandbox.control import SandboxControl

    control = SandboxControl(args.url, Path(args.ca).read_text())
    try:
        for record in control.pushes(args.token):
            print(json.dumps(record, sort_keys=True))
    finally:
        control.close()
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
    args = parser.parse_args(argv)
    # Only the sandbox's own logger follows --log-level: h2/hpack debug logs are per frame (and
    # hold the bearer tokens the sandbox checks), so the shared set-up keeps them at WARNING.
    setup_logging(logging.WARNING)
    try:
        logging.getLogger("pushsandbox").setLevel(args.log_level.upper())
    except ValueError:
        parser.error(f"unknown --log-level {args.log_level!r}")
    if args.command == "pushes":
        sys.exit(_pushes_command(args))
    sys.exit(_serve_command(args))


if __name__ == "__main__":
    main()
