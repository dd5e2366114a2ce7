"""Many calls parked at once end on time with their specified answer (the issue's 10,000-call
case is bench/parked_bench.py; this is its bounded version): 300 calls parked for one sleeping
user, every one answered 480 within about a second of its window, no BUG line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pushlib.models import Device
from tests.support import DOMAIN, Stack, apns_token, device_params, push_stack, sipp_caller

WAIT = 3.0
CALLS = 300
RATE = 100


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    defines: dict[str, str | None] = {"MAX_PARKED_PER_USER": "0", "MAX_CALL_PUSHES_PER_MINUTE": "0",
                                      "PIKE_DENSITY": "0", "MAX_CPS": "0"}
    with push_stack(wait_window=WAIT, awake_window=0, extra_defines=defines) as s:
        yield s


def test_300_parked_calls_all_end_with_480_on_time(stack: Stack, tmp: Path) -> None:
    user = "many"
    now = time.time()
    # a sleeping phone known to the store only (no binding: it is pushed, never rung)
    stack.store.save_device(Device(f"sip:{user}@{DOMAIN}", "phone", device_params(apns_token()),
                                   registered_at=now - 3600, expires_at=now + 3600))
    started = time.monotonic()
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp",
                         args=["-r", str(RATE), "-m", str(CALLS), "-l", str(CALLS)])
    assert caller.wait(CALLS / RATE + WAIT + 30) == 0, caller.logs()[-2000:]
    elapsed = time.monotonic() - started
    assert caller.final_codes() == [480] * CALLS
    # the last call was placed at ~CALLS/RATE s: it ended within about a second of its window
    assert elapsed < CALLS / RATE + WAIT + 2.5, f"{elapsed:.1f} s"
    log = stack.kamailio.log()
    assert "CRITICAL" not in log and " BUG" not in log
