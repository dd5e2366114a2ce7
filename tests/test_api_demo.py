"""`make demo-api` runs its command (`python -m harness.demo_api`) as written and succeeds."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT


def test_demo_api_command_from_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    command = re.search(r"^demo-api:.*\n\t\$\(PY\) (.+)$", makefile, re.M)
    assert command and command.group(1) == "-m harness.demo_api"
    run = subprocess.run([sys.executable, *command.group(1).split()], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "-> 204" in out and out.strip().endswith("reached the iPhone (APNs) and the Android phone (FCM)")
    assert '"push_type": "alert"' in out and '"notification_type": "planned_maintenance"' in out
