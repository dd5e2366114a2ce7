"""Push-sending benchmark: pushes/s and latency through ONE HTTP/2 connection.

Clients compared (all on loopback, TLS + HTTP/2):
  ours-sandbox   ProviderPool.send -> ApnsClient -> H2Transport -> the pushlib sandbox
  ours-nginx     ProviderPool.send -> ApnsClient -> H2Transport -> nginx answering 200
  aioapns-nginx  aioapns (max_connections=1) -> the same nginx
  httpx-nginx    plain httpx.AsyncClient(http2=True) -> the same nginx (reference)

For each: unloaded latency (sequential requests) and throughput at a given concurrency.
Prints a table and writes JSON to bench/results/push_bench-<timestamp>.json.

    .venv/bin/python bench/push_bench.py [-n 10000] [-c 100] [--seq 500] [--only ours-nginx,...]

The nginx endpoint comes from `harness.nginx`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `pushlib` importable
    sys.path.insert(0, str(ROOT))

from harness.nginx import Nginx, nginx_h2  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Load generator
# ---------------------------------------------------------------------------------------------

TOKEN = "a1" * 32
TOPIC = "com.example.bench"
PAYLOAD = {"aps": {"alert": {"title": "Incoming call", "body": "Alice"}}, "call_id": "bench-call-1"}

Send = Callable[[int], Awaitable[bool]]  # request number -> success


@dataclass
class Measurement:
    name: str
    seq_n: int = 0
    seq_p50_ms: float = 0.0
    seq_p99_ms: float = 0.0
    n: int = 0
    concurrency: int = 0
    pushes_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    note: str = ""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def _measure(name: str, send: Send, seq: int, n: int, concurrency: int, limit_s: float) -> Measurement:
    m = Measurement(name, n=0, concurrency=concurrency)
    for i in range(20):  # warm up: connect, JWT, HPACK tables
        await send(2_000_000 + i)
    latencies: list[float] = []
    deadline = time.monotonic() + limit_s
    for i in range(seq):
        t0 = time.perf_counter()
        ok = await send(i)
        latencies.append(time.perf_counter() - t0)
        m.errors += not ok
        if time.monotonic() > deadline:
            break
    m.seq_n = len(latencies)
    m.seq_p50_ms, m.seq_p99_ms = _pct(latencies, 0.5), _pct(latencies, 0.99)

    loaded: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            ok = await send(1_000_000 + i)
            loaded.append(time.perf_counter() - t0)
            m.errors += not ok

    deadline = time.monotonic() + limit_s
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    m.n = len(loaded)
    m.pushes_per_s = m.n / elapsed if elapsed > 0 else 0.0
    m.p50_ms, m.p99_ms = _pct(loaded, 0.5), _pct(loaded, 0.99)
    return m


def _token(i: int) -> str:
    """A distinct device token per request: real traffic rarely repeats a token, so no client
    may profit from HPACK-indexing the :path."""
    return f"{i:064x}"


def _apns_request(i: int) -> Any:
    from pushlib.models import ApnsRequest

    return ApnsRequest(
        token=_token(i),
        headers={
            "apns-topic": TOPIC,
            "apns-push-type": "alert",
            "apns-priority": "10",
            "apns-expiration": "0",
            "apns-id": str(uuid.uuid4()),
        },
        payload=json.dumps(PAYLOAD).encode(),
    )


def _ec_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


async def bench_pool(name: str, app: Any, seq: int, n: int, concurrency: int, limit_s: float) -> Measurement:
    """ProviderPool.send, the dispatcher's path, for one app (= one connection)."""
    from pushlib.models import Device, Outcome, PushParams
    from pushlib.providers import ProviderPool

    device = Device("sip:bench@example.com", "bench", PushParams(app.provider, app.app_id, alert_token=TOKEN))
    pool = ProviderPool()

    async def send(i: int) -> bool:
        result = await pool.send(app, device, _apns_request(i), 10.0)
        return result.outcome is Outcome.DELIVERED

    try:
        return await _measure(name, send, seq, n, concurrency, limit_s)
    finally:
        await pool.aclose()


