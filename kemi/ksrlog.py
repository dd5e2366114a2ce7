"""Python `logging` inside Kamailio: records go to Kamailio's own log through KSR.

Without this, the in-process dispatcher's and the store's lines (push outcomes, dead tokens
removed, app errors, Redis outages) would be lost: app_python3 configures no handler, and
Kamailio workers run detached from any terminal.

Level mapping (decided here, documented in README "Logging"): Kamailio's `debug` (the LOG_LEVEL
define) sets the root logger's level, so a record is only formatted when Kamailio would print it:

    LOG_LEVEL >= 3 (debug) -> DEBUG      2 (info) -> INFO       1 (notice) -> NOTICE (25)
    0 (warning) -> WARNING               < 0 (error and below) -> ERROR

and each record goes to the KSR function of its level: DEBUG -> KSR.dbg, INFO -> KSR.info,
NOTICE -> KSR.notice, WARNING -> KSR.warn, ERROR and CRITICAL -> KSR.err. Libraries whose INFO
or DEBUG lines carry request URLs (httpx puts the APNs device token in its path) are held at
WARNING whatever LOG_LEVEL says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

NOTICE = 25  # Kamailio's L_NOTICE has no Python counterpart: between INFO and WARNING
logging.addLevelName(NOTICE, "NOTICE")

#: loggers that would log full push URLs (device tokens) or HTTP/2 frames below WARNING
QUIET_LOGGERS = ("httpx", "httpcore", "h2", "hpack")


def python_level(kamailio_debug: str | None) -> int:
    """The root logger level for Kamailio's `debug` value (None/garbage: 2, Kamailio's info)."""
    try:
        debug = int(str(kamailio_debug).strip().strip('"'))
    except ValueError:
        debug = 2
    if debug >= 3:
        return logging.DEBUG
    if debug == 2:
        return logging.INFO
    if debug == 1:
        return NOTICE
    if debug == 0:
        return logging.WARNING
    return logging.ERROR


class KsrHandler(logging.Handler):
    """Forward each record to Kamailio's log as one line: `<logger>: <message>`.

    Multi-line messages (tracebacks) are folded onto that line, so a log reader keeps one
    event per line. Nothing is added to the message but the logger name.
    """

    def __init__(self, ksr: Any) -> None:
        super().__init__()
        self._ksr = ksr

    def _sink(self, levelno: int) -> Callable[[str], Any]:
        if levelno >= logging.ERROR:
            return self._ksr.err  # type: ignore[no-any-return]
        if levelno >= logging.WARNING:
            return self._ksr.warn  # type: ignore[no-any-return]
        if levelno >= NOTICE:
            return self._ksr.notice  # type: ignore[no-any-return]
        if levelno >= logging.INFO:
            return self._ksr.info  # type: ignore[no-any-return]
        return self._ksr.dbg  # type: ignore[no-any-return]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            line = " | ".join(part for part in text.splitlines() if part.strip())
            self._sink(record.levelno)(f"{record.name}: {line}\n")
        except Exception:  # a log line must never break routing
            self.handleError(record)


def install(ksr: Any, kamailio_debug: str | None) -> None:
    """Route the root logger to Kamailio (idempotent: once per process, re-entrant after fork)."""
    root = logging.getLogger()
    if not any(isinstance(h, KsrHandler) for h in root.handlers):
        root.addHandler(KsrHandler(ksr))
    root.setLevel(python_level(kamailio_debug))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
