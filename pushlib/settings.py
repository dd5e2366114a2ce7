"""Runtime settings, read from PUSHLIB_* environment variables with safe defaults.

The Redis URL may hold a password (or an ACL user and its password): it is a secret. It comes from
`PUSHLIB_REDIS_URL`, or from a file named by `PUSHLIB_REDIS_URL_FILE` (the file holds the URL;
surrounding white space is stripped), never only from a command line, where `ps` would show it.
`redis_connection_options` gives the options every pushlib Redis client is built with: a
`rediss://` URL always verifies the server certificate and host name.

Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...][/0][?options]` (TLS:
`rediss+cluster://`, verified like `rediss://`). The hosts are startup nodes (any few of the
cluster's nodes: the client discovers the rest and follows failovers); user, password and options
apply to every node, and the database can only be 0. `cluster_url` parses it (SettingsError for a
bad one); `redisconn` builds a cluster client from it.

`call_alert_repeat` (PUSHLIB_CALL_ALERT_REPEAT, seconds, 0 or less = off): how often the dispatcher
sends an iOS device that has no VoIP token its visible incoming-call alert again while the call
is still parked for it (see `pushlib.dispatcher`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pushlib.logutil import redact_url

REDIS_URL_ENV = "PUSHLIB_REDIS_URL"
REDIS_URL_FILE_ENV = "PUSHLIB_REDIS_URL_FILE"
#: cluster scheme -> the plain scheme each node is reached with
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_REDIS_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
DEFAULT_REDIS_PORT = 6379
# URL query options that would turn off the checks of a rediss:// connection
_WEAKENING_TLS_OPTIONS = {"ssl_cert_reqs": ("required",), "ssl_check_hostname": ("true", "1", "yes", "y", "on")}


class SettingsError(ValueError):
    """A setting that cannot be used (unreadable URL file, bad number...): one line, no secret in it."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = "pn:jobs"
    group: str = "pn-dispatchers"
    stream_maxlen: int = 100_000
    max_devices_per_user: int = 10
    wait_window: float = 30.0
    hide_caller: bool = False
    message_ttl: int = 6 * 3600
    cancel_ttl: int = 60
    refresh_ttl: int = 15 * 60
    push_timeout: float = 10.0
    concurrency: int = 256
    # well under the wait window: a dead dispatcher's call pushes are taken over in seconds
    reclaim_idle_ms: int = 3_000
    call_alert_repeat: float = 10.0
    # seconds before a push binding's expiry its app is sent a background re-registration push
    # (pushlib.reregister; REREGISTER_PUSH_BEFORE in Kamailio; 0 = off)
    reregister_before: float = 0.0

    def __repr__(self) -> str:  # the URL may hold a password: shown redacted
        shown = (
            f"{f.name}={redact_url(self.redis_url) if f.name == 'redis_url' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `PUSHLIB_<FIELD>` variables (e.g. PUSHLIB_REDIS_URL), plus
        PUSHLIB_REDIS_URL_FILE (see module doc; giving both is an error). Raises SettingsError."""
        env = os.environ if env is None else env
        overrides: dict[str, object] = {}
        for f in fields(cls):
            name = "PUSHLIB_" + f.name.upper()
            raw = env.get(name)
            if raw is None:
                continue
            default = getattr(cls, f.name)
            try:
                if isinstance(default, bool):
                    overrides[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif isinstance(default, int):
                    overrides[f.name] = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                    if not math.isfinite(value):
                        raise ValueError("not a finite number")
                    overrides[f.name] = value
                else:
                    overrides[f.name] = raw
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from exc
        url_file = env.get(REDIS_URL_FILE_ENV)
        if url_file:
            if env.get(REDIS_URL_ENV) is not None:
                raise SettingsError(f"set {REDIS_URL_ENV} or {REDIS_URL_FILE_ENV}, not both")
            overrides["redis_url"] = read_redis_url_file(url_file)
        return replace(cls(), **overrides)  # type: ignore[arg-type]


def read_redis_url_file(path: str | os.PathLike[str]) -> str:
    """The Redis URL held in the file at `path` (stripped). Raises SettingsError when the file
    cannot be read, is empty, or does not hold a redis://, rediss://, unix:// or cluster URL (see
    module doc); the message never shows the file's content."""
    try:
        url = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        raise SettingsError(f"cannot read the Redis URL file {path}: {reason}") from exc
    if not url:
        raise SettingsError(f"the Redis URL file {path} is empty")
    if "\n" in url or urlsplit(url).scheme not in _REDIS_SCHEMES:
        raise SettingsError(f"the Redis URL file {path} does not hold one redis://, rediss://, unix://, "
                            "redis+cluster:// or rediss+cluster:// URL")
    return url


