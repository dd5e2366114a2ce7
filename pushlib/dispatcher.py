"""The push dispatcher: consumes push jobs from the Redis Stream and sends them to APNs/FCM.

Delivery is at-least-once. A job entry is acked (XACK + XDEL) only once every target device
reached a final outcome; a dispatcher that dies leaves its entries pending, and any live
dispatcher takes them over with XAUTOCLAIM after `Settings.reclaim_idle_ms`. Live dispatchers
keep their own in-flight entries fresh (XCLAIM JUSTID every reclaim_idle_ms/3) so a sweep
never steals work that is still progressing. Each (job, device) push the provider accepted is
marked `pn:sent:<job>:<device>` right away, so a reclaimed job skips it; a push accepted by the
provider but not yet marked when the process died is sent again (the duplicate window).

Runs standalone (`python -m pushlib.dispatcher`, console script `pushlib-dispatcher`) or
inside Kamailio (`asyncio.run(Dispatcher(Settings.from_env()).run(stop))` in an evrexec
process); `run()` installs no signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from pushlib import keys
from pushlib.astore import AsyncStore
from pushlib.logutil import token_prefix
from pushlib.models import (
    ApnsRequest,
    AppCredentials,
    Device,
    FcmMessage,
    Outcome,
    Provider,
    PushJob,
    PushKind,
    PushResult,
)
from pushlib.payloads import build_apns, build_fcm
from pushlib.providers import ProviderPool
from pushlib.settings import Settings
from pushlib.store import StoreUnavailable

log = logging.getLogger(__name__)

STAT_NAMES = (
    "delivered", "token_dead", "suspect", "retried", "deadline_dropped", "config_error", "rejected",
    "quarantined_skipped", "already_sent", "no_token", "malformed", "failed",
)
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
APP_CACHE_SECONDS = 5.0
READ_BLOCK_MS = 500
READ_BATCH = 100

_Builder = Callable[
    [PushKind, Device, dict[str, str], float, float, Settings], ApnsRequest | FcmMessage | None
]


def backoff_delay(attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter for retry number `attempt` (1-based), never shorter than
    the provider's Retry-After."""
    rng = rng or random.Random()
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return max(rng.uniform(ceiling / 2, ceiling), retry_after or 0.0)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Dispatcher:
    """One consumer of the job stream (see module doc). `stats` counts final outcomes per
    device push (and `deadline_dropped` also counts whole jobs that were too late when read)."""

    def __init__(
        self,
        settings: Settings,
        pool: ProviderPool | None = None,
        consumer: str | None = None,
        *,
        stop_timeout: float = 10.0,
        stats_interval: float = 60.0,
    ) -> None:
        self.settings = settings
        self.consumer = consumer or default_consumer_name()
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.stop_timeout = stop_timeout
        self.stats_interval = stats_interval
        self._pool = pool
        self._owns_pool = pool is None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._apps: dict[tuple[str, str], tuple[float, AppCredentials | None]] = {}
        self._redis_down = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume jobs until `stop` is set, then stop reading, give in-flight jobs up to
        `stop_timeout` seconds to finish (unfinished ones stay pending for another dispatcher),
        and close the provider pool and Redis."""
        self._store = AsyncStore(self.settings.redis_url, self.settings)
        self._pool_in_use = self._pool or ProviderPool()
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        log.info("dispatcher %s: starting stream=%s group=%s concurrency=%d reclaim_idle_ms=%d",
                 self.consumer, self.settings.stream, self.settings.group, self.settings.concurrency,
                 self.settings.reclaim_idle_ms)
        background: list[asyncio.Task[None]] = []
        try:
            if await self._until_ok(stop, self._store.ensure_group):
                idle_s = self.settings.reclaim_idle_ms / 1000
                background = [
                    # refresh well within the idle limit so no sweep takes over live work
                    asyncio.create_task(self._every(stop, idle_s / 3, self._refresh)),
                    asyncio.create_task(self._every(stop, idle_s / 2, self._reclaim)),
                    asyncio.create_task(self._every(stop, self.stats_interval, self._log_stats)),
                ]
                await self._read_loop(stop)
        finally:
            await self._shutdown(background)

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        inflight = list(self._inflight.values())
        if inflight:
            _, unfinished = await asyncio.wait(inflight, timeout=self.stop_timeout)
            for task in unfinished:
                task.cancel()  # left pending in the group: another dispatcher reclaims it
            await asyncio.gather(*inflight, return_exceptions=True)
            if unfinished:
                log.warning("dispatcher %s: %d jobs unfinished at stop, left for reclaim",
                            self.consumer, len(unfinished))
        if self._owns_pool:
            await self._pool_in_use.aclose()
        await self._store.aclose()
        await self._log_stats()

    async def _until_ok(self, stop: asyncio.Event, op: Callable[[], Awaitable[None]]) -> bool:
        """Run `op` until it succeeds (Redis may be down at start); False if stopped first."""
        while not stop.is_set():
            try:
                await op()
                self._redis_up()
                return True
            except StoreUnavailable as exc:
                self._redis_failed(exc)
                await _sleep_or_stop(stop, 1.0)
        return False

    def _redis_failed(self, exc: StoreUnavailable) -> None:
        if not self._redis_down:  # one line per outage, not one per loop turn
            log.error("dispatcher %s: %s (retrying)", self.consumer, exc)
            self._redis_down = True

    def _redis_up(self) -> None:
        if self._redis_down:
            log.info("dispatcher %s: redis reachable again", self.consumer)
            self._redis_down = False

    async def _every(self, stop: asyncio.Event, seconds: float, op: Callable[[], Awaitable[None]]) -> None:
        while not await _sleep_or_stop(stop, max(0.05, seconds)):
            try:
                await op()
            except StoreUnavailable as exc:
                self._redis_failed(exc)

    # --- reading and reclaiming -----------------------------------------------------------------

    async def _read_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self.settings.concurrency - len(self._inflight)
            if free <= 0:
                await asyncio.wait(list(self._inflight.values()), timeout=1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                entries = await self._store.read_new(self.consumer, min(free, READ_BATCH), READ_BLOCK_MS)
                self._redis_up()
            except StoreUnavailable as exc:
                self._redis_failed(exc)
                await _sleep_or_stop(stop, 1.0)
                continue
            for entry_id, fields in entries:
                self._start(entry_id, fields)

    async def _reclaim(self) -> None:
        """Take over entries idle longer than reclaim_idle_ms (their consumer died or hung)."""
        start = "0-0"
        while (free := self.settings.concurrency - len(self._inflight)) > 0:
            start, entries, deleted = await self._store.reclaim(
                self.consumer, self.settings.reclaim_idle_ms, start, min(free, READ_BATCH)
            )
            await self._store.finish(deleted)
            for entry_id, fields in entries:
                if entry_id not in self._inflight:
                    log.info("dispatcher %s: reclaimed entry %s", self.consumer, entry_id)
                    self._start(entry_id, fields)
            if start == "0-0":
                break

    async def _refresh(self) -> None:
        ids = list(self._inflight)
        for i in range(0, len(ids), 500):
            await self._store.touch(self.consumer, ids[i:i + 500])

    def _start(self, entry_id: str, fields: dict[str, str]) -> None:
        if entry_id in self._inflight:
            return
        task = asyncio.create_task(self._handle(entry_id, fields))
        self._inflight[entry_id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(entry_id, None))

    async def _log_stats(self) -> None:
        log.info("dispatcher %s: stats %s inflight=%d", self.consumer,
                 " ".join(f"{k}={v}" for k, v in self.stats.items()), len(self._inflight))

    # --- one job --------------------------------------------------------------------------------

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        """Process one stream entry to its final outcome and ack it. On a Redis outage the
        entry stays pending (reclaimed later); a bug is logged and the entry acked so a poison
        entry cannot loop."""
        try:
            try:
                job = keys.decode_job(fields)
            except keys.DecodeError as exc:
                self.stats["malformed"] += 1
                log.error("dispatcher: malformed stream entry %s dropped: %s", entry_id, exc)
                await self._store.finish([entry_id])
                return
            if job.deadline <= time.time():
                self.stats["deadline_dropped"] += 1
                log.info("push job=%s kind=%s aor=%s outcome=deadline_dropped (late by %.1fs when read)",
                         job.job_id, job.kind.value, job.aor, time.time() - job.deadline)
                await self._store.finish([entry_id])
                return
            devices = await self._store.devices(job.aor)
            if job.device_ids:
                wanted = set(job.device_ids)
                devices = [d for d in devices if d.device_id in wanted]
            if not devices:
                log.info("push job=%s kind=%s aor=%s outcome=no_device", job.job_id, job.kind.value, job.aor)
            await asyncio.gather(*(self._push(job, d) for d in devices))
            await self._store.finish([entry_id])
        except StoreUnavailable as exc:
            self._redis_failed(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["failed"] += 1
            log.exception("dispatcher: job entry %s failed unexpectedly; dropped", entry_id)
            with contextlib.suppress(StoreUnavailable):
                await self._store.finish([entry_id])

    async def _app(self, provider: str, app_id: str) -> AppCredentials | None:
        """App credentials, cached for APP_CACHE_SECONDS (saves a Redis read per push)."""
        now = time.monotonic()
        cached = self._apps.get((provider, app_id))
        if cached is not None and cached[0] > now:
            return cached[1]
        app = await self._store.app(provider, app_id)
        self._apps[(provider, app_id)] = (now + APP_CACHE_SECONDS, app)
        return app

    async def _push(self, job: PushJob, device: Device) -> None:
        """Push one device to a final outcome, retrying RETRYABLE results until the deadline."""
        provider, app_id = device.params.provider.value, device.params.app_id
        if device.quarantined_until > time.time():
            return self._final_line(job, device, "quarantined_skipped", None, "device quarantined")
        app = await self._app(provider, app_id)
        if app is None:
            await self._store.record_app_error(provider, app_id, "no credentials stored for this app")
            return self._final_line(job, device, "config_error", None, "no credentials for app")
        if await self._store.is_sent(job.job_id, device.device_id):
            return self._final_line(job, device, "already_sent", None, "provider accepted it before")
        build: _Builder = build_apns if device.params.provider is Provider.APNS else build_fcm
        attempt = 0
        while True:
            now = time.time()
            remaining = job.deadline - now
            if remaining <= 0:
                return self._final_line(job, device, "deadline_dropped", None, "deadline passed")
            try:
                request = build(job.kind, device, dict(job.data), job.deadline, now, self.settings)
            except ValueError as exc:  # PayloadTooLarge: the job's own fields cannot fit
                return self._final_line(job, device, "rejected", None, f"cannot build payload: {exc}")
            if request is None:
                return self._final_line(job, device, "no_token", None, f"no token for {job.kind.value}")
            async with self._slots:
                result = await self._pool_in_use.send(
                    app, device, request, min(self.settings.push_timeout, remaining)
                )
            if result.outcome is not Outcome.RETRYABLE:
                return await self._final(job, device, request, result)
            attempt += 1
            delay = backoff_delay(attempt, result.retry_after)
            if time.time() + delay >= job.deadline:
                return self._final_line(job, device, "deadline_dropped", request,
                                        f"retryable {result.status} {result.reason}; no time left")
            self.stats["retried"] += 1
            log.debug("push job=%s device=%s retry %d in %.2fs after %s %s",
                      job.job_id, device.device_id, attempt, delay, result.status, result.reason)
            await asyncio.sleep(delay)

    async def _final(self, job: PushJob, device: Device, request: ApnsRequest | FcmMessage,
                     result: PushResult) -> None:
        provider, app_id = device.params.provider.value, device.params.app_id
        outcome = result.outcome
        if outcome is Outcome.DELIVERED:
            await self._store.mark_sent(job.job_id, device.device_id)  # first: shrinks the duplicate window
        elif outcome is Outcome.TOKEN_DEAD:
            await self._store.remove_token(device.aor, device.device_id, request.token)
        elif outcome is Outcome.DEVICE_SUSPECT:
            await self._store.quarantine_device(device.aor, device.device_id)
        elif outcome is Outcome.CONFIG_ERROR:
            await self._store.record_app_error(provider, app_id, f"{result.status} {result.reason}".strip())
            self._apps.pop((provider, app_id), None)  # pick up fixed credentials at once
        await self._store.record_outcome(provider, app_id, outcome)
        name = {Outcome.DEVICE_SUSPECT: "suspect"}.get(outcome, outcome.value)
        self._final_line(job, device, name, request, f"{result.status} {result.reason}".strip())

    def _final_line(self, job: PushJob, device: Device, outcome: str,
                    request: ApnsRequest | FcmMessage | None, detail: str) -> None:
        """Count and log one final outcome of one device push (one line, token prefix only)."""
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        params = device.params
        token = request.token if request is not None else (params.voip_token or params.alert_token)
        quiet = outcome in ("delivered", "already_sent", "quarantined_skipped", "no_token")
        level = logging.INFO if quiet else logging.WARNING
        log.log(level, "push job=%s kind=%s aor=%s device=%s provider=%s outcome=%s status=%s token=%s",
                job.job_id, job.kind.value, job.aor, device.device_id, device.params.provider.value,
                outcome, detail, token_prefix(token))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when `stop` got set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# --- standalone entry point ---------------------------------------------------------------------


def parse_args(argv: list[str] | None, defaults: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pushlib-dispatcher", description="Send queued SIP push jobs to APNs and FCM."
    )
    parser.add_argument("--redis-url", default=defaults.redis_url)
    parser.add_argument("--consumer", default=None, help="consumer name (default: host-pid-random)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--log-level", default=os.environ.get("PUSHLIB_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


async def _serve(settings: Settings, consumer: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Dispatcher(settings, consumer=consumer).run(stop)


def main(argv: list[str] | None = None) -> None:
    """Console script: settings from PUSHLIB_* variables, overridden by the flags."""
    defaults = Settings.from_env()
    args = parse_args(argv, defaults)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = replace(defaults, redis_url=args.redis_url, concurrency=args.concurrency)
    asyncio.run(_serve(settings, args.consumer))


if __name__ == "__main__":
    main()
