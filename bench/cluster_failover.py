"""What a Redis Cluster master failover costs the SIP workers' calls: the failure window, measured.

A private cluster on loopback (`harness.rediscluster`: 3 masters + 3 replicas,
cluster-node-timeout --node-timeout-ms, 1000 by default). One thread plays a SIP worker: through
`redisconn.sync_client` (the `redis+cluster://` URL, 0.5 s timeouts, as Kamailio's workers) it
parks and finishes calls (`ParkedCalls.park` + `finish`: two scripts, two round trips) of users
whose keys live on one master, back to back (a 1 ms pause between calls), and logs each call's
start, end and outcome. Once it runs, that master goes away, in two ways, each --rounds times:

- `graceful`: `CLUSTER FAILOVER` on its replica (the master pauses writes, the replica catches up
  and takes over; what an operator does for maintenance);
- `kill`: SIGKILL of the master (its replica is promoted once the others agree it failed: about
  cluster-node-timeout plus an election); the killed node is started again afterwards, as a
  replica, before the next round.

Per round: the failure window (start of the first failed call -> end of the first successful call
after the last failure; 0 when no call failed), the calls failed, the calls run, the slowest call
(a call that waits without failing, e.g. during the graceful switch, shows here), and how long
the replica took to be a master of a healthy cluster after the trigger. Rounds are 2x the node
timeout apart (a failover of the same shard sooner waits for that: masters vote for a replica of
one master once per 2x node timeout). Printed, and saved as JSON (--out, default
bench/results/cluster_failover-<timestamp>.json).

Usage:
    .venv/bin/python bench/cluster_failover.py                  # 3 rounds of each, ~1 min
    .venv/bin/python bench/cluster_failover.py --rounds 1 --out /tmp/f.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redis.crc import key_slot  # noqa: E402

from harness.rediscluster import RedisCluster, redis_cluster  # noqa: E402
from pushlib import schema  # noqa: E402
from pushlib.models import ParkedCall  # noqa: E402
from pushlib.parked import ParkedCalls  # noqa: E402
from pushlib.redisconn import StoreUnavailable, sync_client  # noqa: E402

AOR = "sip:failover@example.com"
#: calls after the failover has completed (and the window closed) before a round ends
CALLS_AFTER = 200
#: a round gives up this long after its trigger (the window never closed: reported as such)
ROUND_LIMIT = 20.0


@dataclass
class Round:
    mode: str
    window_s: float | None  # None: calls still failing at ROUND_LIMIT
    calls_failed: int
    calls: int
    slowest_call_s: float
    promoted_after_s: float


class Caller(threading.Thread):
    """Parks and finishes calls in a loop until told to stop; logs (start, end, ok) per call."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = sync_client(url)
        self.parked = ParkedCalls(self.client)
        self.log: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            key = uuid.uuid4().hex[:10]
            try:
                now = time.time()
                self.parked.park(ParkedCall(AOR, key, "cid", "1", "A", "1", now + 30, ("d1",)), now)
                ok = self.parked.finish(AOR, key) is not None
            except StoreUnavailable:
                ok = False
            self.log.append((start, time.monotonic(), ok))
            time.sleep(0.001)


def window(log: list[tuple[float, float, bool]]) -> float | None:
    """First failed call's start -> end of the first good call after the last failure."""
    failed = [i for i, (_, _, ok) in enumerate(log) if not ok]
    if not failed:
        return 0.0
    after = [end for start, end, ok in log[failed[-1] + 1:] if ok]
    return after[0] - log[failed[0]][0] if after else None


def one_round(cluster: RedisCluster, mode: str) -> Round:
    slot = int(key_slot(schema.call_key(AOR, "").encode()))
    master = cluster.master_of_slot(slot)
    replica = cluster.replica_of(master)
    caller = Caller(cluster.url)
    caller.start()
    try:
        deadline = time.monotonic() + 5
        while len(caller.log) < 100 and time.monotonic() < deadline:  # steady state first
            time.sleep(0.01)
        first = len(caller.log)
        trigger = time.monotonic()
        if mode == "graceful":
            cluster.failover(replica, timeout=ROUND_LIMIT)
        else:
            cluster.kill(master)
            cluster.wait_promoted(replica, timeout=ROUND_LIMIT)
        promoted = time.monotonic() - trigger
        end = trigger + ROUND_LIMIT
        while time.monotonic() < end:  # until the calls have worked again for a while
            tail = caller.log[first:]
            last_fail = max((i for i, (_, _, ok) in enumerate(tail) if not ok), default=-1)
            if len(tail) - last_fail - 1 >= CALLS_AFTER:
                break
            time.sleep(0.02)
    finally:
        caller.stop.set()
        caller.join(5)
        caller.client.close()
    log = caller.log[first:]
    result = Round(mode, window(log), sum(1 for _, _, ok in log if not ok), len(log),
                   max(end - start for start, end, _ in log), promoted)
    if mode == "kill":
        cluster.restart(master)  # back as a replica, for the next round
    else:
        cluster.wait_healthy()
    return result


def summary(rounds: list[Round], mode: str) -> dict[str, Any]:
    mine = [r for r in rounds if r.mode == mode]
    windows = [r.window_s for r in mine if r.window_s is not None]
    return {
        "rounds": len(mine),
        "window_s_median": round(statistics.median(windows), 3) if windows else None,
        "window_s_max": round(max(windows), 3) if windows else None,
        "never_recovered": sum(1 for r in mine if r.window_s is None),
        "calls_failed_median": statistics.median(r.calls_failed for r in mine) if mine else None,
        "slowest_call_s_max": round(max(r.slowest_call_s for r in mine), 3) if mine else None,
        "promoted_after_s_median": round(statistics.median(r.promoted_after_s for r in mine), 3) if mine else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode (default 3)")
    parser.add_argument("--node-timeout-ms", type=int, default=1000, help="cluster-node-timeout (default 1000)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/cluster_failover-<timestamp>.json)")
    args = parser.parse_args(argv)
    rounds: list[Round] = []
    with redis_cluster(node_timeout_ms=args.node_timeout_ms) as cluster:
        for mode in ("graceful", "kill"):
            for i in range(args.rounds):
                # Masters refuse to vote for a replica of the same master twice within 2x the
                # node timeout: a round right after the previous one would measure that wait.
                time.sleep(2 * args.node_timeout_ms / 1000)
                r = one_round(cluster, mode)
                rounds.append(r)
                shown = "never closed" if r.window_s is None else f"{r.window_s:.3f} s"
                print(f"{mode:8} round {i + 1}: window {shown}, {r.calls_failed}/{r.calls} calls failed, "
                      f"slowest call {r.slowest_call_s:.3f} s, replica master after {r.promoted_after_s:.3f} s",
                      flush=True)
    result = {
        "what": "park+finish calls (sync client, 0.5 s timeouts) of users on one master while it fails over",
        "node_timeout_ms": args.node_timeout_ms,
        "summary": {mode: summary(rounds, mode) for mode in ("graceful", "kill")},
        "rounds": [asdict(r) for r in rounds],
    }
    for mode, s in result["summary"].items():
        print(f"{mode}: window median {s['window_s_median']} s (max {s['window_s_max']} s), "
              f"failed calls median {s['calls_failed_median']}, slowest call {s['slowest_call_s_max']} s")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "bench" / "results" / f"cluster_failover-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


__all__ = ["Round", "main", "one_round", "window"]

if __name__ == "__main__":
    sys.exit(main())
