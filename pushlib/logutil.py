"""Logging helpers that keep secrets out of log lines."""

from __future__ import annotations

import logging


def token_prefix(token: str | None, keep: int = 8) -> str:
    """A device token shortened to a prefix that identifies it in logs without revealing it."""
    if not token:
        return "-"
    return token[:keep] + "…" if len(token) > keep else token


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
