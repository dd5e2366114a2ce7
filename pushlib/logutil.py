"""Logging helpers that keep secrets and forged lines out of the logs.

`setup_logging` is the one logging set-up of every entry point (standalone dispatcher, operator
CLI, sandbox, and Kamailio through `kemi/ksrlog.py`):

- the root logger gets the requested level, but the HTTP/2 stack (`QUIET_LOGGERS`: httpx,
  httpcore, h2, hpack) stays at WARNING whatever that level is: below it those libraries log
  request URLs (the APNs device token is in the path) and HPACK header blocks (the APNs JWT,
  the FCM OAuth token);
- its handler drops below-WARNING records of those libraries anyway (`QuietFilter`, in case one of
  their child loggers sets a level of its own), and formats every record on one line
  (`SingleLineFormatter`): CR, LF and other control characters in the message (user names,
  User-Agent, Call-ID come from the network) are escaped, so nobody can inject a fake log line.

`log_safe` is the same escaping as a pure function, for values put into a message by hand.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "LOG_FORMAT",
    "QUIET_LOGGERS",
    "QuietFilter",
    "SingleLineFormatter",
    "StderrHandler",
    "escape_controls",
    "get_logger",
    "log_safe",
    "redact_url",
    "setup_logging",
    "token_prefix",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: loggers that would log full push URLs (device tokens), bearer tokens or HTTP/2 frames below WARNING
QUIET_LOGGERS = ("httpx", "httpcore", "h2", "hpack")

# C0 controls, DEL, C1 controls (NEL among them), Unicode line/paragraph separators, and the
# bidirectional overrides/isolates (they reorder how a line reads on a terminal), and lone
# surrogates (bytes that were not UTF-8, kept by surrogateescape: no log sink can encode them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN`):
    the result is always one line."""
    return _CONTROL.sub(_escape_one, text)


def log_safe(text: object, limit: int = 200) -> str:
    """A value from the network (SIP header, user name, User-Agent, Call-ID...) made safe for a log
    line: control characters escaped, cut to at most `limit` characters (an ellipsis marks a cut;
    an escape sequence is never split). None gives "-"."""
    if text is None:
        return "-"
    raw = text if isinstance(text, str) else str(text)
    limit = max(1, limit)
    escaped = escape_controls(raw)
    if len(escaped) <= limit:
        return escaped
    out: list[str] = []
    used = 0
    for piece in _pieces(raw):
        if used + len(piece) > limit - 1:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out) + "…"


def _pieces(raw: str) -> list[str]:
    """`raw` escaped, one piece per input character (so a cut never splits an escape)."""
    return [escape_controls(ch) for ch in raw]


def token_prefix(token: str | None, keep: int = 8) -> str:
    """A device token shortened to a prefix that identifies it in logs without revealing it."""
    if not token:
        return "-"
    return token[:keep] + "…" if len(token) > keep else token


def _hosts_ok(hosts: str) -> bool:
    """Whether every `host[:port]` of a URL's authority (comma-separated on a cluster URL) has a
    numeric port or none."""
    for host in hosts.split(","):
        port = host.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in host.rsplit("]", 1)[-1] else ""
        if port and not port.isdigit():
            return False
    return True


def redact_url(url: str | None) -> str:
    """A connection URL fit for a log line or an error message: the password (if any) replaced
    by `***`; the user name, hosts (a Redis Cluster URL lists several), port and path are kept.
    Unparsable input gives a placeholder rather than risking an echo of a secret."""
    if not url:
        return "-"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    query = parts.query
    if query:
        # a password can also ride in the query string (?password=...)
        query = re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", query)
    # (the user info ends at the last "@": a password may contain "@" too)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not _hosts_ok(hosts) or "@" in parts.path + parts.query + parts.fragment:
        # e.g. an unencoded "/" in the password ended the authority early: the rest may be secret
        return "<unparsable url>"
    netloc = parts.netloc
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}"
    return log_safe(urlunsplit(parts._replace(netloc=netloc, query=query)), 500)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def _is_quiet(name: str) -> bool:
    return any(name == q or name.startswith(q + ".") for q in QUIET_LOGGERS)


class QuietFilter(logging.Filter):
    """Drops records below WARNING from `QUIET_LOGGERS` (and their children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _is_quiet(record.name)


class SingleLineFormatter(logging.Formatter):
    """A formatter whose every output is one line: the formatted message, and the traceback or
    stack of the record if any, have their control characters escaped; message, traceback and
    stack are joined by ` | `. The traceback is formatted afresh (never taken from a cache another
    formatter may have filled unescaped)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        parts = [escape_controls(self.formatMessage(record))]
        if record.exc_info:
            parts.append(escape_controls(self.formatException(record.exc_info)))
        elif record.exc_text:
            parts.append(escape_controls(record.exc_text))
        if record.stack_info:
            parts.append(escape_controls(self.formatStack(record.stack_info)))
        return " | ".join(parts)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing to whatever `sys.stderr` is when a record is emitted (not the one
    of set-up time, which a test harness or a daemonising wrapper may have replaced since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    number = logging.getLevelName(name)
    if isinstance(number, int):
        return number
    if name.isdigit():
        return int(name)
    raise ValueError(f"unknown log level {log_safe(level, 40)!r}")


def setup_logging(
    level: int | str, handler: logging.Handler | None = None, *, fmt: str = LOG_FORMAT
) -> logging.Handler:
    """Configure the root logger (see module doc): `level` (a number or a name such as "debug"),
    the HTTP/2 stack held at WARNING or above, and `handler` (default: `StderrHandler`)
    with `QuietFilter` and `SingleLineFormatter(fmt)`. Idempotent: a handler installed by an
    earlier call is replaced, handlers installed by others (pytest's, an application's) are kept.
    Returns the installed handler. Raises ValueError for an unknown level name."""
    number = _level_number(level)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pushlib_setup", False):
            root.removeHandler(old)
            if old is not handler:
                old.close()
    if handler is None:
        handler = StderrHandler()
    handler.setFormatter(SingleLineFormatter(fmt))
    if not any(isinstance(f, QuietFilter) for f in handler.filters):
        handler.addFilter(QuietFilter())
    handler._pushlib_setup = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(number)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, number))
    return handler
