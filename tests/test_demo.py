"""`make demo` end to end: `python -m harness.demo` as a subprocess, as a user runs it.

Checks the contract the README promises: exit 0, a timeline of real events in causal order with
non-decreasing millisecond offsets, a line starting `demo: call completed` followed by the next
step (`make demo-api`, the HTTP API's demo), and no process
the demo started still alive afterwards (only the process groups the demo itself reported are
inspected: other tests run their own Kamailio/Redis in parallel)."""

from __future__ import annotations

import re
import subprocess
import sys

from harness.demo import EVENTS, NEXT_STEP
from harness.localrun import group_members
from tests.support import ROOT

TIMELINE = re.compile(r"^demo: t\+\s*(-?\d+\.\d+) ms  (.+?)\s{2,}")
PROCESSES = re.compile(r"^demo: processes \(own process groups\): (.*?);")


def test_demo_runs_the_flagship_call_and_leaves_nothing_behind() -> None:
    run = subprocess.run([sys.executable, "-m", "harness.demo"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-2].startswith("demo: call completed"), run.stdout
    assert lines[-1] == f"demo: {NEXT_STEP}" and "`make demo-api`" in NEXT_STEP, run.stdout

    timeline = [(m.group(2), float(m.group(1))) for m in map(TIMELINE.match, lines) if m]
    assert [name for name, _ in timeline] == list(EVENTS), run.stdout
    offsets = [ms for _, ms in timeline]
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets), run.stdout
    assert offsets[-1] < 20_000  # the call, hang-up included, is seconds, not the wait window

    assert re.search(r"(?m)^demo: .*auth ON", run.stdout)
    assert re.search(r"(?m)^demo: .*pn-provider=apns .*pn-prid=[0-9a-f]{8}…", run.stdout)

    reported = next(m.group(1) for m in map(PROCESSES.match, lines) if m)
    pids = {int(pid) for pid in re.findall(r"=(\d+)", reported)}
    assert {"redis", "sandbox", "kamailio", "tshark", "sipp-device", "sipp-caller"} <= set(
        re.findall(r"([\w-]+)=\d+", reported))
    assert group_members(pids) == []
