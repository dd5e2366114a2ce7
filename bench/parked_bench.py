"""Many parked calls at once: N sleeping devices that never wake, N calls parked together.

Our proxy in KEMI mode (kamailio/kamailio.cfg, the same defines as bench/capacity.py's "ours":
WITH_PUSHER, WITH_EXTERNAL_DISPATCHER (no dispatcher runs: the pushes pile up in the Redis stream),
AWAKE_WINDOW=0, WITHOUT_AUTH, PIKE_DENSITY=0, MAX_CALL_PUSHES_PER_MINUTE=0, MAX_CPS=0,
MAX_PARKED_PER_USER=0, 8 UDP workers, log level 1, shm 1024 MB), its own redis-server and the
sandbox APNs app, all on loopback.

--calls N RFC 8599 APNs VoIP devices are registered first (SIPp, capacity-register.xml, their
Contact a loopback port where nothing listens: they never wake). One SIPp caller
(parked-caller.xml, UDP) then calls the N distinct devices at --rate calls/s with
WAIT_WINDOW=--window, so with N/rate < window all N calls are parked at once at the peak; each must
end with 480 Temporarily Unavailable at its window's end. Per call the scenario logs SIPp's
millisecond clock when it sent the INVITE and when the final answer came: delay = final answer -
(INVITE sent + window).

Sampled every second during the calls: the resident size of Kamailio's shared-memory mapping (the
big shared anonymous mapping in /proc/<pid>/smaps; its Pss summed over all Kamailio processes, as
one process's Rss counts only the pages it touched; pages once touched stay resident, so this is
a high-water mark of shm use, not the live figure), the Pss sum of all Kamailio processes
(smaps_rollup; the sum of Rss would count the shared pages once per process) and Redis
used_memory. Kamailio CPU (utime+stime of all its processes) over the calls; finally the log is
scanned for CRITICAL / BUG lines and crashes (bench/capacity.py's pattern).

Usage:
    .venv/bin/python bench/parked_bench.py --quick     # 1,000 calls at 100/s, 15 s window (~1 min)
    .venv/bin/python bench/parked_bench.py             # 10,000 calls at 200/s, 60 s window (~3 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.capacity import (  # noqa: E402
    _BAD_LINE,
    CHILDREN,
    SHM_MB,
    BenchKamailio,
    Device,
    Sipp,
    cpu_seconds,
    ours_defines,
    register,
    sipp_client_args,
    write_injection,
)
from harness.localrun import free_port, redis_server  # noqa: E402
from harness.localstack import KAMAILIO_CFG  # noqa: E402
from harness.sipua import apns_token  # noqa: E402

_LOG_LINE = re.compile(r"^([SF]) (\S+) (\d+)(?: (\S*))?\s*$")
_SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) ")


# --------------------------------------------------------------------------- memory sampling


def shm_mapping(pid: int) -> tuple[int, int, int] | None:
    """(Size, Rss, Pss) in kB of the largest shared mapping of `pid` (Kamailio's shm), from smaps."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    best: tuple[int, int, int] | None = None
    cur: dict[str, int] = {}
    shared = False

    def close() -> None:
        nonlocal best
        if shared and cur.get("Size", 0) and (best is None or cur["Size"] > best[0]):
            best = (cur["Size"], cur.get("Rss", 0), cur.get("Pss", 0))

    for line in text.splitlines():
        m = _SMAPS_HEADER.match(line)
        if m:
            close()
            cur, shared = {}, m.group(1)[3] == "s"
            continue
        key, _, rest = line.partition(":")
        if key in ("Size", "Rss", "Pss"):
            cur[key] = int(rest.split()[0])
    close()
    return best


def shm_resident(pids: list[int]) -> tuple[int, int, int]:
    """(Size, resident, largest Rss in one process) in kB of Kamailio's shm mapping: a process's Rss
    counts only the pages it touched itself, so the mapping's resident size is the sum of its Pss
    over every process that maps it (each resident page split among its mappers)."""
    size = pss = rss = 0
    for pid in pids:
        m = shm_mapping(pid)
        if m is not None:
            size, rss, pss = max(size, m[0]), max(rss, m[1]), pss + m[2]
    return size, pss, rss


def pss_rss_sum(pids: list[int]) -> tuple[int, int]:
    """(sum of Pss, sum of Rss) in kB over `pids`, from smaps_rollup."""
    pss = rss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0])
            elif key == "Rss":
                rss += int(rest.split()[0])
    return pss, rss


