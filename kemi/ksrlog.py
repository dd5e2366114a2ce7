"""Python `logging` inside Kamailio: records go to Kamailio's own log through KSR.

Without this, the in-process dispatcher's and the store's lines (push outcomes, dead tokens
removed, app errors, Redis outages) would be lost: app_python3 configures no handler, and
Kamailio workers run detached from any terminal.

Level mapping (decided here, documented in README "Logging"): Kamailio's `debug` (the LOG_LEVEL
define) sets the root logger's level, so a record is only formatted when Kamailio would print it:

    LOG_LEVEL >= 3 (debug) -> DEBUG      2 (info) -> INFO       1 (notice) -> NOTICE (25)
    0 (warning) -> WARNING               < 0 (error and below) -> ERROR

and each record goes to the KSR function of its level: DEBUG -> KSR.dbg, INFO -> KSR.info,
NOTICE -> KSR.notice, WARNING -> KSR.warn, ERROR and CRITICAL -> KSR.err. The level policy is
`pushlib.logutil.setup_logging`'s, shared with the standalone dispatcher and the CLI: libraries
whose INFO or DEBUG lines carry request URLs or HTTP/2 headers (httpx puts the APNs device token
in its path, hpack logs the bearer tokens) are held at WARNING whatever LOG_LEVEL says, and every
record is one line with its control characters escaped (no forged log lines from SIP input).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pushlib.logutil import QUIET_LOGGERS, setup_logging

__all__ = ["NOTICE", "QUIET_LOGGERS", "KsrHandler", "install", "python_level"]

NOTICE = 25  # Kamailio's L_NOTICE has no Python counterpart: between INFO and WARNING
logging.addLevelName(NOTICE, "NOTICE")


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

    `install` gives it `pushlib.logutil.SingleLineFormatter`, which escapes control characters and
    folds a traceback onto the line; a message that still holds line breaks (another formatter)
    is folded here, so a log reader keeps one event per line. Nothing is added to the message but
    the logger name.
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
    """Route the root logger to Kamailio through the shared set-up (idempotent: once per process,
    re-entrant after fork; a second call replaces the handler and re-applies the level)."""
    setup_logging(python_level(kamailio_debug), KsrHandler(ksr), fmt="%(message)s")
