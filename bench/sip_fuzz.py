"""SIP fuzz run against the real proxy: generated and mutated requests over UDP and TCP.

Starts its own stack (`harness.localstack.push_stack()`: redis-server + sandbox providers +
Kamailio in KEMI mode, auth on), makes one legitimate call (a device registers with RFC 8599
params and a SIPp caller calls it), then sends `--requests` requests of `harness.sipfuzz`
(seeded: `--seed`) split evenly across the transports, paced at `--rate` requests/s per transport
and bounded by `--time-limit` seconds of fuzzing in all. A subscriber "fuzz" exists so that a share
of the REGISTERs and INVITEs authenticate and reach the routing behind digest auth.

Checks afterwards (exit 1 when one fails):
- kamailio alive: its process has not exited and a keepalive OPTIONS is answered (UDP and TCP);
- log clean: no CRITICAL / BUG / ALERT line in Kamailio's log;
- router clean: no `route-error` line, Python traceback or app_python3 error in that log (the
  router answered 500 to a request it did not expect); the requests named there are rebuilt from
  (seed, transport, index) and saved in the results as repro bytes;
- legitimate calls after the fuzz complete (UDP and TCP);
- the fuzzer exercised the proxy: requests sent and replies received on every transport.

Usage:
    .venv/bin/python bench/sip_fuzz.py [--requests 100000] [--seed 1] [--transport udp,tcp]
        [--rate 1000] [--time-limit 540] [--out bench/results/sip_fuzz.json]

The time limit bounds the fuzzing; start-up, the calls and the checks add about 15 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.localstack import Stack, push_stack  # noqa: E402
from harness.sipfuzz import (  # noqa: E402
    CallResult,
    Credentials,
    FuzzStats,
    LogReport,
    SipFuzzer,
    Target,
    legit_call,
    options_ping,
    run,
    scan_log,
    split_counts,
)

HOST = "127.0.0.1"
FUZZ_USER = "fuzz"
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "other")


def _shown(path: Path) -> str:
    """`path` relative to the checkout when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _progress(stats: FuzzStats) -> None:
    print(f"  {stats.transport}: {stats.sent}/{stats.requested} sent, {stats.total_replies} replies, "
          f"{stats.elapsed:.0f} s", flush=True)


def repro(log: LogReport, stack: Stack, credentials: Credentials, per_kind: int = 2,
          limit: int = 20) -> list[dict[str, Any]]:
    """The requests the log's severe and Python lines name (the first `per_kind` of each kind),
    rebuilt from (seed, transport, index). The Via port and the digest nonce differ from the
    run's (they are per run), nothing else does."""
    out: list[dict[str, Any]] = []
    for kind, suspects in log.suspects.items():
        for seed, transport, index in suspects[:per_kind]:
            target = Target(HOST, stack.kamailio.port, transport, 0)
            nonce = 'Digest realm="127.0.0.1", nonce="(per run)"'
            gen = SipFuzzer(seed, target, credentials, nonce).message(index)
            out.append({"log": kind, "seed": seed, "transport": transport, "index": index, "kind": gen.kind,
                        "mutations": list(gen.mutations), "bytes": gen.data.decode("latin-1")})
    return out[:limit]


def fuzz(stack: Stack, args: argparse.Namespace, transports: list[str]) -> list[FuzzStats]:
    password = stack.add_user(FUZZ_USER)
    credentials = Credentials(FUZZ_USER, password) if not args.no_auth_share else None
    counts = split_counts(args.requests, transports)
    start = time.monotonic()
    results: list[FuzzStats] = []
    done = 0
    for transport in transports:
        done += counts[transport]
        # each transport gets the share of the time limit its share of the requests deserves
        deadline = start + args.time_limit * done / max(1, args.requests)
        print(f"fuzzing {transport}: {counts[transport]} requests, seed {args.seed}, rate {args.rate}/s", flush=True)
        stats = run(HOST, stack.kamailio.port, transport, counts[transport], args.seed, args.rate, deadline,
                    credentials=credentials, progress=_progress, progress_every=15.0)
        results.append(stats)
    return results


