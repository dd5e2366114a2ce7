"""Capacity benchmark: our proxy (KEMI mode) against a minimal native Kamailio config, same SIPp load.

Two configurations, measured one after the other in the same run, each with its own redis-server
and Kamailio on free loopback ports (shm 1024 MB, pkg 32 MB, 8 UDP workers (--children), log level 1):

- ours:   kamailio/kamailio.cfg with WITH_PUSHER, WITH_EXTERNAL_DISPATCHER (no dispatcher runs:
          the call pushes pile up in the Redis stream), AWAKE_WINDOW=0 (every push device is
          pushed, never rung), WITHOUT_AUTH, PIKE_DENSITY=0, MAX_CALL_PUSHES_PER_MINUTE=0, MAX_CPS=0, the
          sandbox APNs app configured in Redis;
- native: bench/native-capacity.cfg, the same job in native script (save + tsilo append on
          REGISTER; record_route, t_newtran, ts_store, one XADD and a parking branch on INVITE).
- kemi-min (only when named in --configs): bench/kemi-min-capacity.cfg, native's job step for step
          in Python (app_python3, bench/kemi_min_router.py, the XADD through redis-py): what
          routing in Python costs by itself, the floor for any KEMI config on this machine.

Load, per step at R calls/s for --step-seconds: a pool of RFC 8599 APNs VoIP devices is
registered beforehand (SIPp, capacity-register.xml; its size covers the step's rate for
--pool-seconds, so a device is called again only after its previous call ended). A SIPp caller
(capacity-caller.xml, UDP) calls R distinct devices per second; a second SIPp, started
--wake-delay (0.5 s) later with the same rate and the same device order, sends each device's
re-REGISTER (push params, Contact = the one SIPp UAS, capacity-device.xml, that answers 200); the
caller ACKs, holds --hold-ms, BYEs. A call counts as failed unless it got its 200 and its BYE's
200 (parked calls end with 480 after --window seconds). A configuration stops stepping at its
first step with a failed call (or a failed re-REGISTER).

Per step: Kamailio CPU (utime+stime of all its processes from /proc, delta over the step) per
call, Redis commands per call (INFO commandstats delta, INFO itself excluded) and Redis CPU per
call (INFO cpu delta). At the steps whose rate is in --wake-rates (default 100, 400 and 1000
calls/s; --quick: 100), the wake latency: the device's re-REGISTER arriving at Kamailio -> the
parked call's INVITE leaving Kamailio toward the device, p50 / p99 / count in ms, from a packet
capture of Kamailio's SIP port during that step only (dumpcap + tshark, bench/sipcapture.py; pcap
timestamps, the pcap deleted after the step), and ours/native p50 at each rate both captured (a
configuration that stopped stepping before a rate has no figure there). After the call steps,
REGISTER/s: SIPp REGISTERs with push params (re-registering the pool) at stepped rates for
--reg-seconds each, highest rate with 0 failures.
Finally each Kamailio log is scanned for CRITICAL / BUG lines and crashes (a process that exited).

SIPp, Redis and Kamailio share the machine's cores: the figures are for this machine, and the
ratio ours/native is the portable part.

Usage:
    .venv/bin/python bench/capacity.py --quick              # 3 low steps, ~2-3 minutes
    .venv/bin/python bench/capacity.py                       # all steps, 20 s each (make bench)
    .venv/bin/python bench/capacity.py --step-seconds 60     # the official figure
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.sipcapture import capture, latency_summary, sip_rows, wake_latencies  # noqa: E402
from harness.localrun import RedisServer, free_port, group_members, redis_server, stop_process, wait_for_port  # noqa: E402
from harness.localstack import BUNDLE, KAMAILIO_CFG, SCENARIOS, TEAM, KamailioProc, pusher_defines  # noqa: E402
from harness.sipua import apns_token  # noqa: E402
from pushlib.settings import Settings  # noqa: E402
from pushlib.store import SyncStore  # noqa: E402
from pushsandbox.process import sandbox_process  # noqa: E402

NATIVE_CFG = ROOT / "bench" / "native-capacity.cfg"
KEMI_MIN_CFG = ROOT / "bench" / "kemi-min-capacity.cfg"
KEMI_MIN_ROUTER = ROOT / "bench" / "kemi_min_router.py"
CONFIGS = ("ours", "native", "kemi-min")
RATES = (100, 200, 300, 400, 600, 800, 1000, 1500, 2000)
QUICK_RATES = (50, 100, 200)
REG_RATES = (500, 1000, 1500, 2000, 3000, 4000, 6000)
QUICK_REG_RATES = (200, 500, 1000)
WAKE_RATES = (100, 400, 1000)  # call steps captured for the wake latency (a capture costs CPU: not every step)
QUICK_WAKE_RATES = (100,)
SHM_MB = 1024
PKG_MB = 32
CHILDREN = 8  # (kamailio/kamailio.cfg's default)
# a step whose SIPp offered less than this share of its rate is limited by the load generator
GENERATOR_SHORTFALL = 0.85
# a line of a Kamailio log worth reporting (CRITICAL/BUG levels, crashes, memory exhaustion)
_BAD_LINE = re.compile(r"CRITICAL|\bBUG\b|exited by a signal|core dumped|segfault|out of memory|no more shm",
                       re.IGNORECASE)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- Kamailio


class BenchKamailio(KamailioProc):
    """A KamailioProc with explicit memory sizes, ready once it answers an OPTIONS ping over UDP
    (log level 1 hides the router's `pusher: ready` line, and the native config has none)."""

    def args(self) -> list[str]:
        return [*super().args(), "-m", str(SHM_MB), "-M", str(PKG_MB)]

    def start(self) -> None:
        # (ready when it answers OPTIONS: at LOG_LEVEL 1 the router's "ready" line is not logged)
        self.spawn()
        try:
            wait_for_port(self.port, self.host, timeout=20)
            options_ping(self.port, timeout=20, host=self.host)
        except (TimeoutError, OSError):
            self.stop()
            raise RuntimeError("kamailio did not start:\n" + self.log()[-4000:]) from None
        time.sleep(1.0)  # the other workers finish their child init

    def pids(self) -> list[int]:
        return group_members({self.proc.pid}) if self.proc is not None else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def options_ping(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    """Send OPTIONS sip:127.0.0.1 over UDP (from 127.0.0.1, to `host`) until anything answers;
    TimeoutError after `timeout`."""
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
        while time.monotonic() < end:
            msg = "\r\n".join([
                "OPTIONS sip:127.0.0.1 SIP/2.0",
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{uuid.uuid4().hex};rport",
                f"From: <sip:bench@127.0.0.1>;tag={uuid.uuid4().hex[:8]}",
                "To: <sip:127.0.0.1>",
                f"Call-ID: ping-{uuid.uuid4().hex}",
                "CSeq: 1 OPTIONS",
                "Max-Forwards: 70",
                "Content-Length: 0",
                "", "",
            ])
            s.sendto(msg.encode(), (host, port))
            s.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                if s.recv(65535).startswith(b"SIP/2.0 "):
                    return
    raise TimeoutError(f"no answer to OPTIONS on {host}:{port} after {timeout}s")


def log_findings(text: str) -> tuple[list[str], list[str]]:
    """The ERROR-level lines and the lines worth reporting (CRITICAL/BUG, crashes, memory
    exhaustion) of a Kamailio log text, each stripped."""
    errors = [ln.strip() for ln in text.splitlines() if " ERROR: " in ln]
    bad = [ln.strip() for ln in text.splitlines() if _BAD_LINE.search(ln)]
    return errors, bad


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (seconds) of the live processes `pids` (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLK_TCK


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisSample:
    commands: int
    cpu_s: float


def redis_sample(client: redis.Redis) -> RedisSample:
    """Commands executed so far (INFO itself excluded) and CPU seconds used so far."""
    stats: dict[str, Any] = client.info("commandstats")
    commands = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    cpu: dict[str, Any] = client.info("cpu")
    return RedisSample(commands, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))


def redis_command_mix(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    out = {}
    for k, v in after.items():
        delta = int(v["calls"]) - int(before.get(k, {}).get("calls", 0))
        if delta and k != "cmdstat_info":
            out[k.removeprefix("cmdstat_")] = delta
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- SIPp


@dataclass
class Device:
    user: str
    token: str
    instance: str


@dataclass
class SippResult:
    total: int
    successful: int
    failed: int
    exit_code: int
    created_in_s: float  # seconds until the last call was created (rate actually offered)
    elapsed_s: float
    rate_seen: float  # calls created per second while creating (0: too short to tell)
    failure_kinds: dict[str, int]  # SIPp's nonzero Failed*(C) counters
    unexpected: dict[str, int]  # first line of each unexpected message SIPp got -> count

    @property
    def offered_rate(self) -> float:
        if self.rate_seen:
            return self.rate_seen
        return self.total / self.created_in_s if self.created_in_s > 0 else 0.0


class Sipp:
    """One SIPp client process (its own session; stopped by PID) with a statistics file."""

    def __init__(self, workdir: Path, name: str, argv: Sequence[str], total: int) -> None:
        self.workdir = workdir
        self.name = name
        self.total = total
        self.stat_file = workdir / f"{name}-stats.csv"
        self.error_file = workdir / f"{name}-errors.log"
        self.rate_seen = 0.0
        self.started = time.monotonic()
        with open(workdir / f"{name}-stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                ["sipp", *argv, "-nostdin", "-trace_stat", "-stf", str(self.stat_file), "-fd", "1",
                 "-trace_err", "-error_file", str(self.error_file)],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> SippResult:
        try:
            code = self.proc.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            code = -1
        elapsed = time.monotonic() - self.started
        rows = read_stats(self.stat_file)
        last = rows[-1] if rows else {}
        successful = int(last.get("SuccessfulCall(C)", 0) or 0)
        # the stats are dumped every second: interpolate when the last call was created
        created_in, prev_n, prev_t = elapsed, 0, 0.0
        for row in rows:
            n, t = int(row.get("OutgoingCall(C)", 0) or 0), _seconds(row.get("ElapsedTime(C)", ""))
            if t is None:
                continue
            if n >= self.total:
                created_in = prev_t + (t - prev_t) * (self.total - prev_n) / max(1, n - prev_n)
                break
            prev_n, prev_t = n, t
        # offered rate: slope over the dumps taken while calls were still being created
        during = [(int(r.get("OutgoingCall(C)", 0) or 0), _seconds(r.get("ElapsedTime(C)", ""))) for r in rows]
        ramp = [(n, t) for n, t in during if t is not None and 0 < n < self.total]
        self.rate_seen = ((ramp[-1][0] - ramp[0][0]) / (ramp[-1][1] - ramp[0][1])
                          if len(ramp) >= 2 and ramp[-1][1] > ramp[0][1] else 0.0)
        kinds = {k.removesuffix("(C)"): int(v) for k, v in last.items()
                 if k.startswith("Failed") and k.endswith("(C)") and (v or "0").isdigit() and int(v)}
        return SippResult(self.total, successful, self.total - successful, code, created_in, elapsed,
                          self.rate_seen, kinds, unexpected_messages(self.error_file))

    def stop(self) -> None:
        stop_process(self.proc)


_UNEXPECTED = re.compile(r"received '(SIP/2\.0 \d{3}[^\r\n']*|[A-Z]+ )")


def unexpected_messages(path: Path, limit: int = 4_000_000) -> dict[str, int]:
    """What SIPp got instead of the expected message (status line or method), from the head of its
    error trace (bounded: an overloaded run can write a lot)."""
    if not path.exists():
        return {}
    with open(path, errors="replace") as f:
        text = f.read(limit)
    out: dict[str, int] = {}
    for m in _UNEXPECTED.finditer(text):
        key = m.group(1).strip()
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _seconds(elapsed: str) -> float | None:
    """SIPp's ElapsedTime "HH:MM:SS:mmm000" (or with a '.' before the micros) as seconds."""
    m = re.match(r"(\d+):(\d+):(\d+)[:.](\d{3})", elapsed)
    if not m:
        return None
    h, mi, s, ms = (int(x) for x in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def read_stats(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter=";")]


def write_injection(path: Path, rows: Sequence[Sequence[str]]) -> None:
    with open(path, "w") as f:
        f.write("SEQUENTIAL\n")
        for row in rows:
            f.write(";".join(row) + ";\n")


def sipp_client_args(scenario: str, proxy_port: int, inf: Path, rate: int, count: int,
                     local_port: int | None = None) -> list[str]:
    """A SIPp client over UDP from 127.0.0.1:`local_port` (default: a free port) to the proxy."""
    return [
        f"127.0.0.1:{proxy_port}", "-sf", str(SCENARIOS / scenario), "-inf", str(inf),
        "-i", "127.0.0.1", "-p", str(local_port or free_port()), "-t", "u1",
        "-r", str(rate), "-rp", "1000", "-m", str(count), "-l", "200000",
        "-max_recv_loops", "10000", "-max_sched_loops", "10000",
    ]


def register(workdir: Path, name: str, proxy_port: int, device_port: int, devices: Sequence[Device],
             rate: int, extra_args: Sequence[str] = ()) -> SippResult:
    """REGISTER `devices` (push params, Contact at device_port) at `rate`/s; wait until done.
    `extra_args` go to SIPp as they are (e.g. `-rsa HOST:PORT`: send to one node of a cluster while
    the request URI keeps the served domain)."""
    inf = workdir / f"{name}.csv"
    write_injection(inf, [(d.user, d.token, d.instance) for d in devices])
    argv = [*sipp_client_args("capacity-register.xml", proxy_port, inf, rate, len(devices)),
            "-key", "device_port", str(device_port), "-key", "pn_param", f"{TEAM}.{BUNDLE}.voip",
            "-recv_timeout", "10000", *extra_args]
    run = Sipp(workdir, name, argv, len(devices))
    return run.wait(len(devices) / rate + 40)


@contextmanager
def device_uas(workdir: Path) -> Iterator[int]:
    """The one SIPp UAS every device's Contact points at; yields its port."""
    port = free_port()
    with open(workdir / "device-uas-stderr.log", "wb") as err:
        proc = subprocess.Popen(
            ["sipp", "-sf", str(SCENARIOS / "capacity-device.xml"), "-i", "127.0.0.1", "-p", str(port),
             "-t", "u1", "-nostdin", "-l", "200000", "-max_recv_loops", "10000"],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("device UAS did not start: " + (workdir / "device-uas-stderr.log").read_text())
        yield port
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- one configuration


@dataclass
class StepResult:
    rate: int
    calls: int
    successful: int
    failed: int
    reregister_failed: int
    offered_rate: float
    kamailio_cpu_ms_per_call: float
    redis_commands_per_call: float
    redis_cpu_ms_per_call: float
    redis_commands: dict[str, int]
    elapsed_s: float
    kamailio_cpu_cores: float  # Kamailio CPU seconds / step wall seconds
    failure_kinds: dict[str, int]
    unexpected: dict[str, int]
    kamailio_alive: bool
    captured: bool = False  # a --wake-rates step: its SIP was captured
    wake_latency: dict[str, float] | None = None  # count, p50_ms, p99_ms, max_ms; None: not captured or no wake

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.reregister_failed == 0

    @property
    def generator_limited(self) -> bool:
        """SIPp could not offer the rate (the machine is saturated): no higher step is meaningful."""
        return self.offered_rate < GENERATOR_SHORTFALL * self.rate


@dataclass
class RegStepResult:
    rate: int
    registers: int
    failed: int
    offered_rate: float
    kamailio_cpu_ms_per_register: float
    redis_commands_per_register: float
    failure_kinds: dict[str, int]
    unexpected: dict[str, int]

    @property
    def generator_limited(self) -> bool:
        return self.offered_rate < GENERATOR_SHORTFALL * self.rate


@dataclass
class ConfigResult:
    name: str
    steps: list[StepResult] = field(default_factory=list)
    reg_steps: list[RegStepResult] = field(default_factory=list)
    max_calls_per_s: int = 0
    max_registers_per_s: int = 0
    log_findings: list[dict[str, str]] = field(default_factory=list)
    generator_limited: bool = False  # max_calls_per_s is what SIPp could offer, not a failure point
    reg_generator_limited: bool = False
    error_lines: int = 0  # ERROR-level lines in the Kamailio log
    error_examples: list[str] = field(default_factory=list)
    crashed: bool = False
    error: str = ""

    def at_max(self) -> StepResult | None:
        ok = [s for s in self.steps if s.ok]
        return ok[-1] if ok else None

    def wake_steps(self) -> list[StepResult]:
        """The steps captured for the wake latency (the --wake-rates it reached, in step order)."""
        return [s for s in self.steps if s.captured]


class Runner:
    """Runs the steps of one configuration on a started Kamailio."""

    def __init__(self, name: str, k: BenchKamailio, rds: redis.Redis, device_port: int, workdir: Path,
                 args: argparse.Namespace, result: ConfigResult) -> None:
        self.name = name
        self.k = k
        self.rds = rds
        self.device_port = device_port
        self.workdir = workdir
        self.args = args
        self.result = result
        self.pool: list[Device] = []
        self.next_device = 0
        self.phase = "start"
        self.log_seen = 0

    def grow_pool(self, size: int) -> None:
        """Register new devices until the pool has `size` (at --prereg-rate, not measured)."""
        if size <= len(self.pool):
            return
        new = [Device(f"cap{len(self.pool) + i}", apns_token(), str(uuid.uuid4()))
               for i in range(size - len(self.pool))]
        res = register(self.workdir, f"prereg-{len(self.pool)}", self.k.port, self.device_port, new,
                       self.args.prereg_rate)
        if res.failed:
            raise RuntimeError(f"{self.name}: {res.failed} of {res.total} pre-registrations failed")
        self.pool.extend(new)

    def take(self, count: int) -> list[Device]:
        out = [self.pool[(self.next_device + i) % len(self.pool)] for i in range(count)]
        self.next_device = (self.next_device + count) % len(self.pool)
        return out

    def scan_log(self) -> None:
        """Findings in the log written since the last scan, tagged with the current phase."""
        text = self.k.log()
        fresh, self.log_seen = text[self.log_seen:], len(text)
        for line in fresh.splitlines():
            if " ERROR: " in line:
                self.result.error_lines += 1
                if len(self.result.error_examples) < 5:
                    self.result.error_examples.append(f"[{self.phase}] {line.strip()[:300]}")
            if _BAD_LINE.search(line):
                self.result.log_findings.append({"phase": self.phase, "line": line.strip()[:400]})

    def call_step(self, rate: int, captured: bool = False) -> StepResult:
        """One step of calls at `rate`/s; `captured`: the SIP of the wakes is captured meanwhile for
        the wake latency (only then: dumpcap costs CPU on the machine being measured)."""
        a = self.args
        calls = rate * a.step_seconds
        self.grow_pool(max(rate * a.pool_seconds, 1))
        devices = self.take(calls)
        tag = f"calls-{rate}"
        calls_inf = self.workdir / f"{tag}-calls.csv"
        write_injection(calls_inf, [(d.user,) for d in devices])
        reg_inf = self.workdir / f"{tag}-wake.csv"
        write_injection(reg_inf, [(d.user, d.token, d.instance) for d in devices])
        caller_argv = [*sipp_client_args("capacity-caller.xml", self.k.port, calls_inf, rate, calls),
                       "-d", str(a.hold_ms), "-recv_timeout", str(int((a.window + 10) * 1000))]
        wake_port = free_port()
        wake_argv = [*sipp_client_args("capacity-register.xml", self.k.port, reg_inf, rate, calls, wake_port),
                     "-key", "device_port", str(self.device_port), "-key", "pn_param", f"{TEAM}.{BUNDLE}.voip",
                     "-recv_timeout", "10000"]
        pids = self.k.pids()
        with ExitStack() as es:
            # only the packets the wake latency reads: the waker's REGISTERs in, Kamailio's requests
            # out to the device (about a third of the step's SIP: the pcap of a fast step stays small)
            pcap = es.enter_context(capture(
                self.workdir / f"{tag}.pcap", self.k.port,
                only=f"(src port {wake_port} and dst port {self.k.port}) or "
                     f"(src port {self.k.port} and dst port {self.device_port})")) if captured else None
            cmd_before: dict[str, Any] = self.rds.info("commandstats")
            r0, c0, t0 = redis_sample(self.rds), cpu_seconds(pids), time.monotonic()
            caller = Sipp(self.workdir, f"{tag}-caller", caller_argv, calls)
            es.callback(caller.stop)
            time.sleep(a.wake_delay)
            waker = Sipp(self.workdir, f"{tag}-wake", wake_argv, calls)
            es.callback(waker.stop)
            budget = a.step_seconds + a.window + 40
            res = caller.wait(budget - (time.monotonic() - t0))
            wres = waker.wait(budget + 10 - (time.monotonic() - t0))
            c1, t1 = cpu_seconds(pids), time.monotonic()
            r1 = redis_sample(self.rds)
            cmd_after: dict[str, Any] = self.rds.info("commandstats")
        return StepResult(
            rate=rate, calls=calls, successful=res.successful, failed=res.failed,
            reregister_failed=wres.failed, offered_rate=round(res.offered_rate, 1),
            kamailio_cpu_ms_per_call=round((c1 - c0) * 1000 / calls, 3),
            redis_commands_per_call=round((r1.commands - r0.commands) / calls, 2),
            redis_cpu_ms_per_call=round((r1.cpu_s - r0.cpu_s) * 1000 / calls, 4),
            redis_commands=redis_command_mix(cmd_before, cmd_after),
            elapsed_s=round(t1 - t0, 1), kamailio_cpu_cores=round((c1 - c0) / (t1 - t0), 2),
            failure_kinds={**res.failure_kinds, **{f"re-REGISTER {k}": v for k, v in wres.failure_kinds.items()}},
            unexpected={**res.unexpected, **{f"re-REGISTER {k}": v for k, v in wres.unexpected.items()}},
            kamailio_alive=self.k.alive(),
            captured=pcap is not None, wake_latency=self.wake_latency(pcap) if pcap is not None else None,
        )

    def wake_latency(self, pcap: Path) -> dict[str, float] | None:
        """The step's wake latency from its capture, which is deleted here (bounded disk use)."""
        try:
            rows = sip_rows(pcap, self.k.port)
        finally:
            pcap.unlink(missing_ok=True)
        return latency_summary(wake_latencies(rows, self.device_port, {self.k.host}))

    def reg_step(self, rate: int) -> RegStepResult:
        count = rate * self.args.reg_seconds
        devices = self.take(count)
        pids = self.k.pids()
        r0, c0 = redis_sample(self.rds), cpu_seconds(pids)
        res = register(self.workdir, f"reg-{rate}", self.k.port, self.device_port, devices, rate)
        c1, r1 = cpu_seconds(pids), redis_sample(self.rds)
        return RegStepResult(
            rate=rate, registers=count, failed=res.failed, offered_rate=round(res.offered_rate, 1),
            kamailio_cpu_ms_per_register=round((c1 - c0) * 1000 / count, 3),
            redis_commands_per_register=round((r1.commands - r0.commands) / count, 2),
            failure_kinds=res.failure_kinds, unexpected=res.unexpected,
        )

    def run(self, rates: Sequence[int], reg_rates: Sequence[int]) -> None:
        res = self.result
        for rate in rates:
            self.phase = f"calls {rate}/s"
            step = self.call_step(rate, captured=rate in self.args.wake_rates)
            res.steps.append(step)  # (a failing step too: what it measured and captured is reported)
            self.scan_log()
            wake = step.wake_latency
            print(f"  {self.name:<6} {rate:>5} calls/s: {step.successful}/{step.calls} ok, {step.failed} failed, "
                  f"{step.reregister_failed} re-REGISTERs failed (offered {step.offered_rate}/s); "
                  f"kamailio {step.kamailio_cpu_ms_per_call} ms/call, redis {step.redis_commands_per_call} cmd/call "
                  f"{step.redis_cpu_ms_per_call} ms/call; kamailio {step.kamailio_cpu_cores} cores"
                  + (f"; wake p50 {wake['p50_ms']} p99 {wake['p99_ms']} ms (n={wake['count']:.0f})" if wake
                     else "; wake: captured, no wake paired" if step.captured else "")
                  + (f"; failures {step.failure_kinds} {step.unexpected}" if step.failure_kinds else ""), flush=True)
            if not step.kamailio_alive:
                res.crashed = True
                return
            if self.args.keep_going:
                continue  # (an overload run: the step's outcome is the figure, not a stopping point)
            if not step.ok:
                break
            # (a step SIPp could not offer in full counts for what it offered, never less than a
            # step already held)
            res.max_calls_per_s = max(res.max_calls_per_s,
                                      rate if not step.generator_limited else int(step.offered_rate))
            if step.generator_limited:
                res.generator_limited = True
                print(f"  {self.name}: SIPp offered only {step.offered_rate}/s: stepping stops", flush=True)
                break
            time.sleep(1.0)  # (every call of the step has ended: the caller exits after its last BYE)
        for rate in reg_rates:
            self.phase = f"registers {rate}/s"
            rstep = self.reg_step(rate)
            res.reg_steps.append(rstep)
            self.scan_log()
            print(f"  {self.name:<6} {rate:>5} REGISTER/s: {rstep.registers - rstep.failed}/{rstep.registers} ok "
                  f"(offered {rstep.offered_rate}/s); kamailio {rstep.kamailio_cpu_ms_per_register} ms/REGISTER, "
                  f"redis {rstep.redis_commands_per_register} cmd/REGISTER"
                  + (f"; failures {rstep.failure_kinds} {rstep.unexpected}" if rstep.failed else ""), flush=True)
            if not self.k.alive():
                res.crashed = True
                return
            if rstep.failed:
                break
            res.max_registers_per_s = max(res.max_registers_per_s,
                                          rate if not rstep.generator_limited else int(rstep.offered_rate))
            if rstep.generator_limited:
                res.reg_generator_limited = True
                print(f"  {self.name}: SIPp offered only {rstep.offered_rate} REGISTER/s: stepping stops", flush=True)
                break
            time.sleep(2)


def ours_defines(es: ExitStack, srv: RedisServer, window: float,
                 extra: dict[str, str | None] | None = None, unix: bool = False) -> dict[str, str | None]:
    """Our proxy as the benchmarks measure it: the sandbox's APNs app stored in `srv`, and the
    defines of KEMI mode with no dispatcher, every device pushed, the abuse limits off (they would
    count as failures) and log level 1; `extra` adds or overrides defines. `unix`: Kamailio reaches
    Redis over its Unix socket."""
    sandbox = es.enter_context(sandbox_process())
    store = SyncStore(srv.url, Settings(redis_url=srv.url, wait_window=window))
    es.callback(store.close)
    store.save_app(sandbox.control.apns_token_app(BUNDLE, TEAM))
    return dict(pusher_defines(srv.unix_url if unix else srv.url, auth=False, wait_window=window, awake_window=0,
                               external_dispatcher=True,
                               extra={"CHILDREN": str(CHILDREN), "LOG_LEVEL": "1", "PIKE_DENSITY": "0",
                                      "MAX_CALL_PUSHES_PER_MINUTE": "0", "MAX_CPS": "0",
                                      "KEMI_ROUTER": f'"{ROOT / "kemi" / "router.py"}"', **(extra or {})}))


def run_config(name: str, args: argparse.Namespace, rates: Sequence[int], reg_rates: Sequence[int],
               tmp: Path) -> ConfigResult:
    result = ConfigResult(name)
    workdir = tmp / name
    workdir.mkdir()
    rundir = Path(tempfile.mkdtemp(prefix=f"capacity-{name}-", dir=tmp))
    with ExitStack() as es:
        srv = es.enter_context(redis_server())
        rds = redis.Redis(host="127.0.0.1", port=srv.port, decode_responses=True)
        es.callback(rds.close)
        if name == "ours":
            defines = ours_defines(es, srv, args.window, {"MAX_CPS": str(args.max_cps),
                                                          "CHILDREN": str(args.children)}, unix=args.redis_unix)
            cfg = KAMAILIO_CFG
        else:  # the two reference configs take the same defines, but for how they name Redis
            defines = {"CHILDREN": str(args.children), "LOG_LEVEL": "1", "WAIT_MS": str(int(args.window * 1000))}
            if name == "kemi-min":
                defines.update({"REDIS_URL": f'"{srv.unix_url if args.redis_unix else srv.url}"',
                                "KEMI_ROUTER": f'"{KEMI_MIN_ROUTER}"'})
                cfg = KEMI_MIN_CFG
            else:
                where = f"unix={srv.socket_path}" if args.redis_unix else f"addr=127.0.0.1;port={srv.port}"
                defines["REDIS_SERVER"] = f'"name=q;{where}"'
                cfg = NATIVE_CFG
        k = BenchKamailio(free_port(), cfg, dict(defines), rundir, {})
        runner: Runner | None = None
        try:
            k.start()
            port = es.enter_context(device_uas(workdir))
            runner = Runner(name, k, rds, port, workdir, args, result)
            runner.run(rates, reg_rates)
        except Exception as exc:  # a failed configuration still reports what it measured
            result.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            print(f"  {name}: ERROR {result.error}", flush=True)
        finally:
            if not k.alive() and k.proc is not None:
                result.crashed = True
            if runner is not None:
                runner.phase = "end"
                runner.scan_log()
            else:
                result.log_findings += [{"phase": "start", "line": ln.strip()[:400]}
                                        for ln in k.log().splitlines() if _BAD_LINE.search(ln)]
            k.stop()
            shutil.rmtree(rundir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def common_wakes(ours: ConfigResult, native: ConfigResult) -> list[tuple[int, dict[str, float], dict[str, float]]]:
    """(rate, ours' wake latency, native's) for each rate both configurations captured a wake at."""
    theirs = {s.rate: s.wake_latency for s in native.wake_steps() if s.wake_latency}
    return [(s.rate, s.wake_latency, theirs[s.rate]) for s in ours.wake_steps()
            if s.wake_latency and s.rate in theirs]


def summarize(results: dict[str, ConfigResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in results.items():
        best = r.at_max()
        out[name] = {
            "max_calls_per_s_0_failed": r.max_calls_per_s,
            "at_max": None if best is None else {
                "kamailio_cpu_ms_per_call": best.kamailio_cpu_ms_per_call,
                "redis_commands_per_call": best.redis_commands_per_call,
                "redis_cpu_ms_per_call": best.redis_cpu_ms_per_call,
            },
            "max_registers_per_s_0_failed": r.max_registers_per_s,
            "calls_limited_by_load_generator": r.generator_limited,
            "registers_limited_by_load_generator": r.reg_generator_limited,
            # per captured step: a rate the configuration never reached has no entry
            "wake_latency": [{"rate": s.rate, "step_ok": s.ok, "wake_latency": s.wake_latency}
                             for s in r.wake_steps()],
            "crashed": r.crashed,
            "error_lines": r.error_lines,
            "log_findings": len(r.log_findings),
        }
    ours, native = results.get("ours"), results.get("native")
    if ours is not None and native is not None:
        # per-call costs compared at the same rate: the highest rate both passed
        common = sorted({s.rate for s in ours.steps if not s.failed} & {s.rate for s in native.steps if not s.failed})
        cmp: dict[str, Any] = {
            "max_calls_per_s": ratio(ours.max_calls_per_s, native.max_calls_per_s),
            "max_registers_per_s": ratio(ours.max_registers_per_s, native.max_registers_per_s),
        }
        if common:
            rate = common[-1]
            o = next(s for s in ours.steps if s.rate == rate)
            n = next(s for s in native.steps if s.rate == rate)
            cmp.update({
                "at_rate": rate,
                "kamailio_cpu_per_call": ratio(o.kamailio_cpu_ms_per_call, n.kamailio_cpu_ms_per_call),
                "redis_commands_per_call": ratio(o.redis_commands_per_call, n.redis_commands_per_call),
                "redis_cpu_per_call": ratio(o.redis_cpu_ms_per_call, n.redis_cpu_ms_per_call),
            })
        cmp["wake_p50_by_rate"] = {str(rate): ratio(o_wake["p50_ms"], n_wake["p50_ms"])
                                   for rate, o_wake, n_wake in common_wakes(ours, native)}
        out["ours_over_native"] = cmp
    return out


def print_report(results: dict[str, ConfigResult], summary: dict[str, Any],
                 wake_rates: Sequence[int] = ()) -> None:
    print()
    print("| config | max calls/s (0 failed) | Kamailio CPU ms/call | Redis cmds/call | Redis CPU ms/call "
          "| max REGISTER/s (0 failed) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        best = r.at_max()
        cells = ("-", "-", "-") if best is None else (
            f"{best.kamailio_cpu_ms_per_call:.3f}", f"{best.redis_commands_per_call:.2f}",
            f"{best.redis_cpu_ms_per_call:.4f}")
        calls = f"{'≥ ' if r.generator_limited else ''}{r.max_calls_per_s}"
        regs = f"{'≥ ' if r.reg_generator_limited else ''}{r.max_registers_per_s}"
        print(f"| {name} | {calls} | {cells[0]} | {cells[1]} | {cells[2]} | {regs} |")
    cmp = summary.get("ours_over_native")
    if cmp:
        print(f"\nours/native: max calls/s {cmp['max_calls_per_s']}, max REGISTER/s {cmp['max_registers_per_s']}"
              + (f"; at {cmp['at_rate']} calls/s (highest rate both passed): Kamailio CPU/call "
                 f"{cmp['kamailio_cpu_per_call']}, Redis cmds/call {cmp['redis_commands_per_call']}, "
                 f"Redis CPU/call {cmp['redis_cpu_per_call']}" if "at_rate" in cmp else ""))
    if any(r.wake_steps() for r in results.values()):
        print("\nWake latency (device's re-REGISTER in -> parked INVITE out to the device, pcap):")
        print("| config | calls/s | step | wakes | p50 ms | p99 ms | max ms |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for name, r in results.items():
            for s in r.wake_steps():
                w = s.wake_latency
                figures = (f"{w['count']:.0f} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} | {w['max_ms']:.2f}" if w
                           else "0 | - | - | -")
                print(f"| {name} | {s.rate} | {'ok' if s.ok else 'FAILED'} | {figures} |")
        for name, r in results.items():
            missing = [rate for rate in wake_rates if rate not in {s.rate for s in r.steps}]
            if missing and r.steps:
                print(f"  {name}: no step at {', '.join(map(str, missing))} calls/s (stepping stopped): no figure")
        ours, native = results.get("ours"), results.get("native")
        if ours is not None and native is not None:
            ok = {name: {s.rate: s.ok for s in r.steps} for name, r in results.items()}
            pairs = [f"{ratio(o['p50_ms'], n['p50_ms'])} at {rate}/s"
                     + ("" if ok["ours"][rate] and ok["native"][rate] else " (a failing step)")
                     for rate, o, n in common_wakes(ours, native)]
            print(f"ours/native wake p50: {', '.join(pairs) if pairs else 'no rate both captured'}")
    print("\nPer step (rate: ok/calls, Kamailio ms/call, Redis cmds/call):")
    for name, r in results.items():
        steps = ", ".join(f"{s.rate}: {s.successful}/{s.calls} {s.kamailio_cpu_ms_per_call:.3f} "
                          f"{s.redis_commands_per_call:.1f}" for s in r.steps)
        print(f"  {name:<6} {steps}")
        top = next((s for s in reversed(r.steps) if s.redis_commands), None)
        if top is not None:
            mix = ", ".join(f"{k} {v / top.calls:.2f}" for k, v in list(top.redis_commands.items())[:8])
            print(f"  {'':<6} Redis commands per call at {top.rate}/s: {mix}")
    print("\nLog scan (CRITICAL / BUG / crash):")
    for name, r in results.items():
        state = "CRASHED (a Kamailio process exited)" if r.crashed else "no crash"
        print(f"  {name}: {len(r.log_findings)} line(s), {state}" + (f"; error: {r.error}" if r.error else ""))
        for f in r.log_findings[:10]:
            print(f"    [{f['phase']}] {f['line']}")
        print(f"  {name}: {r.error_lines} ERROR line(s)")
        for line in r.error_examples:
            print(f"    {line}")
        failed = next((s for s in r.steps if s.failed or s.reregister_failed), None)
        if failed is not None:
            print(f"  {name}: first failing step {failed.rate} calls/s: {failed.failure_kinds} {failed.unexpected}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"rates {QUICK_RATES}, 8 s steps, REGISTER rates "
                    f"{QUICK_REG_RATES}, wake latency at {','.join(map(str, QUICK_WAKE_RATES))} calls/s, "
                    "all three configurations (about 3-4 minutes)")
    ap.add_argument("--rates", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help=f"calls/s per step, comma separated (default {','.join(map(str, RATES))})")
    ap.add_argument("--reg-rates", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help=f"REGISTER/s per step (default {','.join(map(str, REG_RATES))})")
    ap.add_argument("--step-seconds", type=int, default=None, help="seconds of calls per step (default 20; "
                    "60 for the official figure)")
    ap.add_argument("--reg-seconds", type=int, default=5, help="seconds of REGISTERs per REGISTER step")
    ap.add_argument("--wake-rates", type=lambda s: tuple(int(x) for x in s.split(",") if x.strip()), default=None,
                    help=f"call steps whose SIP is captured for the wake latency, comma separated (default "
                         f"{','.join(map(str, WAKE_RATES))}; quick {','.join(map(str, QUICK_WAKE_RATES))}; "
                         f"\"\" = none)")
    ap.add_argument("--configs", default=None,
                    help=f"which configurations, in order (any of {', '.join(CONFIGS)}; default ours,native, "
                         "with --quick all three)")
    ap.add_argument("--redis-unix", action="store_true",
                    help="both configurations reach Redis over its Unix socket instead of TCP on loopback")
    ap.add_argument("--children", type=int, default=CHILDREN,
                    help=f"SIP worker processes of both configs (default {CHILDREN})")
    ap.add_argument("--max-cps", type=int, default=0,
                    help="ours' MAX_CPS (new calls per second before 503 + Retry-After); 0 = off, to measure")
    ap.add_argument("--keep-going", action="store_true",
                    help="run every step even after failures (an overload run: e.g. twice the capacity with "
                         "--max-cps set, to see the excess shed with 503 and no crash)")
    ap.add_argument("--window", type=int, default=5, help="wait window (s): a parked call gets 480 after it")
    ap.add_argument("--wake-delay", type=float, default=0.5, help="seconds from a call's start to its re-REGISTER")
    ap.add_argument("--hold-ms", type=int, default=500, help="the caller's pause between ACK and BYE")
    ap.add_argument("--pool-seconds", type=int, default=4,
                    help="device pool = rate x this many seconds (a device is called again after that)")
    ap.add_argument("--prereg-rate", type=int, default=500, help="REGISTER/s while filling the pool (unmeasured)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/capacity-<timestamp>.json)")
    args = ap.parse_args()
    if args.step_seconds is None:
        args.step_seconds = 8 if args.quick else 20
    rates = args.rates or (QUICK_RATES if args.quick else RATES)
    reg_rates = args.reg_rates or (QUICK_REG_RATES if args.quick else REG_RATES)
    if args.wake_rates is None:
        args.wake_rates = QUICK_WAKE_RATES if args.quick else WAKE_RATES
    for rate in args.wake_rates:
        if rate not in rates:
            print(f"--wake-rates: {rate} calls/s is not a step: not captured", flush=True)
    # (the quick run is a smoke run of every configuration; full runs leave kemi-min out for time)
    configs = [c.strip() for c in (args.configs or ("ours,native,kemi-min" if args.quick else "ours,native")).split(",")
               if c.strip()]
    if any(c not in CONFIGS for c in configs):
        raise SystemExit(f"--configs: any of {', '.join(CONFIGS)}")
    capturing = ("dumpcap", "tshark") if set(args.wake_rates) & set(rates) else ()
    for tool in ("kamailio", "sipp", "redis-server", *capturing):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")

    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, ConfigResult] = {}
    tmp = Path(tempfile.mkdtemp(prefix="capacity-bench-"))
    try:
        for name in configs:
            print(f"{name}: steps {', '.join(map(str, rates))} calls/s x {args.step_seconds} s", flush=True)
            results[name] = run_config(name, args, rates, reg_rates, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(results)
    out = args.out or ROOT / "bench" / "results" / f"capacity-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "params": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                   for k, v in vars(args).items()} | {"rates": list(rates), "reg_rates": list(reg_rates),
                                                      "shm_mb": SHM_MB,
                                                      "cpus": os.cpu_count()},
        "summary": summary,
        "configs": {name: asdict(r) for name, r in results.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print_report(results, summary, [r for r in args.wake_rates if r in rates])
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
