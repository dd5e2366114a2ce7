"""`pushlib-api` (or `python -m pushlib.api`): serve the operator HTTP API with uvicorn.

Binds 127.0.0.1:8088 by default: put it behind a reverse proxy that terminates TLS. Settings come
from the environment like every pushlib program (PUSHLIB_REDIS_URL / PUSHLIB_REDIS_URL_FILE, ...)
plus PUSHLIB_API_MAX_BODY (bytes, default 65536) and PUSHLIB_API_METRICS_OPEN (1: /metrics needs
no key). `--openapi` prints the OpenAPI document and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

import uvicorn

from pushlib.api.app import MAX_BODY, ApiConfig, create_app
from pushlib.logutil import redact_url, setup_logging
from pushlib.settings import Settings, SettingsError, read_redis_url_file

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8088


def config_from_env(env: dict[str, str] | None = None) -> ApiConfig:
    """ApiConfig from PUSHLIB_API_MAX_BODY and PUSHLIB_API_METRICS_OPEN (SettingsError when bad)."""
    env = dict(os.environ) if env is None else env
    raw = env.get("PUSHLIB_API_MAX_BODY", str(MAX_BODY))
    if not raw.isdigit() or not 1024 <= int(raw) <= 16 * 1024 * 1024:
        raise SettingsError("PUSHLIB_API_MAX_BODY: want bytes between 1024 and 16777216")
    metrics_open = env.get("PUSHLIB_API_METRICS_OPEN", "").strip().lower() in ("1", "true", "yes", "on")
    return ApiConfig(max_body=int(raw), metrics_open=metrics_open)


def openapi_document() -> dict[str, object]:
    """The OpenAPI document the app serves at /openapi.json (docs/openapi.json is this)."""
    return create_app(Settings()).openapi()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pushlib-api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    parser.add_argument("--redis-url-file", metavar="PATH", help="read the Redis URL from this file")
    parser.add_argument("--log-level", default=os.environ.get("PUSHLIB_LOG_LEVEL", "INFO"))
    parser.add_argument("--openapi", action="store_true", help="print the OpenAPI document and exit")
    args = parser.parse_args(argv)
    if args.openapi:
        print(json.dumps(openapi_document(), indent=2, sort_keys=True))
        return 0
    try:
        setup_logging(args.log_level)
        settings = Settings.from_env()
        if args.redis_url_file:
            settings = replace(settings, redis_url=read_redis_url_file(args.redis_url_file))
        config = config_from_env()
    except ValueError as exc:
        print(f"pushlib-api: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, config)
    print(f"pushlib-api: Redis {redact_url(settings.redis_url)}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False,
                server_header=False, proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