def summary(stats: list[FuzzStats], calls: dict[str, CallResult], log: LogReport,
            checks: dict[str, bool], pings: dict[str, int | None]) -> str:
    lines = ["", "SIP fuzz run", ""]
    lines.append(f"{'transport':<10}{'sent':>9}{'time s':>9}{'req/s':>8}  " + "".join(f"{c:>7}" for c in CLASSES)
                 + f"{'none?':>8}{'tcp re':>8}")
    for s in stats:
        cells = "".join(f"{s.replies.get(c, 0):>7}" for c in CLASSES)
        lines.append(f"{s.transport:<10}{s.sent:>9}{s.elapsed:>9.1f}{s.rate:>8.0f}  {cells}"
                     f"{s.sent - s.total_replies:>8}{s.tcp_reconnects:>8}")
    total = sum(s.sent for s in stats)
    lines.append(f"{'total':<10}{total:>9}{sum(s.elapsed for s in stats):>9.1f}")
    lines.append("")
    lines.append("none? = requests without a reply (unparsable, dropped by sanity checks, ACKs, lost with a TCP "
                 "connection the proxy closed, or relayed);")
    lines.append("tcp re = TCP reconnects after the proxy closed a connection")
    lines.append("")
    lines.append(f"kamailio log: {log.lines} lines, {log.error_lines} ERROR lines, "
                 f"{len(log.severe)} CRITICAL/BUG/ALERT, {len(log.python_errors)} router Python errors")
    lines.append("OPTIONS after: " + ", ".join(f"{t} {pings[t]}" for t in pings))
    for name, call in calls.items():
        lines.append(f"legitimate call {name}: {'completed' if call.ok else 'FAILED'} "
                     f"(finals {call.caller_finals}, {call.elapsed:.1f} s)")
    lines.append("")
    for name, ok in checks.items():
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for kind, count in sorted(log.kinds.items(), key=lambda kc: -kc[1]):
        first = log.suspects.get(kind, [])[:3]
        named = ", ".join(f"{t} #{i}" for _, t, i in first)
        lines.append(f"  log x{count}: {kind[:160]}" + (f"  (e.g. requests {named})" if named else ""))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--transport", default="udp,tcp", help="comma-separated: udp, tcp")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s per transport (0: unpaced)")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds of fuzzing at most")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sip_fuzz.json")
    ap.add_argument("--no-auth-share", action="store_true",
                    help="send no authenticated requests (only what an outsider can reach)")
    args = ap.parse_args()
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    if not transports or any(t not in ("udp", "tcp") for t in transports):
        ap.error("--transport takes udp, tcp or udp,tcp")

    began = time.time()
    with push_stack() as stack:
        print(f"stack up: kamailio on {HOST}:{stack.kamailio.port}", flush=True)
        calls: dict[str, CallResult] = {"before (udp)": legit_call(stack, "udp")}
        stats: list[FuzzStats] = []
        if calls["before (udp)"].ok:
            stats = fuzz(stack, args, transports)
        else:
            print("the legitimate call before the fuzz failed: the stack is broken, not fuzzing", flush=True)
        exited = stack.kamailio.proc.poll() if stack.kamailio.proc else -1
        pings = {t: options_ping(HOST, stack.kamailio.port, t) for t in ("udp", "tcp")}
        if exited is None:
            calls["after (udp)"] = legit_call(stack, "udp")
            calls["after (tcp)"] = legit_call(stack, "tcp")
        log = scan_log(stack.kamailio.log())
        repros = repro(log, stack, Credentials(FUZZ_USER, stack.passwords.get(FUZZ_USER, "")))
        tmpdir = str(stack.tmpdir)

    checks = {
        "legitimate call before the fuzz completes": calls["before (udp)"].ok,
        "fuzzer sent every request on every transport": bool(stats) and all(s.sent == s.requested for s in stats),
        "the proxy answered the fuzzer on every transport": bool(stats) and all(s.total_replies > 0 for s in stats),
        "kamailio alive (process running, OPTIONS answered on udp and tcp)":
            exited is None and all(code == 200 for code in pings.values()),
        "no CRITICAL/BUG/ALERT line in the kamailio log": not log.severe,
        "no route-error / Python traceback in the kamailio log": not log.python_errors,
        "legitimate calls after the fuzz complete": all(c.ok for k, c in calls.items() if k.startswith("after"))
            and len(calls) == 3,
    }
    print(summary(stats, calls, log, checks, pings))
    result = {
        "started": began,
        "args": {k: _shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "system": platform.platform()},
        "transports": [s.to_dict() for s in stats],
        "total_sent": sum(s.sent for s in stats),
        "fuzz_seconds": round(sum(s.elapsed for s in stats), 1),
        "calls": {k: c.to_dict() for k, c in calls.items()},
        "options_after": pings,
        "kamailio_exit_code": exited,
        "log": log.to_dict(),
        "repro": repros,
        "checks": checks,
        "ok": all(checks.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # no path of this machine in the file: the checkout becomes ".", the stack's temp dir "<stack-tmp>"
    text = json.dumps(result, indent=2).replace(tmpdir, "<stack-tmp>").replace(str(ROOT), ".")
    args.out.write_text(text + "\n")
    print(f"\nresults: {_shown(args.out)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
