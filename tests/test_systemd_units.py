"""deploy/systemd: the units pass `systemd-analyze verify` (syntax, known directives, executables that
exist), installed under a temp prefix in place of /opt/pushproxy, and Debian's kamailio.service
with the project's drop-in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

UNITS = ROOT / "deploy" / "systemd"
INSTALL_PREFIX = "/opt/pushproxy"  # where the units expect the checkout (README "Operating")
DEBIAN_KAMAILIO_UNIT = Path("/lib/systemd/system/kamailio.service")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def install(units: Path, prefix: Path) -> None:
    """The units as an operator installs them, with `prefix` for /opt/pushproxy; the prefix gets
    the venv's console scripts (links to this checkout's) and the router."""
    (prefix / ".venv" / "bin").mkdir(parents=True)
    for script in ("pushlib-dispatcher", "pushlib-api"):
        (prefix / ".venv" / "bin" / script).symlink_to(ROOT / ".venv" / "bin" / script)
    (prefix / "kemi").symlink_to(ROOT / "kemi")
    (prefix / "kamailio").symlink_to(ROOT / "kamailio")
    for name in ("pushlib-dispatcher.service", "pushlib-api.service"):
        (units / name).write_text((UNITS / name).read_text().replace(INSTALL_PREFIX, str(prefix)))
    shutil.copy(DEBIAN_KAMAILIO_UNIT, units / "kamailio.service")
    dropins = units / "kamailio.service.d"
    dropins.mkdir()
    (dropins / "pushproxy.conf").write_text(
        (UNITS / "kamailio.service.d" / "pushproxy.conf").read_text().replace(INSTALL_PREFIX, str(prefix)))


def verify(units: Path, *names: str) -> subprocess.CompletedProcess[str]:
    # run from the units' folder: verify then loads the drop-in folder next to kamailio.service
    return subprocess.run(["systemd-analyze", "verify", *names], cwd=units, capture_output=True, text=True,
                          timeout=60, check=False)


def test_units_verify_clean(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    install(units, tmp_path / "prefix")
    done = verify(units, "pushlib-dispatcher.service", "pushlib-api.service", "kamailio.service")
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_verify_would_catch_a_wrong_install_path(tmp_path: Path) -> None:
    """The check above is not vacuous: a unit whose program is missing fails it."""
    units = tmp_path / "units"
    units.mkdir()
    text = (UNITS / "pushlib-dispatcher.service").read_text().replace(INSTALL_PREFIX, str(tmp_path / "nowhere"))
    (units / "pushlib-dispatcher.service").write_text(text)
    done = verify(units, "pushlib-dispatcher.service")
    assert done.returncode != 0 and "pushlib-dispatcher" in done.stderr


@pytest.mark.skipif(not DEBIAN_KAMAILIO_UNIT.exists(), reason="Debian's kamailio package is not installed")
def test_the_dropin_replaces_debians_command_with_the_project_config(tmp_path: Path) -> None:
    dropin = (UNITS / "kamailio.service.d" / "pushproxy.conf").read_text()
    # an ExecStart= reset first, or systemd would run both commands
    assert "\nExecStart=\nExecStart=/usr/sbin/kamailio " in dropin
    assert "-A WITH_PUSHER" in dropin and f"KEMI_ROUTER=\"{INSTALL_PREFIX}/kemi/router.py\"" in dropin
    assert f"CFGFILE={INSTALL_PREFIX}/kamailio/kamailio.cfg" in (UNITS / "kamailio.default").read_text()
    for name in ("pushlib-dispatcher.service", "pushlib-api.service"):
        unit = (UNITS / name).read_text()
        for option in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                       "LoadCredential=redis-url:/etc/pushproxy/redis-url"):
            assert option in unit, (name, option)
