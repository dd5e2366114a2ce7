"""The push dispatcher: consumes push jobs from the Redis Stream and sends them to APNs/FCM.

Delivery is at-least-once. A job entry is acked (XACK + XDEL) only once every target device
reached a final outcome; a dispatcher that dies leaves its entries pending, and any live
dispatcher takes them over with XAUTOCLAIM after `Settings.reclaim_idle_ms` (default 3 s, far
inside a call's 30 s wait window: a SIGKILLed dispatcher's call pushes are sent by another one
2-4.5 s later). Live dispatchers keep their own in-flight entries fresh (XCLAIM JUSTID every
reclaim_idle_ms/3) so a sweep never steals work that is still progressing: an entry is only
taken once its owner missed two refreshes in a row. After a Redis outage (when no refresh could
be written) a dispatcher waits reclaim_idle_ms/2 before its next sweep, so the owners refresh
their live entries first. Each (job, device) push the provider accepted is
marked `pn:{<aor>}:sent:<job>:<device>` right away, so a reclaimed job skips it; a push accepted
by the provider but not yet marked when the process died is sent again (the duplicate window).

Redis work is per batch of jobs, not per job (`_Batcher`: whatever was submitted while the
previous batch was in flight goes out together): under a backlog a read waits for a quarter of
the job slots to be free; the jobs of a read share one script call that returns their devices
with their sent marks (`AsyncStore.job_devices_batch`); the sent marks and acks of a batch are
one more script call (`AsyncStore.mark_sent_and_finish`: a job's only device's mark and its ack
travel together, and an entry is never acked before its marks). On a Redis Cluster the same
batches go out as the per-slot calls. Per-app outcome counters, environment-window entries and
the Prometheus figures (`pushlib.metrics`: pushes by provider/kind/outcome, latency, dead tokens,
quarantines) are buffered in memory and flushed every OUTCOME_FLUSH_SECONDS in one pipeline; a
BadDeviceToken flushes its app's buffer at once so the suspicion check sees the totals.

An iOS device without a VoIP token is rung with a visible alert (`payloads`), which rings once:
after such an incomingCall was delivered, the same push (same `apns-collapse-id`, so it replaces
the previous one on the phone) is sent again every `Settings.call_alert_repeat` seconds while the
call is still parked for that device (its field in the parked-call hash `schema.call_key` is still
`pushed`: the hash is deleted when the call ends, the field becomes `woken` when the device
re-registers), until the job's deadline. In-process and best-effort: at most one repeat task per
(call, device), at most deadline / interval repeats each, stopped at once when this dispatcher
reads the call's cancel or missed-call job, and cancelled when the dispatcher stops. A missed-call
job waits (up to `push_timeout`) for this dispatcher's in-flight cancel job of the same call, so
the missed-call alert, not the "Call ended" one, is the last to replace the ringing alert.

Runs standalone (`python -m pushlib.dispatcher`, console script `pushlib-dispatcher`) or
inside Kamailio (`asyncio.run(Dispatcher(Settings.from_env()).run(stop))` in an evrexec
process); `run()` installs no signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Generic, TypeVar

from redis.exceptions import RedisError

from pushlib import reregister, schema
from pushlib.astore import ENV_WINDOW_PUSHES, AsyncStore
from pushlib.calls import call_key
from pushlib.logutil import redact_url, setup_logging, token_prefix
from pushlib.metrics import MetricsBuffer
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
from pushlib.payloads import build_apns, build_fcm, is_alert_call
from pushlib.providers import ProviderPool
from pushlib.redisconn import StoreUnavailable
from pushlib.settings import Settings, read_redis_url_file

log = logging.getLogger(__name__)

STAT_NAMES = (
    "delivered", "token_dead", "suspect", "retried", "deadline_dropped", "config_error", "rejected",
    "quarantined_skipped", "dead_skipped", "already_sent", "no_token", "malformed", "failed", "repeated",
)
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
APP_CACHE_SECONDS = 5.0
# How many apps' credentials (or their absence) the dispatcher keeps cached: app ids come from
# device records, which a REGISTER can fill with invented ones; the least recently used go first.
APP_CACHE_MAX = 1024
READ_BLOCK_MS = 500
READ_BATCH = 100
# Counters and environment-window entries of an app may lag this much behind its pushes.
OUTCOME_FLUSH_SECONDS = 1.0
# Alert-style incoming-call repeats: never more often than this (seconds), never with less than
# REPEAT_MIN_LEFT seconds of the wait window left (too late to open the app and answer), and at
# most REPEAT_TASKS_MAX calls x devices repeating at once in one dispatcher.
REPEAT_MIN_INTERVAL = 1.0
REPEAT_MIN_LEFT = 1.0
REPEAT_TASKS_MAX = 10_000
#: (job, device) pushes a dispatcher remembers as accepted (about 100 bytes each)
DELIVERED_MEMORY = 100_000
_CALL_END_KINDS = (PushKind.CANCEL_INCOMING_CALL, PushKind.MISSED_CALL)
# Outcomes whose log line is INFO (the rest are WARNING: an operator may have to act).
_QUIET_OUTCOMES = frozenset(("delivered", "already_sent", "quarantined_skipped", "dead_skipped", "no_token"))
_T = TypeVar("_T")
_R = TypeVar("_R")
_AppKey = tuple[str, str]  # (provider, app_id)
# One write of the mark/ack batcher: a sent mark (aor, job_id, device_id), an entry to ack, or both
# (a single-device job's mark and its ack, written in the same call).
_Write = tuple[tuple[str, str, str] | None, str | None]
_CallKey = tuple[str, str]  # (aor, call_id)

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


class _Batcher(Generic[_T, _R]):
    """Coalesces concurrent `submit` calls into few `run(items)` calls (`run` answers one
    result per item, in order): items submitted in the same loop turn, or while the previous
    batch was in flight, go out together. `submit` returns its item's result once `run`
    succeeded, and raises what `run` raised. At most one `run` is in flight, so an idle system
    pays no extra round trip and a busy one pays one per batch instead of one per item."""

    def __init__(self, run: Callable[[list[_T]], Awaitable[Sequence[_R]]]) -> None:
        self._run = run
        self._queue: list[tuple[_T, asyncio.Future[_R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: _T) -> _R:
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():  # a cancelled submitter no longer waits
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._task = None

    async def aclose(self) -> None:
        """Wait until everything submitted so far was run."""
        while self._task is not None:
            await asyncio.shield(self._task)


class _OutcomeBuffer:
    """Per-app outcome counters and environment-window entries not yet written to Redis.
    Bounded: counters are per (app, outcome) and each app keeps its ENV_WINDOW_PUSHES most
    recent window entries (older ones would be trimmed from the Redis window anyway)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.windows: dict[_AppKey, deque[str]] = {}

    def add(self, provider: str, app_id: str, outcome: Outcome, now: float) -> None:
        key = (provider, app_id, outcome.value)
        self.counts[key] = self.counts.get(key, 0) + 1
        window = self.windows.get((provider, app_id))
        if window is None:
            window = self.windows[(provider, app_id)] = deque(maxlen=ENV_WINDOW_PUSHES)
        window.append(schema.window_entry(now, outcome is Outcome.DEVICE_SUSPECT))

    def take(self) -> tuple[dict[tuple[str, str, str], int], dict[_AppKey, deque[str]]]:
        taken = self.counts, self.windows
        self.counts, self.windows = {}, {}
        return taken

    def put_back(self, counts: dict[tuple[str, str, str], int], windows: dict[_AppKey, deque[str]]) -> None:
        """Return what a failed flush took; it is older than anything added since."""
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        for app, older in windows.items():
            newer = self.windows.get(app, ())
            self.windows[app] = deque([*older, *newer], maxlen=ENV_WINDOW_PUSHES)