@dataclass
class Peaks:
    samples: int = 0
    shm_size_kb: int = 0
    shm_resident_kb: int = 0  # resident pages of the shm mapping (Pss summed over processes); high-water:
    #   pages once touched stay resident
    shm_rss_one_process_kb: int = 0  # the largest Rss of the mapping in one process
    pss_sum_kb: int = 0
    rss_sum_kb: int = 0
    redis_used_memory: int = 0
    redis_stream_len: int = 0
    at_s: dict[str, float] = field(default_factory=dict)  # seconds after the first INVITE of each peak


class Sampler(threading.Thread):
    def __init__(self, pids: list[int], rds: redis.Redis, t0: float, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.rds, self.t0, self.interval = pids, rds, t0, interval
        self.peaks = Peaks()
        self.done = threading.Event()

    def _max(self, name: str, value: int) -> None:
        if value > getattr(self.peaks, name):
            setattr(self.peaks, name, value)
            self.peaks.at_s[name] = round(time.monotonic() - self.t0, 1)

    def sample(self) -> None:
        size, rss, pss = shm_resident(self.pids)
        if size:
            self.peaks.shm_size_kb = size
            self._max("shm_resident_kb", rss)
            self._max("shm_rss_one_process_kb", pss)
        pss, rss = pss_rss_sum(self.pids)
        self._max("pss_sum_kb", pss)
        self._max("rss_sum_kb", rss)
        try:
            mem: dict[str, Any] = self.rds.info("memory")
            self._max("redis_used_memory", int(mem["used_memory"]))
        except redis.RedisError:
            pass
        self.peaks.samples += 1

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> Peaks:
        self.done.set()
        self.join(10)
        self.sample()
        return self.peaks


# --------------------------------------------------------------------------- per-call timing


@dataclass
class CallTiming:
    calls: int
    finals: dict[str, int]  # final status code -> calls
    no_final: int  # calls with no final answer logged (timeout, unexpected message)
    delay_ms: dict[str, float]  # of the 480s: final answer - (INVITE sent + window)
    late_over_1s: int
    early: int  # 480s that came before the window's end
    peak_parked: int  # most calls between INVITE sent and final answer at once
    placed_rate: float  # calls/s actually placed (first to last INVITE, SIPp's clock)


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def call_timing(log: Path, calls: int, window_s: float) -> CallTiming:
    sent: dict[str, int] = {}
    final: dict[str, tuple[int, str]] = {}
    if log.exists():
        with open(log, errors="replace") as f:
            for line in f:
                m = _LOG_LINE.match(line)
                if not m:
                    continue
                kind, cid, tick = m.group(1), m.group(2), int(m.group(3))
                if kind == "S":
                    sent.setdefault(cid, tick)
                else:
                    final.setdefault(cid, (tick, m.group(4) or "?"))
    finals: dict[str, int] = {}
    delays: list[float] = []
    events: list[tuple[int, int]] = []
    for cid, t_sent in sent.items():
        events.append((t_sent, 1))
        got = final.get(cid)
        if got is None:
            continue
        t_final, code = got
        events.append((t_final, -1))
        finals[code] = finals.get(code, 0) + 1
        if code == "480":
            delays.append(t_final - t_sent - window_s * 1000)
    level = peak = 0
    for _, step in sorted(events):
        level += step
        peak = max(peak, level)
    delays.sort()
    ticks = sorted(sent.values())
    placed = (len(ticks) - 1) * 1000 / (ticks[-1] - ticks[0]) if len(ticks) > 1 and ticks[-1] > ticks[0] else 0.0
    stats = {} if not delays else {
        "min": delays[0], "median": statistics.median(delays), "p99": percentile(delays, 0.99), "max": delays[-1],
    }
    return CallTiming(
        calls=calls, finals=dict(sorted(finals.items(), key=lambda kv: -kv[1])),
        no_final=calls - sum(finals.values()), delay_ms={k: round(v, 1) for k, v in stats.items()},
        late_over_1s=sum(1 for d in delays if d > 1000), early=sum(1 for d in delays if d < 0), peak_parked=peak,
        placed_rate=round(placed, 1),
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    calls: int
    rate: int
    window_s: int
    prereg_failed: int = 0
    prereg_s: float = 0.0
    offered_rate: float = 0.0
    sipp_successful: int = 0
    sipp_failure_kinds: dict[str, int] = field(default_factory=dict)
    sipp_unexpected: dict[str, int] = field(default_factory=dict)
    timing: CallTiming | None = None
    peaks: Peaks | None = None
    redis_used_memory_before: int = 0
    redis_used_memory_after: int = 0
    pss_sum_before_kb: int = 0
    shm_resident_before_kb: int = 0
    kamailio_cpu_s: float = 0.0
    kamailio_cpu_cores: float = 0.0
    calls_elapsed_s: float = 0.0
    kamailio_processes: int = 0
    log_findings: list[str] = field(default_factory=list)
    error_lines: int = 0
    error_examples: list[str] = field(default_factory=list)
    crashed: bool = False
    error: str = ""


class HardTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise HardTimeout("hard overall timeout")


def run(args: argparse.Namespace, tmp: Path, res: Result) -> None:
    workdir = tmp / "work"
    workdir.mkdir()
    rundir = tmp / "kamailio"
    rundir.mkdir()
    with ExitStack() as es:
        srv = es.enter_context(redis_server())
        rds = redis.Redis(host="127.0.0.1", port=srv.port, decode_responses=True)
        es.callback(rds.close)
        defines = ours_defines(es, srv, args.window, {"MAX_PARKED_PER_USER": "0"})
        k = BenchKamailio(free_port(), KAMAILIO_CFG, dict(defines), rundir, {})
        try:
            k.start()
            assert k.proc is not None
            # devices that never wake: their Contact is a loopback port where nothing listens
            dead_port = free_port()
            devices = [Device(f"park{i}", apns_token(), str(uuid.uuid4())) for i in range(args.calls)]
            print(f"pre-registering {args.calls} devices at {args.prereg_rate}/s", flush=True)
            t = time.monotonic()
            reg = register(workdir, "prereg", k.port, dead_port, devices, args.prereg_rate)
            res.prereg_s = round(time.monotonic() - t, 1)
            res.prereg_failed = reg.failed
            if reg.failed:
                raise RuntimeError(f"{reg.failed} of {reg.total} pre-registrations failed: "
                                   f"{reg.failure_kinds} {reg.unexpected}")
            time.sleep(1.0)
            pids = k.pids()
            res.kamailio_processes = len(pids)
            res.redis_used_memory_before = int(rds.info("memory")["used_memory"])
            res.pss_sum_before_kb = pss_rss_sum(pids)[0]
            res.shm_resident_before_kb = shm_resident(pids)[1]

            inf = workdir / "calls.csv"
            write_injection(inf, [(d.user,) for d in devices])
            log = workdir / "calls-log.log"
            argv = [*sipp_client_args("parked-caller.xml", k.port, inf, args.rate, args.calls),
                    "-recv_timeout", str(int((args.window + 30) * 1000)),
                    "-trace_logs", "-log_file", str(log)]
            print(f"calling: {args.calls} calls at {args.rate}/s, window {args.window} s", flush=True)
            c0, t0 = cpu_seconds(pids), time.monotonic()
            sampler = Sampler(pids, rds, t0)
            sampler.start()
            caller = Sipp(workdir, "caller", argv, args.calls)
            try:
                sres = caller.wait(args.calls / args.rate + args.window + 60)
            finally:
                caller.stop()
                res.peaks = sampler.stop()
            c1, t1 = cpu_seconds(pids), time.monotonic()
            res.kamailio_cpu_s = round(c1 - c0, 2)
            res.calls_elapsed_s = round(t1 - t0, 1)
            res.kamailio_cpu_cores = round((c1 - c0) / (t1 - t0), 3)
            res.redis_used_memory_after = int(rds.info("memory")["used_memory"])
            res.sipp_successful = sres.successful
            res.sipp_failure_kinds = sres.failure_kinds
            res.sipp_unexpected = sres.unexpected
            with suppress(redis.RedisError):
                res.peaks.redis_stream_len = sum(
                    int(rds.xlen(key)) for key in rds.scan_iter(_type="stream", count=1000))
            res.timing = call_timing(log, args.calls, args.window)
            res.offered_rate = res.timing.placed_rate
        except Exception as exc:  # a failed run still reports what it measured
            res.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            print(f"ERROR {res.error}", flush=True)
        finally:
            res.crashed = not k.alive() and k.proc is not None
            for line in k.log().splitlines():
                if " ERROR: " in line:
                    res.error_lines += 1
                    if len(res.error_examples) < 5:
                        res.error_examples.append(line.strip()[:300])
                if _BAD_LINE.search(line):
                    res.log_findings.append(line.strip()[:400])
            k.stop()


# --------------------------------------------------------------------------- report


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def print_report(r: Result) -> None:
    t, p = r.timing, r.peaks
    rows: list[tuple[str, str]] = [
        ("calls / rate / window", f"{r.calls} at {r.rate}/s (offered {r.offered_rate}/s), window {r.window_s} s"),
        ("pre-registration", f"{r.calls - r.prereg_failed}/{r.calls} ok in {r.prereg_s} s"),
    ]
    if t is not None:
        n480 = t.finals.get("480", 0)
        other = {k: v for k, v in t.finals.items() if k != "480"}
        rows += [
            ("ended with 480", f"{n480} / {t.calls}"),
            ("other final answers", ", ".join(f"{k}: {v}" for k, v in other.items()) or "none"),
            ("no final answer", str(t.no_final)),
            ("peak calls parked at once", f"{t.peak_parked} (from the caller's send/final times)"),
            ("480 delay after window end", "median {median} ms, p99 {p99} ms, max {max} ms (min {min} ms)".format(
                **t.delay_ms) if t.delay_ms else "-"),
            ("480s > 1 s late / early", f"{t.late_over_1s} / {t.early}"),
        ]
    if p is not None:
        rows += [
            ("shm mapping resident (high-water)",
             f"{mb(p.shm_resident_kb)} of {mb(p.shm_size_kb)} ({mb(r.shm_resident_before_kb)} after pre-registration; "
             f"largest Rss in one process {mb(p.shm_rss_one_process_kb)})"),
            ("Kamailio Pss sum, peak", f"{mb(p.pss_sum_kb)} over {r.kamailio_processes} processes "
                                       f"({mb(r.pss_sum_before_kb)} before calls; Rss sum {mb(p.rss_sum_kb)})"),
            ("Redis used_memory, peak", f"{p.redis_used_memory / 1048576:.1f} MB "
                                        f"({r.redis_used_memory_before / 1048576:.1f} MB before calls, "
                                        f"{r.redis_used_memory_after / 1048576:.1f} MB after; "
                                        f"{p.redis_stream_len} stream entries left)"),
        ]
    rows += [
        ("Kamailio CPU over the calls", f"{r.kamailio_cpu_s} s in {r.calls_elapsed_s} s "
                                        f"({r.kamailio_cpu_cores} cores; "
                                        f"{r.kamailio_cpu_s * 1000 / max(1, r.calls):.2f} ms/call)"),
        ("log scan CRITICAL/BUG/crash", f"{len(r.log_findings)} line(s), "
                                        f"{'CRASHED' if r.crashed else 'no crash'}; {r.error_lines} ERROR line(s)"),
    ]
    if r.sipp_failure_kinds or r.sipp_unexpected:
        rows.append(("SIPp failures", f"{r.sipp_failure_kinds} {r.sipp_unexpected}"))
    if r.error:
        rows.append(("error", r.error))
    print()
    print("| measure | value |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for line in r.log_findings[:10]:
        print(f"  log: {line}")
    for line in r.error_examples:
        print(f"  ERROR line: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 calls at 100/s, window 15 s")
    ap.add_argument("--calls", type=int, default=None, help="calls = sleeping devices (default 10000)")
    ap.add_argument("--rate", type=int, default=None, help="calls/s (default 200)")
    ap.add_argument("--window", type=int, default=None, help="WAIT_WINDOW in seconds (default 60)")
    ap.add_argument("--prereg-rate", type=int, default=500, help="REGISTER/s while registering the devices")
    ap.add_argument("--timeout", type=int, default=None,
                    help="hard overall timeout in seconds (default: from the load, plus 180)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the SIPp files and Kamailio log (debugging)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/parked-<timestamp>.json)")
    args = ap.parse_args()
    args.calls = args.calls or (1000 if args.quick else 10000)
    args.rate = args.rate or (100 if args.quick else 200)
    args.window = args.window or (15 if args.quick else 60)
    if args.calls / args.rate >= args.window:
        print(f"note: {args.calls} calls at {args.rate}/s take longer than the {args.window} s window: "
              "the first calls end before the last are placed", flush=True)
    if args.timeout is None:
        args.timeout = int(args.calls / args.prereg_rate + args.calls / args.rate + args.window + 180)
    for tool in ("kamailio", "sipp", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")

    started = datetime.datetime.now(datetime.UTC)
    res = Result(args.calls, args.rate, args.window)
    tmp = Path(tempfile.mkdtemp(prefix="parked-bench-"))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        run(args, tmp, res)
    except HardTimeout as exc:  # (raised outside run's own handler, e.g. while stopping)
        res.error = res.error or str(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if args.keep_workdir:
            print(f"work dir kept: {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    out = args.out or ROOT / "bench" / "results" / f"parked-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        | {"children": CHILDREN, "shm_mb": SHM_MB, "cpus": os.cpu_count()},
        "notes": "shm_resident_kb: resident pages of Kamailio's shm mapping (Pss summed over processes), "
                 "a high-water mark (touched pages stay resident). delay_ms: final answer - "
                 "(INVITE sent + window), SIPp's clock.",
        "result": asdict(res),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print_report(res)
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
