"""Chaos run: calls at a steady rate while every part of the system fails once, then an audit.

Our proxy in KEMI mode (kamailio/kamailio.cfg, WITH_PUSHER, WITH_EXTERNAL_DISPATCHER with one
standalone `pushlib.dispatcher` process, AWAKE_WINDOW=0 so every device is pushed, WITHOUT_AUTH,
the abuse limits off), its own redis-server, the sandbox providers (an APNs token-key app and an
FCM app), a SIPp UAS every device's Contact points at, all on loopback.

One call per device (--rate calls/s for --seconds, SIPp `chaos-caller.xml`). Per device, by call
number: 3 in 10 never wake (their callers must get 480 at the window's end), 1 in 10 has a token
the sandbox answers 410 (dead: 480 at the window's end too), the others are phones: a watcher
polls the sandbox and re-REGISTERs a phone 0.3 s after its incomingCall push arrives, and the UAS
answers the call (the caller must get 200). During the run, once each, at fixed shares of it:

- 15 %: the sandbox misbehaves for 6 s (the calls placed then): 503 with Retry-After twice, slow
  answers (1.5 s), a dead token (410);
- 25 %: Redis shuts down (saving its data) and starts again 1 s later;
- 45 %: the dispatcher is killed (SIGKILL) and started again 1 s later;
- 60 %: the sandbox restarts (pushes it had recorded were collected before; the apps' keys are
  registered again, as an operator would after a provider outage);
- 80 %: Kamailio restarts (the calls it held parked at that moment are lost with it).

The audit (every call is accounted for):
- answered, or 480 within 1 s of its window's end, or 480 at once while Redis was away (the
  specified answer with the push store down), or lost because it was parked in the Kamailio that
  restarted; anything else is a violation;
- no incomingCall push delivered after its deadline; duplicate pushes (same token, call and kind)
  counted and compared with the jobs the killed dispatcher held (its pending count at the kill);
- Kamailio's logs (every start) have no CRITICAL/BUG line and no crash.

Usage:
    .venv/bin/python bench/chaos.py                   # 120 s at 4 calls/s, 10 s window (~3 min)
    .venv/bin/python bench/chaos.py --quick           # 40 s (~70 s): the short run the test command makes
Exit status 0 when the audit finds no violation, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.capacity import _BAD_LINE, device_uas, write_injection  # noqa: E402
from harness.localrun import RedisServer, free_port, redis_server, stop_process  # noqa: E402
from harness.localstack import (  # noqa: E402
    BUNDLE,
    FCM_PROJECT,
    SCENARIOS,
    TEAM,
    KamailioProc,
    kamailio_process,
    pusher_defines,
)
from harness.sipua import SipClient, apns_token, fcm_token, rfc8599_apns_contact, rfc8599_fcm_contact  # noqa: E402
from pushlib.models import AppCredentials  # noqa: E402
from pushlib.settings import Settings  # noqa: E402
from pushlib.store import SyncStore  # noqa: E402
from pushsandbox.process import SandboxHandle, sandbox_process  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
WAKE_DELAY = 0.3
_LOG_LINE = re.compile(r"^([SFB]) (\S+) (\d+) (\S+)")
# what a woken phone's REGISTER may meet while Kamailio restarts: tried again this many times
REGISTER_TRIES = 4


@dataclass
class Phone:
    user: str
    token: str
    provider: str  # "apns" | "fcm"
    role: str  # "wakes" | "sleeps" | "dead" | sandbox fault: "503" | "slow"
    instance: str = field(default_factory=lambda: str(uuid.uuid4()))

    def contact(self, uas_port: int) -> str:
        make = rfc8599_apns_contact if self.provider == "apns" else rfc8599_fcm_contact
        return make(uas_port, self.token, "udp", instance=self.instance)


@dataclass
class Fault:
    name: str
    start: float  # seconds since the first call was placed
    end: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class CallOutcome:
    callee: str
    role: str
    placed: float  # seconds since the first call
    code: str  # "200", "480", ... or "none"
    after_s: float | None  # final answer - INVITE sent
    verdict: str


@dataclass
class Result:
    seconds: float
    rate: int
    window_s: int
    calls: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    pushes: int = 0
    late_pushes: list[dict[str, Any]] = field(default_factory=list)
    duplicate_pushes: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # "<device role> <kind>" -> extra copies
    killed_dispatcher_pending: int = 0
    phones_woken: int = 0
    register_failures: int = 0
    log_findings: list[str] = field(default_factory=list)
    kamailio_starts: int = 0
    elapsed_s: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and not self.violations and not self.late_pushes and not self.log_findings
                and self.duplicate_pushes <= max(self.killed_dispatcher_pending, 0))


# --------------------------------------------------------------------------- the parts


def plan_phones(count: int) -> list[Phone]:
    roles = ["sleeps", "sleeps", "sleeps", "dead", "wakes", "wakes", "wakes", "wakes", "wakes", "wakes"]
    phones = []
    for i in range(count):
        provider = "apns" if i % 3 else "fcm"
        token = apns_token() if provider == "apns" else fcm_token()
        phones.append(Phone(f"chaos{i:05d}", token, provider, roles[i % len(roles)]))
    return phones


class Dispatcher:
    """The standalone dispatcher process (its own session, stopped by PID)."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHLIB_")}
        env["PYTHONPATH"] = str(ROOT)
        python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [python, "-m", "pushlib.dispatcher", "--redis-url", self.redis_url, "--consumer", "chaos"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )

    def kill(self) -> None:
        if self.proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class PushWatcher:
    """Polls the sandbox's recorded pushes; wakes a phone (REGISTER from its own socket, Contact at
    the UAS) WAKE_DELAY after its first incomingCall push of a call. Keeps every push it saw,
    across sandbox restarts (`pause()` takes a last look before one)."""

    def __init__(self, sandbox: SandboxHandle, phones: dict[str, Phone], kamailio_port: int, uas_port: int) -> None:
        self.sandbox = sandbox
        self.phones = phones
        self.kamailio_port = kamailio_port
        self.uas_port = uas_port
        self.pushes: list[dict[str, Any]] = []
        self.woken: set[tuple[str, str]] = set()
        self.register_failures = 0
        self._seen = 0
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(8)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._paused.is_set():
                with suppress(Exception):  # (the sandbox restarting)
                    self.poll()
            self._stop.wait(0.15)

    def poll(self) -> None:
        with self._lock:
            records = self.sandbox.control.pushes()
            new, self._seen = records[self._seen:], len(records)
            self.pushes.extend(new)
        for rec in new:
            phone = self.phones.get(str(rec.get("token")))
            data = _payload_fields(rec.get("payload"))
            if phone is None or phone.role == "sleeps" or data.get("kind", data.get("type")) != "incomingCall":
                continue
            key = (phone.user, str(data.get("call_id", "")))
            if key not in self.woken:
                self.woken.add(key)
                self._pool.submit(self._wake, phone)

    def _wake(self, phone: Phone) -> None:
        time.sleep(WAKE_DELAY)
        for _ in range(REGISTER_TRIES):
            try:
                with SipClient(self.kamailio_port, "udp") as c:
                    if c.register(phone.user, phone.contact(self.uas_port)).status == 200:
                        return
            except (OSError, TimeoutError):
                pass
            time.sleep(0.5)
        self.register_failures += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No polling meanwhile (the sandbox restarts); a last poll first, a fresh count after."""
        self._paused.set()
        with self._lock:
            pass
        with suppress(Exception):
            self.poll()
        try:
            yield
        finally:
            with self._lock:
                self._seen = 0
            self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with suppress(Exception):
            self.poll()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _payload_fields(payload: object) -> dict[str, Any]:
    """The flat fields of a push payload (APNs: top level and `data`; FCM: `data`)."""
    if not isinstance(payload, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if isinstance(v, dict):
            out.update(_payload_fields(v))
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- the audit


def read_calls(log: Path) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, str]]]:
    """SIPp's per-call lines: call-id -> (INVITE tick, callee) and call-id -> (final tick, code)."""
    sent: dict[str, tuple[int, str]] = {}
    final: dict[str, tuple[int, str]] = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line)
            if not m:
                continue
            kind, cid, tick, value = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "S":
                sent.setdefault(cid, (tick, value))
            elif kind == "F":
                final.setdefault(cid, (tick, value))
    return sent, final


