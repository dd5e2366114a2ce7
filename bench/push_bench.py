"""Push-sending benchmark: pushes/s and latency through ONE HTTP/2 connection.

Clients compared (all on loopback, TLS + HTTP/2):
  ours-sandbox   ProviderPool.send -> ApnsClient -> H2Transport -> the pushlib sandbox
  ours-nginx     ProviderPool.send -> ApnsClient -> H2Transport -> nginx answering 200
  aioapns-nginx  aioapns (max_connections=1) -> the same nginx
  httpx-nginx    plain httpx.AsyncClient(http2=True) -> the same nginx (reference)

For each: unloaded latency (sequential requests) and throughput at a given concurrency.
Prints a table and writes JSON to bench/results/push_bench-<timestamp>.json.

Dispatcher cases: Redis stream -> pushlib.dispatcher.Dispatcher -> ProviderPool (one connection):
  disp-nginx / disp-sandbox    one Dispatcher inside this process (which also enqueues the jobs)
  procs-nginx / procs-sandbox  `--procs` dispatcher PROCESSES (default 1 and 2) on one consumer
                               group: pushes/s for each count, the ratio to one process, Redis
                               commands and round trips per push (INFO commandstats), CPU ms per
                               push and cores kept busy of each process (dispatchers, redis-server,
                               nginx, this script) and of everything else on the machine (noise)

    .venv/bin/python bench/push_bench.py [-n 10000] [-c 100] [--seq 500] [--only ours-nginx,...]
    .venv/bin/python bench/push_bench.py --only procs-nginx --procs 1,2 --disp-n 10000 --rounds 3 [--preload]

The nginx endpoint comes from `harness.nginx`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
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
    from pushlib.dispatcher import Dispatcher
    from pushlib.models import (
        ApnsRequest,
        AppCredentials,
        Device,
        FcmMessage,
        Outcome,
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
            return await _add_bench_devices(raw, app, prefix, count, first_token)

        def job(aor: str) -> dict[str, str]:
            return _bench_job(aor, created, limit_s)

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


# ---------------------------------------------------------------------------------------------
# Dispatcher processes: this process enqueues, N dispatcher processes on one consumer group push
# ---------------------------------------------------------------------------------------------

# Commands of this process (enqueue, polling, statistics), not of the dispatchers: left out of
# the per-push Redis figures. (XADD is the SIP side's work in production.)
_BENCH_COMMANDS = frozenset({"xadd", "xlen", "config|resetstat", "info", "client|list", "hello"})
POLL_S = 0.01


@dataclass
class ProcsMeasurement:
    name: str
    processes: int
    n: int = 0
    pushes_per_s: float = 0.0  # jobs delivered / (last provider 200 - first enqueue)
    ratio: float = 0.0  # pushes/s over the same round's one-process figure (0: no such run)
    p50_ms: float = 0.0  # enqueue (job created_at) -> provider's 200
    p99_ms: float = 0.0
    redis_cmds_per_push: float = 0.0  # dispatchers' commands, script-internal ones included
    redis_round_trips_per_push: float = 0.0  # requests the dispatchers wrote (a pipeline is one)
    redis_calls: dict[str, int] = field(default_factory=dict)  # command -> dispatchers' calls in the burst
    redis_usec_per_push: float = 0.0  # Redis's own time executing the dispatchers' commands
    cpu_ms_per_push: dict[str, float] = field(default_factory=dict)  # process -> CPU ms per push
    cores_busy: dict[str, float] = field(default_factory=dict)  # process -> cores it kept busy in the burst
    others_cores: float = 0.0  # cores kept busy by everything else on the machine (noise)
    per_process: list[int] = field(default_factory=list)  # pushes delivered by each dispatcher
    errors: int = 0
    note: str = ""


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process, from /proc (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # fields 3.. of proc(5): utime is 14, stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _dispatcher_child(redis_url: str, concurrency: int, consumer: str, out: Path,
                            log_level: str, limit_s: float) -> None:
    """One dispatcher process of the `procs-*` cases: a plain Dispatcher whose ProviderPool notes
    when each push was answered. SIGUSR1 marks the start of the measured burst (round trips and
    CPU are counted from there), SIGTERM stops it (as `pushlib-dispatcher`); it also stops by
    itself after `limit_s`. Writes what it saw to `out` as JSON."""
    import redis.asyncio.connection as rconn

    from pushlib.dispatcher import Dispatcher
    from pushlib.logutil import setup_logging
    from pushlib.models import ApnsRequest, AppCredentials, Device, FcmMessage, Outcome, PushResult
    from pushlib.providers import ProviderPool
    from pushlib.settings import Settings

    setup_logging(log_level)
    done: list[tuple[str, float, bool]] = []
    sent = [0]  # requests written to Redis (one per command, one per pipeline)
    marks: dict[str, tuple[int, float]] = {}
    original = rconn.AbstractConnection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        await original(self, command, check_health)

    rconn.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]

    class RecordingPool(ProviderPool):
        async def send(
            self, app: AppCredentials, device: Device, request: ApnsRequest | FcmMessage, timeout: float
        ) -> PushResult:
            result = await super().send(app, device, request, timeout)
            done.append((device.aor, time.time(), result.outcome is Outcome.DELIVERED))
            return result

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def mark(name: str) -> None:
        marks.setdefault(name, (sent[0], time.process_time()))

    def on_term() -> None:
        mark("end")
        stop.set()

    loop.add_signal_handler(signal.SIGUSR1, mark, "start")
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.call_later(limit_s, on_term)
    pool = RecordingPool()
    dispatcher = Dispatcher(Settings(redis_url=redis_url, concurrency=concurrency), pool=pool,
                            consumer=consumer, stats_interval=3600.0)
    try:
        await dispatcher.run(stop)
    finally:
        await pool.aclose()
    start, end = marks.get("start", (0, 0.0)), marks.get("end", (sent[0], time.process_time()))
    out.write_text(json.dumps({"done": done, "stats": dispatcher.stats, "round_trips": end[0] - start[0],
                               "cpu_s": end[1] - start[1]}))


async def bench_procs(
    name: str, app: Any, counts: list[int], n: int, concurrency: int, limit_s: float, log_level: str,
    preload: bool, provider_pid: int | None,
) -> list[ProcsMeasurement]:
    """For each number of processes in `counts`: that many dispatcher processes (this script with
    --dispatcher-child) on one consumer group of a private redis-server; `n` jobs (one device
    each) XADDed at once; pushes/s = n / (last provider 200 - first XADD). With `preload` the jobs
    are XADDed while the dispatchers are stopped (SIGSTOP) and the clock starts when they go on
    (SIGCONT): the dispatchers alone, without this process enqueueing on the same cores (latency is
    then counted from that start). Redis figures come from the server's INFO commandstats over the
    burst (this process's own commands left out) and the round trips the dispatchers wrote; CPU
    from /proc."""
    import redis.asyncio as aredis

    from harness.localrun import redis_server
    from pushlib.settings import Settings
    from pushlib.store import SyncStore

    results: list[ProcsMeasurement] = []
    with redis_server() as server, tempfile.TemporaryDirectory(prefix="pn-push-bench-") as tmp:
        settings = Settings(redis_url=server.url)
        store = SyncStore(server.url, settings)
        store.save_app(app)
        store.close()
        raw: Any = aredis.Redis.from_url(server.url, decode_responses=True)
        try:
            for run, procs in enumerate(counts):
                results.append(await _procs_run(
                    name, app, procs, run, n, concurrency, limit_s, log_level, preload, provider_pid,
                    server, raw, settings, Path(tmp),
                ))
        finally:
            await raw.aclose()
    one = next((r.pushes_per_s for r in results if r.processes == 1), 0.0)
    for r in results:
        r.ratio = r.pushes_per_s / one if one else 0.0
    return results


async def _add_bench_devices(raw: Any, app: Any, prefix: str, count: int, first_token: int) -> list[str]:
    """`count` users with one device each of `app`, written directly (pipelined, 1,000 at a time)
    instead of through save_device: setup, not what the bench measures. Their AORs."""
    from pushlib import schema
    from pushlib.models import Device, PushParams

    now = time.time()
    aors = [f"sip:{prefix}-{i}@bench.example" for i in range(count)]
    for i in range(0, count, 1000):
        pipe = raw.pipeline(transaction=False)
        for j, aor in enumerate(aors[i:i + 1000], start=i):
            params = PushParams(app.provider, app.app_id, alert_token=_token(first_token + j))
            device = Device(aor, "d1", params, registered_at=now, expires_at=now + 3600)
            pipe.hset(schema.device_key(aor, "d1"), mapping=schema.encode_device(device))
            pipe.expire(schema.device_key(aor, "d1"), 3600)
            pipe.sadd(schema.devices_key(aor), "d1")
        await pipe.execute()
    return aors


def _bench_job(aor: str, created: dict[str, float], limit_s: float) -> dict[str, str]:
    """A messageReceived job for `aor`, its creation time noted in `created` (latency's start)."""
    from pushlib import schema
    from pushlib.models import PushJob, PushKind

    now = time.time()
    created[aor] = now
    return schema.encode_job(PushJob(uuid.uuid4().hex, PushKind.MESSAGE, aor, now + limit_s,
                                     data=MESSAGE_DATA, created_at=now))


async def _procs_run(
    name: str, app: Any, procs: int, run: int, n: int, concurrency: int, limit_s: float, log_level: str,
    preload: bool, provider_pid: int | None, server: Any, raw: Any, settings: Any, tmp: Path,
) -> ProcsMeasurement:
    from harness.localrun import stop_process

    m = ProcsMeasurement(name, procs)
    created: dict[str, float] = {}

    async def add_devices(prefix: str, count: int, first_token: int) -> list[str]:
        return await _add_bench_devices(raw, app, prefix, count, first_token)

    def job(aor: str) -> dict[str, str]:
        return _bench_job(aor, created, limit_s)

    async def drained(deadline: float) -> bool:
        while time.monotonic() < deadline:
            if await raw.xlen(settings.stream) == 0:
                return True
            await asyncio.sleep(POLL_S)
        return False

    prefix = f"r{run}p{procs}"
    burst = await add_devices(f"{prefix}-burst", n, 10_000_000 * (run + 1))
    warm = await add_devices(f"{prefix}-warm", 20 * procs, 10_000_000 * (run + 1) + 5_000_000)
    consumers = [f"bench-{prefix}-{i}" for i in range(procs)]
    outs = [tmp / f"{c}.json" for c in consumers]
    logs = [tmp / f"{c}.log" for c in consumers]  # the dispatchers' log lines (INFO: one per push)
    children = []
    for consumer, out, log in zip(consumers, outs, logs, strict=True):
        with log.open("wb") as stderr:
            children.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--dispatcher-child", str(out),
                 "--child-redis-url", server.url, "--child-consumer", consumer, "-c", str(concurrency),
                 "--limit", str(limit_s * 3), "--disp-log-level", log_level],
                cwd=ROOT, stdin=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            ))
    try:
        ready_by = time.monotonic() + 30
        while time.monotonic() < ready_by:  # every dispatcher waits in its blocking read
            blocked = [c for c in await raw.client_list() if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")]
            if len(blocked) >= procs:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("dispatcher processes did not start reading the stream")
        # Warm-up: one job at a time, so that the blocked readers take turns (each connects, signs
        # its JWT and fills its HPACK table before the burst).
        for aor in warm:
            await raw.xadd(settings.stream, job(aor))
            await asyncio.sleep(0.005)
        if not await drained(time.monotonic() + limit_s):
            raise RuntimeError("warm-up jobs were not consumed")
        await asyncio.sleep(0.2)
        pids = {f"dispatcher{i + 1}": c.pid for i, c in enumerate(children)}
        pids["redis-server"] = server.proc.pid
        if provider_pid is not None:
            pids[name.split("-", 1)[1]] = provider_pid
        await raw.config_resetstat()
        cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        cpu0["machine"], cpu0["bench"] = _machine_busy_seconds(), time.process_time()
        if preload:  # the whole burst waits in the stream before any dispatcher runs again
            for c in children:
                os.kill(c.pid, signal.SIGSTOP)
        else:
            for c in children:
                os.kill(c.pid, signal.SIGUSR1)
            start = time.time()
        for i in range(0, len(burst), 500):  # as fast as Redis takes them, as in disp-nginx
            pipe = raw.pipeline(transaction=False)
            for aor in burst[i:i + 500]:
                pipe.xadd(settings.stream, job(aor))
            await pipe.execute()
        if preload:
            cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            cpu0["machine"], cpu0["bench"] = _machine_busy_seconds(), time.process_time()
            start = time.time()
            for c in children:
                os.kill(c.pid, signal.SIGCONT)
                os.kill(c.pid, signal.SIGUSR1)
        complete = await drained(time.monotonic() + limit_s)
        cpu1 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        cpu1["machine"], cpu1["bench"] = _machine_busy_seconds(), time.process_time()
        wall = time.time() - start
        stats = await raw.info("commandstats")
        for c in children:
            os.kill(c.pid, signal.SIGTERM)
    finally:
        for c in children:
            try:
                c.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                stop_process(c)
    first = set(burst)
    latencies: list[float] = []
    done_at: list[float] = []
    round_trips = 0
    for out, log in zip(outs, logs, strict=True):
        if not out.exists():
            m.per_process.append(0)
            m.note += f" {out.stem}: no report;"
            print(f"{out.stem} wrote no report; its log ends:\n{log.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
            continue
        report = json.loads(out.read_text())
        mine = [(aor, t, ok) for aor, t, ok in report["done"] if aor in first]
        m.per_process.append(len(mine))
        round_trips += int(report["round_trips"])
        for aor, t, ok in mine:
            latencies.append(t - max(created[aor], start))
            done_at.append(t)
            m.errors += not ok
    m.n = len(latencies)
    if done_at:
        m.pushes_per_s = m.n / (max(done_at) - start)
    m.p50_ms, m.p99_ms = _pct(latencies, 0.5), _pct(latencies, 0.99)
    calls = {cmd.removeprefix("cmdstat_"): int(v["calls"]) for cmd, v in stats.items()}
    m.redis_usec_per_push = sum(
        float(v["usec"]) for cmd, v in stats.items() if cmd.removeprefix("cmdstat_") not in _BENCH_COMMANDS
    ) / max(1, len(latencies))
    m.redis_calls = dict(sorted(((k, v) for k, v in calls.items() if k not in _BENCH_COMMANDS),
                                key=lambda kv: -kv[1]))
    if m.n:
        m.redis_cmds_per_push = sum(m.redis_calls.values()) / m.n
        m.redis_round_trips_per_push = round_trips / m.n
        m.cpu_ms_per_push = {k: 1000.0 * (cpu1[k] - cpu0[k]) / m.n for k in pids}
        m.cores_busy = {k: (cpu1[k] - cpu0[k]) / wall for k in (*pids, "bench")}
        ours = sum(cpu1[k] - cpu0[k] for k in (*pids, "bench"))
        m.others_cores = max(0.0, (cpu1["machine"] - cpu0["machine"] - ours) / wall)
    if not complete:
        m.note += " NOT DRAINED within --limit;"
    m.note = (m.note + f" concurrency {concurrency}/process, messageReceived, 1 device each").strip()
    return m


def _print_procs(results: list[ProcsMeasurement]) -> None:
    head = (
        f"{'dispatcher procs':<16} {'procs':>5} {'n':>6} {'pushes/s':>9} {'x one':>6} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'cmds/push':>9} {'rtt/push':>8} {'errors':>6}  per process / CPU ms per push"
    )
    print(head)
    print("-" * len(head))
    for m in results:
        cpu = " ".join(f"{k}={v:.3f}" for k, v in m.cpu_ms_per_push.items())
        print(
            f"{m.name:<16} {m.processes:>5} {m.n:>6} {m.pushes_per_s:>9.0f} {m.ratio:>6.2f} {m.p50_ms:>8.2f} "
            f"{m.p99_ms:>8.2f} {m.redis_cmds_per_push:>9.2f} {m.redis_round_trips_per_push:>8.3f} {m.errors:>6}  "
            f"{'/'.join(map(str, m.per_process))}  {cpu}"
        )
    for m in results:
        busy = " ".join(f"{k}={v:.2f}" for k, v in m.cores_busy.items())
        print(f"  {m.name} x{m.processes}: cores busy during the burst: {busy}; "
              f"everything else on the machine (and softirq) {m.others_cores:.2f}")
        top = ", ".join(f"{k} {v / max(1, m.n):.3f}" for k, v in m.redis_calls.items() if v >= m.n / 1000)
        print(f"  {m.name} x{m.processes}: Redis calls per push: {top}; Redis CPU "
              f"{m.redis_usec_per_push:.1f} us per push in commands")
    rounds: dict[tuple[str, int], list[ProcsMeasurement]] = {}
    for m in results:
        rounds.setdefault((m.name, m.processes), []).append(m)
    if len(results) > len(rounds):
        for (name, procs), runs in sorted(rounds.items()):
            rates = [r.pushes_per_s for r in runs]
            line = (f"  {name} x{procs}, {len(runs)} rounds: median {statistics.median(rates):,.0f} pushes/s "
                    f"(min {min(rates):,.0f}, max {max(rates):,.0f})")
            if procs != 1:
                line += f", ratio to one process: median {statistics.median(r.ratio for r in runs):.2f}"
            print(line)


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


async def _run(
    args: argparse.Namespace,
) -> tuple[list[Measurement], list[DispatchMeasurement], list[ProcsMeasurement]]:
    wanted = set(args.only.split(",")) if args.only else None
    results: list[Measurement] = []
    dispatch: list[DispatchMeasurement] = []
    procs: list[ProcsMeasurement] = []
    counts = [int(p) for p in args.procs.split(",") if p.strip()]
    proc_args = (counts, args.disp_n, args.concurrency, args.limit, args.disp_log_level, args.preload)
    paced = (args.disp_n, args.concurrency, args.paced_n, args.paced_rate, args.limit)

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    common = (args.seq, args.n, args.concurrency, args.limit)
    if want("ours-sandbox"):
        results.append(await bench_sandbox(*common))
    if want("disp-sandbox"):
        dispatch.append(await bench_dispatcher_sandbox(*paced))
    if want("procs-sandbox"):
        from pushsandbox.process import sandbox_process

        with sandbox_process() as handle:
            app = handle.control.apns_token_app(TOPIC)
            procs += await bench_procs("procs-sandbox", app, *proc_args, handle.proc.pid)
    with nginx_h2() as nginx:
        for _ in range(args.rounds):
            if want("disp-nginx"):
                dispatch.append(await bench_dispatcher("disp-nginx", _nginx_app(nginx), *paced))
            if want("procs-nginx"):
                procs += await bench_procs("procs-nginx", _nginx_app(nginx), *proc_args, nginx.proc.pid)
            if want("ours-nginx"):
                m = await bench_pool("ours-nginx", _nginx_app(nginx), *common)
                m.note = "ProviderPool -> ApnsClient -> H2Transport"
                results.append(m)
            if want("aioapns-nginx"):
                results.append(await bench_aioapns(nginx, *common))
            if want("httpx-nginx"):
                results.append(await bench_httpx(nginx, *common))
    return results, dispatch, procs


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
        help="comma list of: ours-sandbox,ours-nginx,aioapns-nginx,httpx-nginx,disp-nginx,disp-sandbox,"
             "procs-nginx,procs-sandbox",
    )
    parser.add_argument("--procs", default="1,2",
                        help="procs-* cases: numbers of dispatcher processes to run, one after the other")
    parser.add_argument("--preload", action="store_true",
                        help="procs-* cases: queue the burst while the dispatchers are stopped, then time them alone")
    parser.add_argument("--disp-log-level", default="WARNING",
                        help="procs-* cases: the dispatcher processes' log level (INFO logs a line per push)")
    # internal: how the procs-* cases start their dispatcher processes
    parser.add_argument("--dispatcher-child", default=None, metavar="OUT_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--child-redis-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-consumer", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dispatcher_child:
        asyncio.run(_dispatcher_child(args.child_redis_url, args.concurrency, args.child_consumer,
                                      Path(args.dispatcher_child), args.disp_log_level, args.limit))
        return
    results, dispatch, procs = asyncio.run(_run(args))
    _print(results)
    if dispatch:
        print()
        _print_dispatch(dispatch)
    if procs:
        print()
        _print_procs(procs)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"push_bench-{stamp}.json"
    out.write_text(json.dumps(
        {"args": vars(args), "results": [asdict(m) for m in results],
         "dispatcher": [asdict(m) for m in dispatch], "dispatcher_processes": [asdict(m) for m in procs]},
        indent=2,
    ))
    print(f"results written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
