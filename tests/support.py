"""Helpers shared by the tests (re-exported from pushlib.localrun so the demo can use them too)."""

from __future__ import annotations

from pushlib.localrun import (
    ROOT,
    RedisServer,
    free_port,
    redis_server,
    stop_process,
    wait_for_port,
)

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

__all__ = ["ROOT", "VENV_PYTHON", "RedisServer", "free_port", "redis_server", "stop_process", "wait_for_port"]
