"""The README's quick benchmark commands run as written (from the checkout, as the README shows
them) and report what they promise. The full runs are `make bench`; these are their short forms."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def _readme_command(script: str) -> str:
    """The README's `--quick` command line for `script`, without its trailing comment."""
    m = re.search(rf"^(\.venv/bin/python bench/{re.escape(script)} --quick)\b.*$", README, re.MULTILINE)
    assert m, f"README shows no quick command for {script}"
    return m.group(1)


def _run(command: str, timeout: float) -> str:
    proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(300)
def test_parked_bench_quick_every_call_ends_with_480_on_time() -> None:
    out = _run(_readme_command("parked_bench.py"), timeout=280)
    assert re.search(r"ended with 480\s*\|\s*1000 / 1000", out), out[-3000:]
    assert re.search(r"> 1 s late / early\s*\|\s*0 /", out), out[-3000:]
    assert "0 line(s), no crash" in out


@pytest.mark.timeout(500)
def test_capacity_quick_measures_every_configuration() -> None:
    out = _run(_readme_command("capacity.py"), timeout=480)
    for config in ("ours", "native", "kemi-min"):
        assert re.search(rf"^\| {config} \| \d+", out, re.MULTILINE), out[-3000:]
        # the quick run's 100 calls/s step is captured: wakes paired from the pcap, with their p50 / p99
        wake = re.search(rf"^\| {config} \| 100 \| \w+ \| ([1-9]\d*) \| (\d+\.\d+) \| (\d+\.\d+) \|", out,
                         re.MULTILINE)
        assert wake, out[-3000:]
        assert float(wake.group(2)) <= float(wake.group(3)), wake.group(0)
    assert re.search(r"^ours/native wake p50: \d+\.\d+ at 100/s", out, re.MULTILINE), out[-3000:]
    assert out.count("0 line(s), no crash") == 3, out[-3000:]


@pytest.mark.timeout(300)
def test_chaos_quick_accounts_for_every_call() -> None:
    """Redis, the dispatcher, the sandbox and Kamailio each fail once during a steady run of calls:
    every call ends as specified (or was parked in the Kamailio that restarted), no call push
    arrives after its deadline, no duplicate beyond the killed dispatcher's jobs, no BUG line."""
    out = _run(_readme_command("chaos.py"), timeout=280)
    assert "audit: PASS" in out, out[-3000:]
    assert re.search(r"late incomingCall pushes 0,", out), out[-3000:]
    assert "CRITICAL/BUG/crash lines 0" in out, out[-3000:]
    assert re.search(r"'ok-answered': \d+", out) and re.search(r"'ok-480-window-end': \d+", out), out[-3000:]


@pytest.mark.timeout(200)
def test_reregister_bench_quick_scans_without_keyspace_scans() -> None:
    out = _run(_readme_command("reregister_bench.py"), timeout=180)
    assert re.search(r"due per minute: \d[\d,]* claimed", out), out[-3000:]
    assert "no SCAN/KEYS issued" in out, out[-3000:]


@pytest.mark.timeout(200)
def test_message_bench_quick_measures_both_flows() -> None:
    out = _run(_readme_command("message_bench.py"), timeout=180)
    assert re.search(r"MESSAGE stored -> push at the sandbox: p50 [\d.]+ ms", out), out[-3000:]
    assert re.search(r"REGISTER -> 100 queued MESSAGEs delivered: p50 [\d.]+ ms", out), out[-3000:]