class Dispatcher:
    """One consumer of the job stream (see module doc). `stats` counts final outcomes per
    device push (and `deadline_dropped` also counts whole jobs that were too late when read);
    `repeated` counts the alert-style incomingCall repeats sent (each also counted by outcome)."""

    def __init__(
        self,
        settings: Settings,
        pool: ProviderPool | None = None,
        consumer: str | None = None,
        *,
        stop_timeout: float = 10.0,
        stats_interval: float = 60.0,
        on_call_token_dead: Callable[[PushJob, Device], None] | None = None,
    ) -> None:
        """`on_call_token_dead(job, device)`: the provider said the token an incomingCall job
        pushed `device` with is dead (a dispatcher inside Kamailio ends a call nobody can join)."""
        self.settings = settings
        self.on_call_token_dead = on_call_token_dead
        self.consumer = consumer or default_consumer_name()
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.stop_timeout = stop_timeout
        self.stats_interval = stats_interval
        self._pool = pool
        self._owns_pool = pool is None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._room: asyncio.Future[None] | None = None  # the read loop waits for free job slots
        self._room_wanted = 1
        self._apps: OrderedDict[_AppKey, tuple[float, AppCredentials | None]] = OrderedDict()
        self._voip_only_warned: set[tuple[str, str]] = set()
        self._repeats: dict[_CallKey, dict[str, asyncio.Task[None]]] = {}  # call -> device id -> task
        self._repeat_tasks: set[asyncio.Task[None]] = set()
        self._cancels: dict[_CallKey, asyncio.Event] = {}  # cancel jobs in flight, set when done
        self._stopping = False
        self._app_reads: dict[_AppKey, asyncio.Future[AppCredentials | None]] = {}
        self._redis_down = False
        self._redis_back_at = -math.inf  # monotonic time Redis was last seen back after an outage
        self._outcomes = _OutcomeBuffer()
        self._metrics = MetricsBuffer()
        self._flush_lock = asyncio.Lock()
        # (job, device) pushes this process saw accepted: when Redis was down as the mark was
        # written, the job stays pending and comes back to us reclaimed; this keeps it from being
        # pushed twice (a reclaim by another process still relies on the marks in Redis)
        self._delivered: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._refresh_pushes: set[asyncio.Task[None]] = set()  # re-registration pushes in flight

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume jobs until `stop` is set, then stop reading, give in-flight jobs up to
        `stop_timeout` seconds to finish (unfinished ones stay pending for another dispatcher),
        and close the provider pool and Redis."""
        self._store = AsyncStore(self.settings.redis_url, self.settings)
        store = self._store

        async def write(items: list[_Write]) -> list[None]:
            await store.mark_sent_and_finish([m for m, _ in items if m is not None],
                                             [e for _, e in items if e is not None])
            return [None] * len(items)

        self._lookups: _Batcher[tuple[str, str, Sequence[str]], list[tuple[Device, bool]]] = _Batcher(
            store.job_devices_batch)
        # Sent marks and acks share one batcher, so a batch of them is one round trip.
        self._writes: _Batcher[_Write, None] = _Batcher(write)
        self._pool_in_use = self._pool or ProviderPool()
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        log.info("dispatcher %s: starting redis=%s stream=%s group=%s concurrency=%d reclaim_idle_ms=%d",
                 self.consumer, redact_url(self.settings.redis_url), self.settings.stream, self.settings.group,
                 self.settings.concurrency, self.settings.reclaim_idle_ms)
        background: list[asyncio.Task[None]] = []
        try:
            if await self._until_ok(stop, self._store.ensure_group):
                idle_s = self.settings.reclaim_idle_ms / 1000
                background = [
                    # refresh well within the idle limit so no sweep takes over live work
                    asyncio.create_task(self._every(stop, idle_s / 3, self._refresh)),
                    asyncio.create_task(self._every(stop, idle_s / 2, self._reclaim)),
                    asyncio.create_task(self._every(stop, self.stats_interval, self._log_stats)),
                    asyncio.create_task(self._every(stop, OUTCOME_FLUSH_SECONDS, self._flush_outcomes)),
                ]
                if self.settings.reregister_before > 0:
                    self._claimer = reregister.Claimer(store.client)
                    background.append(asyncio.create_task(
                        self._every(stop, reregister.SCAN_SECONDS, self._reregister)))
                await self._read_loop(stop)
        finally:
            await self._shutdown(background)

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        self._stopping = True  # no new repeats from the jobs still finishing
        for task in (*background, *self._repeat_tasks, *self._refresh_pushes):
            task.cancel()
        await asyncio.gather(*self._repeat_tasks, *self._refresh_pushes, return_exceptions=True)
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
        await self._lookups.aclose()
        await self._writes.aclose()
        try:
            await self._flush_outcomes()
        except StoreUnavailable as exc:
            log.warning("dispatcher %s: app outcome counters not written at stop: %s", self.consumer, exc)
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
            self._redis_back_at = time.monotonic()

    async def _every(self, stop: asyncio.Event, seconds: float, op: Callable[[], Awaitable[None]]) -> None:
        while not await _sleep_or_stop(stop, max(0.05, seconds)):
            try:
                await op()
            except StoreUnavailable as exc:
                self._redis_failed(exc)
            except RedisError as exc:  # READONLY, OOM...: passing server trouble, not a reason to stop
                log.error("dispatcher %s: redis refused %s: %s (retrying)", self.consumer,
                          getattr(op, "__name__", "a periodic task"), exc)
            except Exception:
                # The refresh, reclaim and flush loops must outlive any one failure: a stopped
                # refresh would let other dispatchers reclaim (and resend) this one's live jobs.
                log.exception("dispatcher %s: periodic task failed; it keeps running", self.consumer)

    # --- reading and reclaiming -----------------------------------------------------------------

    async def _read_loop(self, stop: asyncio.Event) -> None:
        backlog = False  # the last read filled its count, so more are probably waiting
        # Under a backlog, read only once this many slots are free: a read (and the device lookup
        # of the jobs it returns) costs about the same for 1 entry as for 25, so reading each
        # freed slot alone spent a round trip and a pipeline per job or two.
        batch = min(READ_BATCH, max(1, self.settings.concurrency // 4))
        while not stop.is_set():
            free = self.settings.concurrency - len(self._inflight)
            if free < (batch if backlog else 1):
                await self._room_for(batch if backlog else 1)
                continue
            count = min(free, READ_BATCH)
            try:
                # The cheap non-blocking read only under a backlog: when idle, an extra read
                # racing the job's own Redis calls costs latency for nothing.
                if backlog:
                    entries = await self._store.read_new_nowait(self.consumer, count)
                else:
                    entries = await self._store.read_new(self.consumer, count, READ_BLOCK_MS)
                backlog = len(entries) >= count
                self._redis_up()
            except StoreUnavailable as exc:
                self._redis_failed(exc)
                await _sleep_or_stop(stop, 1.0)
                continue
            except RedisError as exc:
                if "NOGROUP" in str(exc):
                    # Redis came back empty (restart without persistence, flush): recreate the
                    # group, or no job would ever be read again.
                    log.warning("dispatcher %s: consumer group missing, recreating it", self.consumer)
                    await self._until_ok(stop, self._store.ensure_group)
                else:
                    log.error("dispatcher %s: redis refused the read: %s (retrying)", self.consumer, exc)
                    await _sleep_or_stop(stop, 1.0)
                continue
            for entry_id, fields in entries:
                self._start(entry_id, fields)

    async def _reclaim(self) -> None:
        """Take over entries idle longer than reclaim_idle_ms (their consumer died or hung).
        Not right after a Redis outage: live owners could not refresh their entries during it,
        so they get a refresh interval to do so first."""
        if self._redis_down or time.monotonic() - self._redis_back_at < self.settings.reclaim_idle_ms / 2000:
            return
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

    async def _reregister(self) -> None:
        """Claim the devices whose re-registration push is due (`pushlib.reregister`: the claim
        removes them from the due set, so no other dispatcher pushes them) and push each once, in
        tasks of their own (a retried push must not hold up the next tick). Not straight from the
        job stream: a claimed device is pushed by the dispatcher that claimed it, at most once."""
        for _ in range(reregister.CLAIM_MAX_BATCHES):
            if len(self._refresh_pushes) >= self.settings.concurrency:
                return  # pushes still in flight: the rest stays due for the next tick
            claimed = await self._claimer.claim(time.time())
            for aor, device_id, due in claimed:
                task = asyncio.create_task(self._refresh_push(aor, device_id, due))
                self._refresh_pushes.add(task)
                task.add_done_callback(self._refresh_pushes.discard)
            if len(claimed) < reregister.CLAIM_BATCH:
                return

    async def _refresh_push(self, aor: str, device_id: str, due: float) -> None:
        try:
            now = time.time()
            probe = reregister.refresh_job(aor, device_id, due, now + 1, now)
            targets = await self._lookups.submit((aor, probe.job_id, (device_id,)))
            for device, sent in targets:
                if device.expires_at <= now:
                    continue  # the binding has expired: nothing to refresh, and no push
                job = reregister.refresh_job(aor, device_id, due, device.expires_at, now)
                await self._push(job, device, sent)
        except StoreUnavailable as exc:
            self._redis_failed(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatcher %s: re-registration push aor=%s device=%s failed", self.consumer, aor,
                          device_id)

    def _start(self, entry_id: str, fields: dict[str, str]) -> None:
        if entry_id in self._inflight:
            return
        task = asyncio.create_task(self._handle(entry_id, fields))
        self._inflight[entry_id] = task
        task.add_done_callback(lambda _t: self._job_done(entry_id))

    def _job_done(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)
        room = self._room
        if room is not None and not room.done() and \
                self.settings.concurrency - len(self._inflight) >= self._room_wanted:
            room.set_result(None)

    async def _room_for(self, slots: int) -> None:
        """Wait (at most a second: the caller checks for stop) until `slots` job slots are free.
        One future woken by the job tasks' done callbacks: `asyncio.wait` on every in-flight task
        added and removed a callback on each of them for every read."""
        self._room = asyncio.get_running_loop().create_future()
        self._room_wanted = slots
        try:
            await asyncio.wait_for(self._room, 1.0)
        except TimeoutError:
            pass
        finally:
            self._room = None

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
                job = schema.decode_job(fields)
            except schema.DecodeError as exc:
                self.stats["malformed"] += 1
                self._metrics.event("jobs_malformed")
                log.error("dispatcher: malformed stream entry %s dropped: %s", entry_id, exc)
                await self._writes.submit((None, entry_id))
                return
            cancel_done = self._call_ending(job)  # before any await: entries start in stream order
            try:
                await self._run_job(entry_id, job)
            finally:
                if cancel_done is not None:
                    cancel_done.set()
                    key = (job.aor, job.data.get("call_id", ""))
                    if self._cancels.get(key) is cancel_done:
                        del self._cancels[key]
        except StoreUnavailable as exc:
            self._redis_failed(exc)
        except RedisError as exc:
            # A server error (READONLY after a failover, OOM) is passing trouble: leave the entry
            # pending for a later reclaim instead of dropping a push for it.
            log.error("dispatcher: job entry %s left pending: redis refused a command: %s", entry_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["failed"] += 1
            self._metrics.event("jobs_failed")
            log.exception("dispatcher: job entry %s failed unexpectedly; dropped", entry_id)
            with contextlib.suppress(StoreUnavailable):
                await self._writes.submit((None, entry_id))

    async def _run_job(self, entry_id: str, job: PushJob) -> None:
        if job.deadline <= time.time():
            self.stats["deadline_dropped"] += 1
            self._metrics.event("jobs_deadline_dropped")
            log.info("push job=%s kind=%s aor=%s outcome=deadline_dropped (late by %.1fs when read)",
                     job.job_id, job.kind.value, job.aor, time.time() - job.deadline)
            await self._writes.submit((None, entry_id))
            return
        if job.kind is PushKind.MISSED_CALL:
            await self._after_cancel(job)
        targets = await self._lookups.submit((job.aor, job.job_id, job.device_ids))
        if not targets:
            log.info("push job=%s kind=%s aor=%s outcome=no_device", job.job_id, job.kind.value, job.aor)
        elif len(targets) == 1:  # the common case: no gather() wrapper task
            if await self._push(job, *targets[0], entry_id=entry_id):
                return  # acked in the same write as the push's mark
        else:
            await asyncio.gather(*(self._push(job, d, sent) for d, sent in targets))
        # After every mark of the job is written: an ack never outruns a mark.
        await self._writes.submit((None, entry_id))

    # --- the end of a call, alert-style call repeats --------------------------------------------

    def _call_ending(self, job: PushJob) -> asyncio.Event | None:
        """An end-of-call job (cancel, missed call) stops the call's alert repeats at once. For a
        cancel job: the event it sets when done (the same call's missed-call job waits for it)."""
        call_id = job.data.get("call_id", "")
        if job.kind not in _CALL_END_KINDS or not call_id:
            return None
        for task in self._repeats.get((job.aor, call_id), {}).values():
            task.cancel()
        if job.kind is not PushKind.CANCEL_INCOMING_CALL:
            return None
        done = asyncio.Event()
        self._cancels[(job.aor, call_id)] = done
        return done

    async def _after_cancel(self, job: PushJob) -> None:
        """Wait (up to push_timeout) until this dispatcher's in-flight cancel job of the same call
        is done: on a phone that shows the call as an alert, the cancel's "Call ended" alert and the
        missed-call alert share a collapse id, and the one sent last stays."""
        pending = self._cancels.get((job.aor, job.data.get("call_id", "")))
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.wait(), self.settings.push_timeout)

    def _repeat_later(self, job: PushJob, device: Device) -> None:
        """Schedule the repeats of an alert-style incomingCall just delivered to `device`."""
        every = self.settings.call_alert_repeat
        call_id = job.data.get("call_id", "")
        if self._stopping or not call_id or not every > 0:
            return
        devices = self._repeats.get((job.aor, call_id), {})
        if device.device_id in devices:
            return  # a reclaimed or repeated job: it repeats already
        if len(self._repeat_tasks) >= REPEAT_TASKS_MAX:
            log.warning("push job=%s aor=%s device=%s: %d call alerts repeating already, this one is not",
                        job.job_id, job.aor, device.device_id, len(self._repeat_tasks))
            return
        key = (job.aor, call_id)
        task = asyncio.create_task(self._repeat_call_alert(job, device, max(every, REPEAT_MIN_INTERVAL)))
        self._repeats.setdefault(key, {})[device.device_id] = task
        self._repeat_tasks.add(task)

        def forget(_task: asyncio.Task[None]) -> None:
            self._repeat_tasks.discard(task)
            tasks = self._repeats.get(key)
            if tasks is not None and tasks.get(device.device_id) is task:
                del tasks[device.device_id]
                if not tasks:
                    del self._repeats[key]

        task.add_done_callback(forget)

    async def _repeat_call_alert(self, job: PushJob, device: Device, every: float) -> None:
        """Send the alert-style incomingCall of `job` to `device` again every `every` seconds
        while the call is parked with the device not yet woken, until REPEAT_MIN_LEFT before the
        deadline (at most deadline / every times); stops at the first push that is not delivered
        and when Redis cannot tell the call's state."""
        parked = call_key(job.data["call_id"])
        provider, app_id = device.params.provider.value, device.params.app_id
        try:
            for repeat in range(1, int((job.deadline - time.time()) / every) + 1):
                await asyncio.sleep(every)
                now = time.time()
                if job.deadline - now < REPEAT_MIN_LEFT:
                    return
                state = await self._store.parked_device_state(job.aor, parked, device.device_id)
                app = await self._app(provider, app_id) if state == schema.PUSHED else None
                if app is None:  # the call ended, the device woke, or the app is gone
                    return
                request = build_apns(job.kind, device, dict(job.data), job.deadline, now, self.settings)
                if request is None or not is_alert_call(job.kind, request):
                    return
                self.stats["repeated"] += 1
                async with self._slots:
                    result = await self._pool_in_use.send(
                        app, device, request, min(self.settings.push_timeout, job.deadline - now)
                    )
                if result.outcome is Outcome.RETRYABLE:  # busy provider (429, 503): push less, not more
                    return self._final_line(job, device, "retryable", request, result.status,
                                            f"{result.reason} repeat={repeat}; repeats stopped".strip())
                await self._final(job, device, request, result, app.app_id, repeat=repeat)
                if result.outcome is not Outcome.DELIVERED:
                    return
        except (StoreUnavailable, RedisError) as exc:  # cannot tell whether the call still rings
            log.info("push job=%s aor=%s device=%s: call alert repeats stopped: %s",
                     job.job_id, job.aor, device.device_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("push job=%s aor=%s device=%s: call alert repeat failed; repeats stopped",
                          job.job_id, job.aor, device.device_id)

    # --- apps and devices -----------------------------------------------------------------------

    async def _app(self, provider: str, app_id: str) -> AppCredentials | None:
        """The credentials of the app a device names by `app_id`: the app's own id or one of its
        aliases (an alias's key holds a copy of its app: still one read, and the answer's `app_id`
        is the app's own). Cached per name for APP_CACHE_SECONDS (saves a Redis read per push);
        pushes that miss the cache together share one read instead of each reading the app."""
        now = time.monotonic()
        key = (provider, app_id)
        cached = self._apps.get(key)
        if cached is not None and cached[0] > now:
            self._apps.move_to_end(key)
            return cached[1]
        pending = self._app_reads.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._store.app(provider, app_id))
            self._app_reads[key] = pending
            pending.add_done_callback(lambda _f: self._app_reads.pop(key, None))
        # shield: one cancelled push must not cancel the read the others wait for
        app = await asyncio.shield(pending)
        self._apps[key] = (time.monotonic() + APP_CACHE_SECONDS, app)
        self._apps.move_to_end(key)
        while len(self._apps) > APP_CACHE_MAX:
            self._apps.popitem(last=False)
        return app

    def _warn_voip_only(self, job: PushJob, device: Device) -> None:
        """Once per device: an iOS device with a VoIP token only cannot get missed-call, cancel or
        other non-call pushes (Apple forbids VoIP pushes that report no call to CallKit)."""
        p = device.params
        if p.provider is not Provider.APNS or not p.voip_token or p.alert_token:
            return
        key = (device.aor, device.device_id)
        if key in self._voip_only_warned:
            return
        if len(self._voip_only_warned) >= 10_000:
            self._voip_only_warned.clear()
        self._voip_only_warned.add(key)
        log.warning("push job=%s kind=%s aor=%s device=%s: iOS device has a VoIP token only; Apple forbids "
                    "VoIP pushes that report no call, so it gets no %s (nor missed-call/cancel) pushes: "
                    "its app must also register a remote-notification token",
                    job.job_id, job.kind.value, device.aor, device.device_id, job.kind.value)

    async def _push(self, job: PushJob, device: Device, sent: bool, entry_id: str | None = None) -> bool:
        """Push one device to a final outcome, retrying RETRYABLE results until the deadline.
        `sent`: the (job, device) mark existed when the job's devices were read. `entry_id`: the
        job's stream entry when this is its only device: a delivered push's mark and the entry's
        ack are then written together; True when that happened (the caller acks otherwise)."""
        provider, app_id = device.params.provider.value, device.params.app_id
        if device.dead:  # a tombstone: every token died at the provider (AsyncStore.remove_token)
            self._final_line(job, device, "dead_skipped", None, "device dead: every token died")
            return False
        if device.quarantined_until > time.time():
            self._final_line(job, device, "quarantined_skipped", None, "device quarantined")
            return False
        app = await self._app(provider, app_id)
        if app is None:
            await self._store.record_app_error(provider, app_id, "no credentials stored for this app")
            self._final_line(job, device, "config_error", None, "no credentials for app")
            return False
        if sent or (job.job_id, device.device_id) in self._delivered:
            self._final_line(job, device, "already_sent", None, "provider accepted it before")
            return False
        build: _Builder = build_apns if device.params.provider is Provider.APNS else build_fcm
        attempt = 0
        while True:
            now = time.time()
            remaining = job.deadline - now
            if remaining <= 0:
                self._final_line(job, device, "deadline_dropped", None, "deadline passed")
                return False
            try:
                request = build(job.kind, device, dict(job.data), job.deadline, now, self.settings)
            except ValueError as exc:  # PayloadTooLarge: the job's own fields cannot fit
                self._final_line(job, device, "rejected", None, f"cannot build payload: {exc}")
                return False
            if request is None:
                self._warn_voip_only(job, device)
                self._final_line(job, device, "no_token", None, f"no token for {job.kind.value}")
                return False
            async with self._slots:
                result = await self._pool_in_use.send(
                    app, device, request, min(self.settings.push_timeout, remaining)
                )
            if result.outcome is not Outcome.RETRYABLE:
                acked = await self._final(job, device, request, result, app.app_id, entry_id=entry_id)
                if result.outcome is Outcome.DELIVERED and is_alert_call(job.kind, request):
                    self._repeat_later(job, device)
                return acked
            attempt += 1
            delay = backoff_delay(attempt, result.retry_after)
            if time.time() + delay >= job.deadline:
                self._final_line(job, device, "deadline_dropped", request,
                                 f"retryable {result.status} {result.reason}; no time left")
                return False
            self.stats["retried"] += 1
            log.debug("push job=%s device=%s retry %d in %.2fs after %s %s",
                      job.job_id, device.device_id, attempt, delay, result.status, result.reason)
            await asyncio.sleep(delay)

    async def _final(self, job: PushJob, device: Device, request: ApnsRequest | FcmMessage,
                     result: PushResult, app_id: str, repeat: int = 0, entry_id: str | None = None) -> bool:
        """Act on a final result. `app_id`: the app's own id (the device may name it by an alias):
        its status and counters are the app's, whatever name its devices use. `repeat`: the
        number of an alert-style incomingCall repeat (0: the job's own push). `entry_id`: ack this
        stream entry with the mark of a delivered push; True when that was done."""
        provider = device.params.provider.value
        outcome = result.outcome
        acked = False
        if not repeat and job.created_at > 0:  # a repeat's latency is its interval, not the provider's
            self._metrics.latency(provider, time.time() - job.created_at)
        if outcome is Outcome.DELIVERED and not repeat:
            # First, before anything else: this is the duplicate window.
            self._delivered[(job.job_id, device.device_id)] = None
            if len(self._delivered) > DELIVERED_MEMORY:
                self._delivered.popitem(last=False)
            await self._writes.submit(((job.aor, job.job_id, device.device_id), entry_id))
            acked = entry_id is not None
        elif outcome is Outcome.TOKEN_DEAD:
            if await self._store.remove_token(device.aor, device.device_id, request.token):
                self._metrics.event("dead_tokens_removed")
            if self.on_call_token_dead is not None and job.kind is PushKind.INCOMING_CALL and not repeat:
                try:
                    self.on_call_token_dead(job, device)
                except Exception:  # the hook's failure must not cost the job its ack
                    log.exception("push job=%s aor=%s device=%s: dead-token hook failed",
                                  job.job_id, job.aor, device.device_id)
        elif outcome is Outcome.DEVICE_SUSPECT:
            if await self._store.quarantine_device(device.aor, device.device_id):
                self._metrics.event("devices_quarantined")
        elif outcome is Outcome.CONFIG_ERROR:
            await self._store.record_app_error(provider, app_id, f"{result.status} {result.reason}".strip())
            # pick up fixed credentials at once (cached under the name the device uses)
            self._apps.pop((provider, device.params.app_id), None)
        self._outcomes.add(provider, app_id, outcome, time.time())
        if outcome is Outcome.DEVICE_SUSPECT:
            # The suspicion check compares bad pushes with all recent ones: write the app's
            # buffered outcomes with this one, now.
            await self._flush_outcomes((provider, app_id))
        name = "suspect" if outcome is Outcome.DEVICE_SUSPECT else outcome.value
        detail = f"{result.reason} repeat={repeat}".strip() if repeat else result.reason
        self._final_line(job, device, name, request, result.status, detail)
        return acked

    async def _flush_outcomes(self, check: _AppKey | None = None) -> None:
        """Write the buffered per-app outcomes (one round trip) and, for `check`, evaluate the
        environment suspicion. Serialised, so a check never misses entries of a flush still in
        flight; on a Redis outage the entries stay buffered (bounded) for the next flush."""
        async with self._flush_lock:
            counts, windows = self._outcomes.take()
            increments = self._metrics.take()
            if not counts and not increments and check is None:
                return
            try:
                await self._store.record_outcomes(counts, windows, [check] if check else [],
                                                  increments=increments)
            except StoreUnavailable:
                self._outcomes.put_back(counts, windows)
                self._metrics.put_back(increments)
                raise

    def _final_line(self, job: PushJob, device: Device, outcome: str,
                    request: ApnsRequest | FcmMessage | None, status: object, detail: str = "") -> None:
        """Count and log one final outcome of one device push (one line, token prefix only).
        `status` and `detail` are joined by a space in the line (either may be empty); the line
        costs nothing beyond a level check when its level is disabled."""
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        self._metrics.push(device.params.provider.value, job.kind.value, outcome)
        level = logging.INFO if outcome in _QUIET_OUTCOMES else logging.WARNING
        if not log.isEnabledFor(level):
            return
        params = device.params
        token = request.token if request is not None else (params.voip_token or params.alert_token)
        log.log(level, "push job=%s kind=%s aor=%s device=%s provider=%s outcome=%s status=%s token=%s",
                job.job_id, job.kind.value, job.aor, device.device_id, params.provider.value,
                outcome, f"{status} {detail}".strip(), token_prefix(token))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True when `stop` got set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# --- standalone entry point ---------------------------------------------------------------------


