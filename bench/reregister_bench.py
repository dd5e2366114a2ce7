"""The cost of the re-registration scan (`pushlib.reregister`) with 100,000 push devices.

A real redis-server (its own, on loopback) holds the due set of --devices devices whose refresh
pushes fall due evenly over one registration period (--expires, default 3600 s, minus the lead
--before, 300 s): the steady state of devices that answer their refresh pushes. --dispatchers
dispatchers (`reregister.Claimer`, the code `Dispatcher._reregister` runs) then scan for one
simulated minute: a virtual clock advances by SCAN_SECONDS per tick and each dispatcher claims what
is due, as every tick does (one script call per CLAIM_BATCH due devices, one for "nothing more").
Each claimed device answers with a REGISTER, whose ZADD (the SIP side's share) puts it back one
period later. The clock is virtual so a minute of scanning takes seconds; the Redis work is real.

Measured with Redis's own counters (CONFIG RESETSTAT, then INFO commandstats): commands per
minute (round trips: EVALSHA/ZADD; and every command run, script-internal ZRANGEBYSCORE/ZREM
included), devices claimed per minute, claim-call latency (p50/p99), and the due set's memory. No
command that walks the keyspace (SCAN/KEYS) is ever issued; the bench asserts it. The pushes
themselves (one provider request per claimed device) are the dispatcher's usual cost, not counted.

Usage:
    .venv/bin/python bench/reregister_bench.py --quick   # 10,000 devices (~5 s)
    .venv/bin/python bench/reregister_bench.py           # 100,000 devices (~20 s)
Results: printed, and written to bench/results/reregister-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.localrun import redis_server  # noqa: E402
from pushlib import reregister  # noqa: E402
from pushlib.redisconn import async_client, sync_client  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def populate(url: str, devices: int, start: float, period: float) -> None:
    client = sync_client(url, timeout=30)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(devices):
            # due times spread evenly over one period; the AOR/device ids are the size real ones have
            member = reregister.member(f"sip:user{i:06d}@voip.example.com", f"fcm-{i:08d}-0123456789abcdef")
            pipe.zadd(reregister.DUE_KEY, {member: start + period * i / devices})
            if len(pipe) >= 5000:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()


def commandstats(client: Any) -> dict[str, int]:
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


async def simulate_minute(url: str, dispatchers: int, start: float, period: float, seconds: int
                          ) -> tuple[int, list[float]]:
    """Every dispatcher ticks `seconds` times; returns (devices claimed, claim latencies in ms)."""
    clients = [async_client(url) for _ in range(dispatchers)]
    sip = async_client(url)  # the SIP workers' re-REGISTER ZADDs
    claimers = [reregister.Claimer(c) for c in clients]
    latencies: list[float] = []
    claimed = 0

    async def tick(claimer: reregister.Claimer, now: float) -> int:
        got_total = 0
        for _ in range(reregister.CLAIM_MAX_BATCHES):
            t0 = time.perf_counter()
            got = await claimer.claim(now)
            latencies.append((time.perf_counter() - t0) * 1000)
            got_total += len(got)
            if got:  # each woken app re-REGISTERs: one ZADD per device, due one period later
                pipe = sip.pipeline(transaction=False)
                for aor, device_id, _due in got:
                    pipe.zadd(reregister.DUE_KEY, {reregister.member(aor, device_id): now + period})
                await pipe.execute()
            if len(got) < reregister.CLAIM_BATCH:
                break
        return got_total

    try:
        for second in range(seconds):
            now = start + second * reregister.SCAN_SECONDS
            claimed += sum(await asyncio.gather(*(tick(c, now) for c in claimers)))
    finally:
        for c in (*clients, sip):
            await c.aclose()
    return claimed, latencies


def run(devices: int, dispatchers: int, expires: float, before: float) -> dict[str, Any]:
    period = expires - reregister.lead(before, expires)  # a device answering its push re-registers this often
    start = time.time()
    with redis_server() as srv:
        t0 = time.perf_counter()
        populate(srv.url, devices, start, period)
        populate_s = time.perf_counter() - t0
        client = sync_client(srv.url, timeout=30)
        try:
            memory = int(client.memory_usage(reregister.DUE_KEY) or 0)
            # the idle cost first: a minute in which nothing is due
            client.config_resetstat()
            asyncio.run(simulate_minute(srv.url, dispatchers, start - 3600, period, 60))
            idle = commandstats(client)
            client.config_resetstat()
            t0 = time.perf_counter()
            claimed, latencies = asyncio.run(simulate_minute(srv.url, dispatchers, start, period, 60))
            wall = time.perf_counter() - t0
            busy = commandstats(client)
            left = int(client.zcard(reregister.DUE_KEY))
        finally:
            client.close()
    assert not {"scan", "keys"} & (set(idle) | set(busy)), "a keyspace walk was issued"
    script_calls = busy.get("evalsha", 0) + busy.get("eval", 0)
    latencies.sort()
    return {
        "devices": devices,
        "dispatchers": dispatchers,
        "expires_s": expires,
        "before_s": before,
        "scan_interval_s": reregister.SCAN_SECONDS,
        "claim_batch": reregister.CLAIM_BATCH,
        "due_per_minute_expected": round(devices * 60 / period),
        "claimed_per_minute": claimed,
        "due_set_left": left,
        "idle_commands_per_minute": sum(idle.values()),
        "scan_round_trips_per_minute": script_calls,
        "scan_commands_per_minute": script_calls + busy.get("zrangebyscore", 0) + busy.get("zrem", 0),
        "sip_zadd_per_minute": busy.get("zadd", 0),
        "all_commands_per_minute": sum(busy.values()),
        "commandstats": busy,
        "claim_ms_p50": round(statistics.median(latencies), 3),
        "claim_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "claim_ms_max": round(latencies[-1], 3),
        "due_set_bytes": memory,
        "bytes_per_device": round(memory / devices, 1),
        "populate_s": round(populate_s, 2),
        "simulated_minute_wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 devices")
    parser.add_argument("--devices", type=int, default=None, help="default 100,000 (10,000 with --quick)")
    parser.add_argument("--dispatchers", type=int, default=2)
    parser.add_argument("--expires", type=float, default=3600.0, help="registration lifetime, s")
    parser.add_argument("--before", type=float, default=300.0, help="REREGISTER_PUSH_BEFORE, s")
    args = parser.parse_args(argv)
    devices = args.devices or (10_000 if args.quick else 100_000)
    result = run(devices, args.dispatchers, args.expires, args.before)
    print(f"re-registration scan: {result['devices']:,} push devices, {result['dispatchers']} dispatchers, "
          f"expires {result['expires_s']:.0f} s, push {result['before_s']:.0f} s before, "
          f"scan every {result['scan_interval_s']:.0f} s")
    print(f"  due per minute: {result['claimed_per_minute']:,} claimed "
          f"(expected {result['due_per_minute_expected']:,}); due set left {result['due_set_left']:,}")
    print(f"  idle (nothing due): {result['idle_commands_per_minute']} Redis commands per minute")
    print(f"  scan: {result['scan_round_trips_per_minute']:,} round trips, {result['scan_commands_per_minute']:,} "
          f"commands per minute (script-internal ZRANGEBYSCORE/ZREM included); "
          f"+ SIP side {result['sip_zadd_per_minute']:,} ZADD (one per re-REGISTER)")
    print(f"  claim call: p50 {result['claim_ms_p50']} ms, p99 {result['claim_ms_p99']} ms, "
          f"max {result['claim_ms_max']} ms")
    print(f"  due set: {result['due_set_bytes'] / 1e6:.1f} MB ({result['bytes_per_device']} bytes per device); "
          f"no SCAN/KEYS issued")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"reregister-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