def _nginx_app(nginx: Nginx) -> Any:
    from pushlib.models import AppCredentials, Provider

    return AppCredentials(
        Provider.APNS, TOPIC, apns_key_pem=_ec_key_pem(), apns_key_id="KEY0000001",
        apns_team_id="TEAM000001", custom_host=f"127.0.0.1:{nginx.port}", ca_pem=nginx.ca_pem,
    )


async def bench_aioapns(nginx: Nginx, seq: int, n: int, concurrency: int, limit_s: float) -> Measurement:
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsProductionClientProtocol

    class LocalProtocol(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = nginx.port

    ctx = ssl.create_default_context(cadata=nginx.ca_pem)
    ctx.set_alpn_protocols(["h2"])
    client = APNs(
        key=_ec_key_pem(), key_id="KEY0000001", team_id="TEAM000001", topic=TOPIC,
        max_connections=1, ssl_context=ctx,
    )
    client.pool.protocol_class = LocalProtocol

    async def send(i: int) -> bool:
        request = NotificationRequest(
            device_token=_token(i), message=PAYLOAD, priority=10, push_type=PushType.ALERT, time_to_live=0
        )
        result = await client.send_notification(request)
        return bool(result.is_successful)

    try:
        return await _measure("aioapns-nginx", send, seq, n, concurrency, limit_s)
    finally:
        client.pool.close()


async def bench_httpx(nginx: Nginx, seq: int, n: int, concurrency: int, limit_s: float) -> Measurement:
    import httpx

    ctx = ssl.create_default_context(cadata=nginx.ca_pem)
    client = httpx.AsyncClient(
        http2=True, verify=ctx, limits=httpx.Limits(max_connections=1),
        base_url=f"https://127.0.0.1:{nginx.port}",
    )
    body = json.dumps(PAYLOAD).encode()

    async def send(i: int) -> bool:
        headers = {"apns-topic": TOPIC, "apns-push-type": "alert", "apns-id": str(uuid.uuid4())}
        response = await client.post(f"/3/device/{_token(i)}", headers=headers, content=body)
        return response.status_code == 200

    try:
        m = await _measure("httpx-nginx", send, seq, n, concurrency, limit_s)
        m.note = "httpx http2=True, max_connections=1"
        return m
    finally:
        await client.aclose()


async def bench_sandbox(seq: int, n: int, concurrency: int, limit_s: float) -> Measurement:
    try:
        from pushsandbox.process import sandbox_process
    except ImportError as exc:
        return Measurement("ours-sandbox", note=f"not run: {exc}")
    with sandbox_process() as handle:
        app = handle.control.apns_token_app(TOPIC)
        m = await bench_pool("ours-sandbox", app, seq, n, concurrency, limit_s)
        m.note = "ProviderPool -> sandbox (records every push)"
        return m


# ---------------------------------------------------------------------------------------------
# Dispatcher: Redis stream -> Dispatcher -> ProviderPool (one connection)
# ---------------------------------------------------------------------------------------------

MESSAGE_DATA = {"message": "hi there", "sender": "Bob", "title": "Hello", "body": "A message"}


@dataclass
class DispatchMeasurement:
    name: str
    n: int = 0
    pushes_per_s: float = 0.0  # burst: jobs delivered / (last delivery - first enqueue)
    p50_ms: float = 0.0  # burst: enqueue (job created_at) -> provider's 200
    p99_ms: float = 0.0
    paced_n: int = 0
    paced_rate: float = 0.0
    paced_p50_ms: float = 0.0  # paced (unloaded): enqueue -> provider's 200
    paced_p99_ms: float = 0.0
    errors: int = 0
    note: str = ""


async def bench_dispatcher(
    name: str, app: Any, n: int, concurrency: int, paced_n: int, paced_rate: float, limit_s: float
) -> DispatchMeasurement:
    """Jobs XADDed to a private redis-server, consumed by one Dispatcher in this process whose
    ProviderPool (one HTTP/2 connection) is timed around `send`: latency = provider's answer
    minus the job's created_at, i.e. queueing + Redis reads + payload + push."""
    import redis.asyncio as aredis

    from harness.localrun import redis_server
    from pushlib import schema
    from pushlib.dispatcher import Dispatcher
    from pushlib.models import (
        ApnsRequest,
        AppCredentials,
        Device,
        FcmMessage,
        Outcome,
        PushJob,
        PushKind,
        PushParams,
        PushResult,
    )
    from pushlib.providers import ProviderPool
    from pushlib.settings import Settings
    from pushlib.store import SyncStore

    created: dict[str, float] = {}  # aor -> created_at of its (single) job
    latencies: list[float] = []
    done_at: list[float] = []
    m = DispatchMeasurement(name)
    expected = 0
    all_done = asyncio.Event()

    class TimedPool(ProviderPool):
        async def send(
            self, app: AppCredentials, device: Device, request: ApnsRequest | FcmMessage, timeout: float
        ) -> PushResult:
            result = await super().send(app, device, request, timeout)
            now = time.time()
            start = created.pop(device.aor, None)
            if start is not None:
                latencies.append(now - start)
                done_at.append(now)
                m.errors += result.outcome is not Outcome.DELIVERED
                if len(latencies) >= expected:
                    all_done.set()
            return result

    with redis_server() as server:
        settings = Settings(redis_url=server.url, concurrency=concurrency)
        raw: Any = aredis.Redis.from_url(server.url, decode_responses=True)
        store = SyncStore(server.url, settings)  # setup, before the loop runs anything
        store.save_app(app)
        store.close()

        async def add_devices(prefix: str, count: int, first_token: int) -> list[str]:
            # Written directly (pipelined) instead of save_device: setup, not what we measure.
            now = time.time()
            aors = [f"sip:{prefix}-{i}@bench.example" for i in range(count)]
            pipe = raw.pipeline(transaction=False)
            for i, aor in enumerate(aors):
                params = PushParams(app.provider, app.app_id, alert_token=_token(first_token + i))
                device = Device(aor, "d1", params, registered_at=now, expires_at=now + 3600)
                pipe.hset(schema.device_key(aor, "d1"), mapping=schema.encode_device(device))
                pipe.expire(schema.device_key(aor, "d1"), 3600)
                pipe.sadd(schema.devices_key(aor), "d1")
            await pipe.execute()
            return aors

        def job(aor: str) -> dict[str, str]:
            now = time.time()
            created[aor] = now
            return schema.encode_job(PushJob(uuid.uuid4().hex, PushKind.MESSAGE, aor, now + limit_s,
                                           data=MESSAGE_DATA, created_at=now))

        async def run_jobs(aors: list[str], rate: float | None) -> float:
            nonlocal expected
            latencies.clear()
            done_at.clear()
            all_done.clear()
            expected = len(aors)
            start = time.time()
            if rate is None:  # burst: XADD in pipelined chunks, as fast as Redis takes them
                for i in range(0, len(aors), 500):
                    pipe = raw.pipeline(transaction=False)
                    for aor in aors[i:i + 500]:
                        pipe.xadd(settings.stream, job(aor))
                    await pipe.execute()
            else:
                for i, aor in enumerate(aors):
                    await asyncio.sleep(max(0.0, start + i / rate - time.time()))
                    await raw.xadd(settings.stream, job(aor))
            await asyncio.wait_for(all_done.wait(), limit_s)
            return start

        stop = asyncio.Event()
        pool = TimedPool()
        dispatcher = Dispatcher(settings, pool=pool, stats_interval=3600.0)
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await run_jobs(await add_devices("warm", 50, 3_000_000), None)  # connect, JWT, HPACK tables
            aors = await add_devices("burst", n, 0)
            start = await run_jobs(aors, None)
            m.n = len(latencies)
            m.pushes_per_s = m.n / (max(done_at) - start)
            m.p50_ms, m.p99_ms = _pct(latencies, 0.5), _pct(latencies, 0.99)
            aors = await add_devices("paced", paced_n, 4_000_000)
            await run_jobs(aors, paced_rate)
            m.paced_n, m.paced_rate = len(latencies), paced_rate
            m.paced_p50_ms, m.paced_p99_ms = _pct(latencies, 0.5), _pct(latencies, 0.99)
        finally:
            stop.set()
            await task
            await pool.aclose()
            await raw.aclose()
    m.note = f"Dispatcher concurrency {concurrency}, jobs of kind messageReceived, 1 device each"
    return m


async def bench_dispatcher_sandbox(n: int, concurrency: int, paced_n: int, paced_rate: float,
                                   limit_s: float) -> DispatchMeasurement:
    from pushsandbox.process import sandbox_process

    with sandbox_process() as handle:
        app = handle.control.apns_token_app(TOPIC)
        return await bench_dispatcher("disp-sandbox", app, n, concurrency, paced_n, paced_rate, limit_s)


def _print(results: list[Measurement]) -> None:
    head = (
        f"{'client':<15} {'seq p50 ms':>10} {'seq p99 ms':>10} {'conc':>5} {'n':>6} "
        f"{'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for m in results:
        print(
            f"{m.name:<15} {m.seq_p50_ms:>10.3f} {m.seq_p99_ms:>10.3f} {m.concurrency:>5} {m.n:>6} "
            f"{m.pushes_per_s:>9.0f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {m.errors:>6}  {m.note}"
        )


def _print_dispatch(results: list[DispatchMeasurement]) -> None:
    head = (
        f"{'dispatcher':<15} {'n':>6} {'pushes/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'paced n':>7} {'rate/s':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for m in results:
        print(
            f"{m.name:<15} {m.n:>6} {m.pushes_per_s:>9.0f} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f} "
            f"{m.paced_n:>7} {m.paced_rate:>6.0f} {m.paced_p50_ms:>8.2f} {m.paced_p99_ms:>8.2f} {m.errors:>6}"
        )


async def _run(args: argparse.Namespace) -> tuple[list[Measurement], list[DispatchMeasurement]]:
    wanted = set(args.only.split(",")) if args.only else None
    results: list[Measurement] = []
    dispatch: list[DispatchMeasurement] = []
    paced = (args.disp_n, args.concurrency, args.paced_n, args.paced_rate, args.limit)

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    common = (args.seq, args.n, args.concurrency, args.limit)
    if want("ours-sandbox"):
        results.append(await bench_sandbox(*common))
    if want("disp-sandbox"):
        dispatch.append(await bench_dispatcher_sandbox(*paced))
    with nginx_h2() as nginx:
        for _ in range(args.rounds):
            if want("disp-nginx"):
                dispatch.append(await bench_dispatcher("disp-nginx", _nginx_app(nginx), *paced))
            if want("ours-nginx"):
                m = await bench_pool("ours-nginx", _nginx_app(nginx), *common)
                m.note = "ProviderPool -> ApnsClient -> H2Transport"
                results.append(m)
            if want("aioapns-nginx"):
                results.append(await bench_aioapns(nginx, *common))
            if want("httpx-nginx"):
                results.append(await bench_httpx(nginx, *common))
    return results, dispatch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="requests in the throughput run")
    parser.add_argument("-c", "--concurrency", type=int, default=100)
    parser.add_argument("--seq", type=int, default=500, help="sequential requests for unloaded latency")
    parser.add_argument("--limit", type=float, default=60.0, help="max seconds per phase")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the nginx cases (noisy machine)")
    parser.add_argument("--disp-n", type=int, default=10_000, help="jobs in the dispatcher burst")
    parser.add_argument("--paced-n", type=int, default=200, help="jobs in the paced dispatcher run")
    parser.add_argument("--paced-rate", type=float, default=50.0, help="jobs/s in the paced dispatcher run")
    parser.add_argument(
        "--only", default="",
        help="comma list of: ours-sandbox,ours-nginx,aioapns-nginx,httpx-nginx,disp-nginx,disp-sandbox",
    )
    args = parser.parse_args()
    results, dispatch = asyncio.run(_run(args))
    _print(results)
    if dispatch:
        print()
        _print_dispatch(dispatch)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"push_bench-{stamp}.json"
    out.write_text(json.dumps(
        {"args": vars(args), "results": [asdict(m) for m in results],
         "dispatcher": [asdict(m) for m in dispatch]},
        indent=2,
    ))
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