def verdict(role: str, placed: float, code: str, after: float | None, window: float,
            faults: dict[str, Fault]) -> str:
    """How one call ended against what it should: a name starting with "ok" or "lost", or a
    violation (anything else)."""
    redis_gap = faults.get("redis-restart")
    kamailio = faults.get("kamailio-restart")
    in_redis_gap = redis_gap is not None and redis_gap.start - 0.5 <= placed <= redis_gap.end + 1.0
    parked_at_restart = kamailio is not None and kamailio.start - window - 1.0 <= placed <= kamailio.end + 1.0
    if code == "200":
        return "ok-answered" if role != "sleeps" else "answered-a-sleeper"
    if code == "480" and after is not None:
        if abs(after - window) <= 1.0:
            return "ok-480-window-end"
        if in_redis_gap and after < 1.5:
            return "ok-480-push-store-down"
        if parked_at_restart:
            return "lost-kamailio-restart"
        return "480-off-time"
    if parked_at_restart:
        return "lost-kamailio-restart"
    return f"unexpected-{code}"


def audit(res: Result, sent: dict[str, tuple[int, str]], final: dict[str, tuple[int, str]],
          phones: dict[str, Phone], faults: dict[str, Fault], window: float) -> list[CallOutcome]:
    by_user = {p.user: p for p in phones.values()}
    t0 = min(t for t, _ in sent.values()) if sent else 0
    outcomes = []
    for cid, (tick, callee) in sorted(sent.items(), key=lambda kv: kv[1][0]):
        phone = by_user.get(callee)
        role = phone.role if phone else "?"
        placed = (tick - t0) / 1000
        got = final.get(cid)
        code, after = (got[1], (got[0] - tick) / 1000) if got else ("none", None)
        outcomes.append(CallOutcome(callee, role, round(placed, 3), code, None if after is None else round(after, 3),
                                    verdict(role, placed, code, after, window, faults)))
    res.calls = len(outcomes)
    res.verdicts = dict(Counter(o.verdict for o in outcomes).most_common())
    res.codes = dict(Counter(o.code for o in outcomes).most_common())
    res.violations = [asdict(o) for o in outcomes if not o.verdict.startswith(("ok", "lost"))]
    return outcomes