def redis_connection_options(url: str) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url(url, ...)` that every pushlib client adds (and a check
    that the URL parses, with an error that never quotes it unredacted): for a
    `rediss://` URL, certificate verification and host-name checking, explicitly (redis-py >= 6
    defaults to both; saying so keeps them on whatever the installed version). A rediss URL whose
    query turns either off (`ssl_cert_reqs=none`, `ssl_check_hostname=false`) is refused with
    SettingsError: trust a private CA with `?ssl_ca_certs=/path/ca.pem` instead. A cluster URL
    is checked as its nodes' URL (`cluster_url`)."""
    cluster = cluster_url(url)
    if cluster is not None:
        return redis_connection_options(cluster.node_url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed here so redis-py's error (it quotes the "port") never shows a secret
    except ValueError:
        raise SettingsError(f"bad Redis URL {redact_url(url)} (a password with `/`, `#`, `?` or `@` must be "
                            "percent-encoded)") from None
    if parts.scheme != "rediss":
        return {}
    query = {k.lower(): v for k, v in parse_qs(parts.query).items()}
    for option, allowed in _WEAKENING_TLS_OPTIONS.items():
        for value in query.get(option, ()):
            if value.strip().lower() not in allowed:
                raise SettingsError(
                    f"{redact_url(url)}: {option}={value} would skip verifying the Redis server; "
                    "trust a private CA with ?ssl_cert_reqs=required&ssl_ca_certs=<file> instead"
                )
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True}


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed `redis+cluster://` / `rediss+cluster://` URL: `node_url` is the plain URL of the
    first startup node (credentials, TLS and query options included, database 0), the one
    redis-py's cluster clients take; `nodes` are all the startup nodes, the first included."""

    node_url: str
    nodes: tuple[tuple[str, int], ...]

    def __repr__(self) -> str:  # node_url may hold a password
        return f"ClusterUrl(node_url={redact_url(self.node_url)!r}, nodes={self.nodes!r})"


def cluster_url(url: str) -> ClusterUrl | None:
    """The cluster a `redis+cluster://` or `rediss+cluster://` URL names (module doc); None for
    any other URL. SettingsError (never quoting the password) for a host list with an empty or
    unparsable entry, a database other than 0 (a cluster has only one), or a bad query."""
    scheme, sep, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    if node_scheme is None:
        return None
    # the authority ends at the first `/`, `?` or `#` (a password holding one must be
    # percent-encoded, as for any Redis URL)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostlist = authority.rpartition("@")
    shown = f"{scheme}://{'***@' if at else ''}{hostlist}{tail.split('?', 1)[0]}"
    parts = urlsplit(tail)  # path, query
    if parts.path not in ("", "/", "/0"):
        raise SettingsError(f"bad Redis Cluster URL {shown}: a cluster has database 0 only (give /0 or nothing)")
    if any(v.strip() != "0" for v in parse_qs(parts.query).get("db", ())):
        raise SettingsError(f"bad Redis Cluster URL {shown}: a cluster has database 0 only")
    nodes: list[tuple[str, int]] = []
    texts: list[str] = []
    for text in hostlist.split(","):
        text = text.strip()
        try:
            node = urlsplit(f"//{text}")
            host, port = node.hostname, node.port
        except ValueError:
            host, port = None, None
        if not text or not host or node.username is not None or node.path:
            raise SettingsError(f"bad Redis Cluster URL {shown}: want host:port[,host:port...] "
                                "(user and password once, before the first host)")
        if (host, port or DEFAULT_REDIS_PORT) not in nodes:
            nodes.append((host, port or DEFAULT_REDIS_PORT))
            texts.append(text)
    netloc = f"{userinfo}@{texts[0]}" if at else texts[0]
    node_url = urlunsplit((node_scheme, netloc, "/0", parts.query, ""))
    # the first node's URL must parse as a plain Redis URL (e.g. a password with a raw `:` in
    # the user part is fine, a port out of range is not)
    redis_connection_options(node_url)
    return ClusterUrl(node_url, tuple(nodes))