REDIS_URL_HELP = (
    "Redis URL (default: PUSHLIB_REDIS_URL, PUSHLIB_REDIS_URL_FILE, or redis://127.0.0.1:6379/0). "
    "A URL given here is visible in `ps`: when it holds a password use --redis-url-file or the "
    "environment instead"
)
REDIS_URL_FILE_HELP = (
    "read the Redis URL from this file (stripped; like PUSHLIB_REDIS_URL_FILE): keeps a password "
    "out of `ps` and of the environment"
)


def parse_args(argv: list[str] | None, defaults: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pushlib-dispatcher", description="Send queued SIP push jobs to APNs and FCM."
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    where.add_argument("--redis-url-file", default=None, metavar="PATH", help=REDIS_URL_FILE_HELP)
    parser.add_argument("--consumer", default=None, help="consumer name (default: host-pid-random)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--log-level", default=os.environ.get("PUSHLIB_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default: PUSHLIB_LOG_LEVEL or INFO); "
                             "httpx/httpcore/h2/hpack stay at WARNING whatever it is")
    return parser.parse_args(argv)


def redis_url_from_args(args: argparse.Namespace, defaults: Settings) -> str:
    """`--redis-url-file`, else `--redis-url`, else the URL of the environment's settings."""
    if args.redis_url_file:
        return read_redis_url_file(args.redis_url_file)
    return str(args.redis_url or defaults.redis_url)


async def _serve(settings: Settings, consumer: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Dispatcher(settings, consumer=consumer).run(stop)


def main(argv: list[str] | None = None) -> None:
    """Console script: settings from PUSHLIB_* variables, overridden by the flags."""
    try:
        defaults = Settings.from_env()
        args = parse_args(argv, defaults)
        setup_logging(args.log_level)
        settings = replace(defaults, redis_url=redis_url_from_args(args, defaults), concurrency=args.concurrency)
    except ValueError as exc:  # SettingsError (bad variable, unreadable URL file), unknown log level
        print(f"pushlib-dispatcher: {exc}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(_serve(settings, args.consumer))


if __name__ == "__main__":
    main()