def push_audit(res: Result, pushes: list[dict[str, Any]], phones: dict[str, Phone]) -> None:
    res.pushes = len(pushes)
    seen: Counter[tuple[str, str, str]] = Counter()
    for rec in pushes:
        data = _payload_fields(rec.get("payload"))
        kind = str(data.get("kind", data.get("type", "?")))
        seen[(str(rec.get("token")), str(data.get("call_id", "")), kind)] += 1
        deadline = data.get("deadline")
        if kind == "incomingCall" and deadline is not None and float(rec["time"]) > float(deadline) + 0.5:
            late = round(float(rec["time"]) - float(deadline), 3)
            res.late_pushes.append({"token": str(rec.get("token"))[:8], "late_s": late})
    res.duplicate_pushes = sum(n - 1 for n in seen.values() if n > 1)
    dup: Counter[str] = Counter()
    for (token, _call, kind), n in seen.items():
        if n > 1:
            phone = phones.get(token)
            dup[f"{phone.role if phone else '?'} {kind}"] += n - 1
    res.duplicates = dict(dup)


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, tmp: Path, res: Result) -> None:
    count = int(args.seconds * args.rate)
    phones = plan_phones(count)
    by_token = {p.token: p for p in phones}
    with ExitStack() as es:
        srv: RedisServer = es.enter_context(redis_server())
        sandbox: SandboxHandle = es.enter_context(sandbox_process())
        settings = Settings(redis_url=srv.url, wait_window=args.window)
        store = SyncStore(srv.url, settings)
        es.callback(store.close)
        apps: list[AppCredentials] = [sandbox.control.apns_token_app(BUNDLE, TEAM),
                                      sandbox.control.fcm_app(FCM_PROJECT)]
        for app in apps:
            store.save_app(app)
        defines = pusher_defines(srv.url, auth=False, wait_window=args.window, awake_window=0, external_dispatcher=True,
                                 extra={"PIKE_DENSITY": "0", "MAX_CALL_PUSHES_PER_MINUTE": "0", "MAX_CPS": "0",
                                        "MAX_PARKED_PER_USER": "0", "CHILDREN": "4"})
        k: KamailioProc = es.enter_context(kamailio_process(defines))
        es.callback(lambda: res.__setattr__("kamailio_starts", k.starts))
        es.callback(lambda: scan_logs(k, res))
        uas_port = es.enter_context(device_uas(tmp))
        dispatcher = Dispatcher(srv.url, tmp / "dispatcher.log")
        dispatcher.start()
        es.callback(dispatcher.stop)

        for p in phones:  # registered, then asleep (AWAKE_WINDOW=0: every call pushes)
            with SipClient(k.port, "udp") as c:
                r = c.register(p.user, p.contact(uas_port))
            if r.status != 200:
                raise RuntimeError(f"REGISTER of {p.user}: {r.status} {r.reason}")
        watcher = PushWatcher(sandbox, by_token, k.port, uas_port)
        watcher.start()
        es.callback(watcher.stop)

        inf = tmp / "calls.csv"
        write_injection(inf, [(p.user,) for p in phones])
        calls_log = tmp / "calls.log"
        sipp_argv = [
            "sipp", f"127.0.0.1:{k.port}", "-sf", str(SCENARIOS / "chaos-caller.xml"), "-inf", str(inf),
            "-i", "127.0.0.1", "-p", str(free_port()), "-t", "u1", "-r", str(args.rate), "-rp", "1000",
            "-m", str(count), "-l", "100000", "-recv_timeout", str(int((args.window + 20) * 1000)),
            "-nostdin", "-trace_logs", "-log_file", str(calls_log),
        ]
        faults: dict[str, Fault] = {}
        fault_at = {name: share * args.seconds for name, share in
                    (("sandbox-misbehaves", 0.15), ("redis-restart", 0.25), ("dispatcher-kill", 0.45),
                     ("sandbox-restart", 0.60), ("kamailio-restart", 0.80))}
        # the sandbox's bad spell: the calls placed in it get 503 twice, slow answers or a dead token
        spell = (fault_at["sandbox-misbehaves"], fault_at["sandbox-misbehaves"] + 6)
        for i, p in enumerate(phones):
            if spell[0] <= i / args.rate < spell[1] and p.role == "wakes":
                if i % 3 == 0:
                    p.role = "503"
                    sandbox.control.set_behaviour(p.token, 503, "ServiceUnavailable", retry_after=0.5, times=2)
                elif i % 3 == 1:
                    p.role = "slow"
                    sandbox.control.set_behaviour(p.token, 200, delay=1.5)
        for p in phones:  # (APNs says 410 Unregistered, FCM 404 UNREGISTERED)
            if p.role == "dead" and p.provider == "apns":
                sandbox.control.set_behaviour(p.token, 410, "Unregistered")
            elif p.role == "dead":
                sandbox.control.set_behaviour(p.token, 404, "UNREGISTERED")
        faults["sandbox-misbehaves"] = Fault("sandbox-misbehaves", *spell)

        with open(tmp / "sipp-stderr.log", "wb") as err:
            caller = subprocess.Popen(sipp_argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, start_new_session=True)
        es.callback(stop_process, caller)
        t0 = time.monotonic()

        def at(name: str) -> float:
            delay = fault_at[name] - (time.monotonic() - t0)
            if delay > 0:
                time.sleep(delay)
            print(f"  {time.monotonic() - t0:6.1f}s  {name}", flush=True)
            return time.monotonic() - t0

        start = at("redis-restart")
        rds = redis.Redis(host="127.0.0.1", port=srv.port)
        with suppress(redis.ConnectionError):
            rds.shutdown(save=True)
        rds.close()
        srv.proc.wait(10)
        time.sleep(1.0)
        srv.start_again()
        faults["redis-restart"] = Fault("redis-restart", start, time.monotonic() - t0)

        start = at("dispatcher-kill")
        pending = 0
        with suppress(redis.RedisError):
            rds = redis.Redis(host="127.0.0.1", port=srv.port, decode_responses=True)
            pending = sum(int(c["pending"]) for c in rds.xinfo_consumers(settings.stream, settings.group))
            rds.close()
        dispatcher.kill()
        res.killed_dispatcher_pending = pending
        time.sleep(1.0)
        dispatcher.start()
        faults["dispatcher-kill"] = Fault("dispatcher-kill", start, time.monotonic() - t0, {"pending": pending})

        start = at("sandbox-restart")
        with watcher.paused():
            sandbox.restart()
            for app in apps:
                sandbox.control.register_app(app)
        faults["sandbox-restart"] = Fault("sandbox-restart", start, time.monotonic() - t0)

        start = at("kamailio-restart")
        k.restart()
        faults["kamailio-restart"] = Fault("kamailio-restart", start, time.monotonic() - t0)

        caller.wait(args.seconds + args.window + 60)
        time.sleep(2)  # the last cancel/missed pushes
        watcher.stop()
        res.phones_woken = len(watcher.woken)
        res.register_failures = watcher.register_failures
        res.faults = [asdict(f) for f in faults.values()]
        sent, final = read_calls(calls_log)
        outcomes = audit(res, sent, final, by_token, faults, args.window)
        push_audit(res, watcher.pushes, by_token)
        (tmp / "outcomes.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))


def scan_logs(k: KamailioProc, res: Result) -> None:
    res.log_findings = [ln.strip()[:300] for ln in k.log().splitlines() if _BAD_LINE.search(ln)][:20]


def print_report(r: Result) -> None:
    print(f"\nchaos run: {r.calls} calls at {r.rate}/s over {r.seconds:.0f} s, window {r.window_s} s, "
          f"{r.elapsed_s:.0f} s in all")
    for f in r.faults:
        print(f"  fault {f['name']:<20} {f['start']:6.1f} s .. {f['end']:6.1f} s {f['detail'] or ''}")
    print(f"  verdicts: {r.verdicts}")
    print(f"  final codes: {r.codes}")
    print(f"  phones woken {r.phones_woken}, wake REGISTERs that failed {r.register_failures}")
    print(f"  pushes {r.pushes}, late incomingCall pushes {len(r.late_pushes)}, duplicates {r.duplicate_pushes} "
          f"(jobs pending in the killed dispatcher: {r.killed_dispatcher_pending}) {r.duplicates}")
    print(f"  Kamailio starts {r.kamailio_starts}, CRITICAL/BUG/crash lines {len(r.log_findings)}")
    for v in r.violations[:10]:
        print(f"  VIOLATION {v}")
    for ln in r.log_findings[:5]:
        print(f"  LOG {ln}")
    if r.error:
        print(f"  ERROR {r.error}")
    print("  audit: " + ("PASS" if r.ok else "FAIL"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long calls are placed (default 120)")
    ap.add_argument("--rate", type=int, default=4, help="calls per second (default 4)")
    ap.add_argument("--window", type=int, default=10, help="WAIT_WINDOW in seconds (default 10)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/chaos-<timestamp>.json)")
    ap.add_argument("--quick", action="store_true", help="the short run: --seconds 40")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs, outcomes.json)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 40.0
    started = datetime.datetime.now(datetime.UTC)
    res = Result(args.seconds, args.rate, args.window)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    t = time.monotonic()
    try:
        run(args, tmp, res)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    finally:
        res.elapsed_s = round(time.monotonic() - t, 1)
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_report(res)
    out = args.out or ROOT / "bench" / "results" / f"chaos-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(res), "ok": res.ok}, indent=1) + "\n")
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":
    main()
