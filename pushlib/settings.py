"""Runtime settings, read from PUSHLIB_* environment variables with safe defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace


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
    reclaim_idle_ms: int = 30_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `PUSHLIB_<FIELD>` variables (e.g. PUSHLIB_REDIS_URL)."""
        env = os.environ if env is None else env
        overrides: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get("PUSHLIB_" + f.name.upper())
            if raw is None:
                continue
            default = getattr(cls, f.name)
            if isinstance(default, bool):
                overrides[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                overrides[f.name] = int(raw)
            elif isinstance(default, float):
                overrides[f.name] = float(raw)
            else:
                overrides[f.name] = raw
        return replace(cls(), **overrides)  # type: ignore[arg-type]
