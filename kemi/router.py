"""Kamailio `app_python3` entry: the push-proxy router (KEMI mode and role mode).

Thin by design: it reads the SIP message and usrloc through `KSR`, asks `pushlib`
(params, calls, store, parked, credentials) what to do, and acts through `KSR`. Decisions live in
pushlib/calls.py and are unit-tested there.

KEMI mode (`cfgengine "python"`): Kamailio calls `ksr_request_route` and the other
`ksr_*` callbacks. Role mode (kamailio/pusher-role.cfg): a native cfg calls
`python_exec("pusher_register")` / `python_exec("pusher_invite")`; those methods hand their
verdict back in `$var(pusher)` ("done" = replied/relayed, "next" = the host continues).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import secrets
import site
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
site.addsitedir(
    str(_ROOT / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages")
)
for _path in (_ROOT, _ROOT / "kemi"):  # pushlib, and this router's sibling modules (ksrlog)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import KSR  # noqa: E402
import ksrlog  # noqa: E402
import ksrmessages  # noqa: E402
import ksrmetrics  # noqa: E402

from pushlib import access, calls, mwi, nodes, reregister, schema  # noqa: E402
from pushlib.credentials import Subscribers, route_secret  # noqa: E402

# Imported here, in the main process before Kamailio forks, on purpose: the tls module puts
# libssl's state in shared memory, so code that touches libssl (Python's _ssl under httpx) must be
# mapped at the same address in every process, or the TLS workers jump into unmapped memory.
from pushlib.dispatcher import Dispatcher  # noqa: E402
from pushlib.logutil import log_safe  # noqa: E402
from pushlib.messages import message_limits  # noqa: E402
from pushlib.models import Device, ParkedCall, PushJob, UaMapping  # noqa: E402
from pushlib.notify import push_capable  # noqa: E402
from pushlib.parked import ParkedCalls  # noqa: E402
from pushlib.redisconn import StoreUnavailable, sync_client  # noqa: E402
from pushlib.store import SyncStore  # noqa: E402
from pushlib.ttlcache import TtlCache  # noqa: E402

STOP = True  # the route answered or relayed the request: request routing ends here
NEXT = False  # the route did not apply: the next route of the pipeline runs

LOCATION = "location"
WAIT_TABLE = "pnwait"
PEND_TABLE = "pnpend"  # "<aor>|<device id>" -> the call keys it was pushed for, parked on this node
FALLBACK_TABLE = "pnfb"  # call key -> AOR of calls whose branches the window timer canceled for the fallback
MISSED_TABLE = "pnmiss"  # call key -> AOR of unparked calls to users with push devices (missed-call owed)
BRANCH_TABLE = "pnbranch"  # "<call key>|<branch index>" -> URI rung (calls watched for silence)
BRANCH_MARK_TTL = 60  # s: longer than PUSH_ON_SILENCE, the only time the marks are read
BRANCH_COUNT_TABLE = "pnbr"  # call key -> device branches of a parked call still open
MISSED_MARK_TTL = 300  # s: longer than any ringing (fr_inv_timer 120 s)
PARKED_TABLE = "pnpark"  # AOR -> calls parked for it on this node now (MAX_PARKED_PER_USER)
PUSH_RATE_TABLE = "pnrate"  # access.push_bucket -> call pushes to a device this minute
BAN_TABLE = "ipban"  # source address -> banned by pike until the entry expires
WOKEN_TABLE = "pnwoken"  # call key -> devices that joined the call while Redis could not record it
RETRY_TABLE = "pnretry"  # "<call key>|<attempt>" -> calls.OwedEnd: an ended call's Redis work, retried
UNREACHABLE_TABLE = "pnunreach"  # call key -> pushed devices whose call push hit a dead token
OVERLOAD_PIPE = "pn-new-calls"  # pipelimit pipe of initial INVITEs (MAX_CPS)
OVERLOAD_RETRY_AFTER = 5  # s a caller shed for overload is asked to wait
SERVED_CACHE_SIZE = 4096  # domain names a worker remembers as served or not (Router._served)
WINDOW_BACKSTOP = 1  # s after the window: the htable timer ends calls whose devices still ring
FAILURE_ROUTE = "ksr_failure_route"
BRANCH_FAILURE_ROUTE = "ksr_branch_failure"  # role mode: event_route[tm:branch-failure:ksr_branch_failure]
PARK_PREFIX = "pn-park-"
# WITH_CLUSTER: on a replicated REGISTER, the ids the device had before (Router._replicate_register)
EVICTED_HEADER = "X-Pusher-Evicted"
_MAPPING_TTL = 10.0
_LEGACY_NOTICE_TTL = 3600.0  # one "legacy-params-no-ua-mapping" notice per AOR and hour
_HA1_TTL = 5.0  # a changed password applies within this many seconds
_APP_TTL = 10.0  # an app added, disabled or removed applies to REGISTERs within this many seconds
_END_NOW_DELAY = 0.03  # s an async task waits before ending a rejected call (see ksr_end_now)


def _get_def(name: str) -> str | None:
    if KSR.kx.ifdef(name) <= 0:
        return None
    value = KSR.kx.get_def(name)
    return "" if value is None else str(value)


def _unquoted_def(name: str) -> str | None:
    value = _get_def(name)
    return None if value is None else value.strip().strip('"')


def _int_def(name: str, default: int) -> int:
    value = (_unquoted_def(name) or "").strip()
    return int(value) if value.isascii() and value.isdigit() else default


def _set_debug_level(value: str | None) -> None:
    global _debug_level, _LEVELS
    text = (value or "").strip()
    _debug_level = int(text) if text.lstrip("-").isdigit() else 2
    named = {"dbg": 3, "info": 2, "notice": 1, "warn": 0, "err": -1, "crit": -2}
    _LEVELS = {getattr(KSR, name): level for name, level in named.items() if hasattr(KSR, name)}


_LEVELS: dict[Callable[[str], Any], int] = {}


def _pv(name: str) -> str:
    try:
        value = KSR.pv.get(name)
    except UnicodeDecodeError:
        return _pv_raw(name)
    return "" if value is None else str(value)


def _clean_uris(*names: str) -> bool:
    """True when every named value is absent or valid UTF-8 without a NUL."""
    for name in names:
        try:
            value = KSR.pv.get(name)
        except UnicodeDecodeError:
            return False
        if value is not None and "\x00" in str(value):
            return False
    return True


def _pv_raw(name: str) -> str:
    """A value that is not UTF-8 (a client sent raw bytes, e.g. in its Contact): fetched
    hex-encoded and decoded with surrogateescape, so the pure parsers see and reject the bad
    bytes (400) instead of the route dying with no reply. Loggers must sanitize it."""
    inner = name[2:-1] if name.startswith("$(") else name[1:]
    hexa = KSR.pv.get(f"$({inner}{{s.encode.hexa}})")
    try:
        return bytes.fromhex(str(hexa or "")).decode("utf-8", "surrogateescape")
    except ValueError:
        return ""


# Kamailio's debug level (LOG_LEVEL) as read in each process: lines above it are not even built,
# the hot path at LOG_LEVEL 1 formats nothing for its info lines
_debug_level = 2


def _log(level: Callable[[str], Any], event: str, **fields: object) -> None:
    if _LEVELS.get(level, 0) > _debug_level:
        return
    # every value may come from the SIP message: one line per event, whatever it holds
    details = " ".join(f"{k}={log_safe(str(v))}" for k, v in fields.items())
    level(f"pusher: {event} {details}\n")


_TOKENISH = re.compile(r"([A-Za-z0-9_-]{8})[A-Za-z0-9_:.-]{16,}")


def _error_text(exc: BaseException) -> str:
    """An exception for a log line: type and first line, cut, with every long token-like run
    (a push token in a URL or Contact the message may quote) shortened to its first 8 chars."""
    text = str(exc)
    first = _TOKENISH.sub(r"\1…", text.splitlines()[0][:200] if text else "")
    return f"{type(exc).__name__}: {first}"


def _crashed(where: str, exc: Exception) -> None:
    """One line for an exception a route did not expect (a bug, or a Redis error not mapped to
    the *Unavailable types)."""
    _log(KSR.err, "route-error", where=where, error=_error_text(exc))


def _answer_500() -> None:
    """Last-resort final reply: stateful when the request already has a transaction (a parked
    INVITE), stateless otherwise; a request already answered just makes this fail."""
    with contextlib.suppress(Exception):  # nothing more can be done for this request
        KSR.sl.send_reply(500, "Server Internal Error")


def mod_init() -> Router:
    router = Router()
    refusal = router.startup_refusal()
    if refusal:
        KSR.err(f"pusher: {refusal}\n")
        raise SystemExit(refusal)  # app_python3 fails its mod_init: Kamailio does not start
    router.load_route_secret()
    return router


class Router:
    """All KEMI callbacks of the push proxy."""

    def __init__(self) -> None:
        self.cfg = calls.proxy_config(_get_def)
        self._pid = 0
        self._store: SyncStore | None = None
        self._state: ParkedCalls | None = None
        self._subscribers: Subscribers | None = None
        self._voicemail: mwi.VoicemailStore | None = None
        self._mappings: TtlCache[str, list[UaMapping]] = TtlCache(_MAPPING_TTL, 1)
        self._legacy_logged: TtlCache[str, bool] = TtlCache(_LEGACY_NOTICE_TTL, 10_000)
        self._store_down_until = 0.0  # (monotonic) pnretry attempts wait until then: see _retry_owed_end
        self._ha1_cache: TtlCache[tuple[str, str], str | None] = TtlCache(_HA1_TTL, 10_000)
        self._app_cache: TtlCache[tuple[str, str], bool | None] = TtlCache(_APP_TTL, 1_000)
        self.limits = access.limits_from(_get_def)
        self.served = access.served_domains(_unquoted_def("LOCAL_DOMAINS"))
        self._served_cache: dict[str, bool] = {}
        self.role = KSR.kx.ifdef("PUSHER_ROLE") > 0
        # async task route that ends a rejected call at once: a Python method in KEMI mode, the
        # native route of kamailio/pusher-role.cfg in role mode
        self._end_now_route = "PUSHER_END_NOW" if self.role else "ksr_end_now"
        # (a native config names the event route in full; KEMI names the Python method)
        self._branch_failure_route = f"tm:branch-failure:{BRANCH_FAILURE_ROUTE}" if self.role else BRANCH_FAILURE_ROUTE
        # role mode: the host's own tm routes and flags for the calls the role relays (its
        # PUSHER_HOST_* defines, see kamailio/pusher-role.cfg); its failure route then calls ours
        host = _unquoted_def if self.role else (lambda name: None)
        self._host_branch_route = host("PUSHER_HOST_BRANCH_ROUTE") or ""
        self._host_reply_route = host("PUSHER_HOST_REPLY_ROUTE") or ""
        self._failure_route_name = host("PUSHER_HOST_FAILURE_ROUTE") or FAILURE_ROUTE
        self._host_refusal: str | None = None
        try:
            self._host_flags = calls.host_call_flags(host("PUSHER_HOST_CALL_FLAGS"))
        except ValueError as exc:
            self._host_flags, self._host_refusal = (), str(exc)
        self._route_secret = secrets.token_bytes(32)  # replaced by the deployment's (load_route_secret)
        # who may send RFC 3842 message summaries (NOTIFY) that push users: nobody unless listed
        try:
            self.vm_sources, self._vm_refusal = mwi.parse_sources(_unquoted_def("VOICEMAIL_SOURCES")), ""
        except ValueError as exc:
            self.vm_sources, self._vm_refusal = (), str(exc)
        # WITH_CLUSTER: the other nodes (kamailio.cfg), trusted by source address only: they
        # authenticated what they replicate, and only they may route to a device by a Path
        self.cluster = KSR.kx.ifdef("WITH_CLUSTER") > 0
        try:
            self.cluster_nodes, self._cluster_refusal = mwi.parse_sources(_unquoted_def("CLUSTER_NODES"),
                                                                          "CLUSTER_NODES"), ""
        except ValueError as exc:
            self.cluster_nodes, self._cluster_refusal = (), str(exc)
        if self.cluster and not self.cluster_nodes and not self._cluster_refusal:
            self._cluster_refusal = "WITH_CLUSTER needs CLUSTER_NODES (every node's address)"
        # this run of this node (made before the fork: every process of the node shares it)
        self.node = nodes.node_id(_unquoted_def("CLUSTER_ADDRESS") or "") if self.cluster else ""
        self._book: nodes.NodeBook | None = None
        self._tick_failed_logged = 0.0
        self.pike = _int_def("PIKE_DENSITY", 40) > 0
        self.ban_time = _int_def("BAN_TIME", 300)
        self.register_tls_only = KSR.kx.ifdef("REGISTER_TLS_ONLY") > 0
        self.fail_open_invite = KSR.kx.ifdef("AUTH_FAIL_OPEN_INVITE") > 0
        self._shed_logged = 0.0
        # KEMI mode listens on TCP at SIP_PORT on every address it listens on (kamailio.cfg)
        self._park_tcp_port = "" if self.role else (_unquoted_def("SIP_PORT") or "5060")
        self.metrics = ksrmetrics.KsrMetrics.from_defines(KSR, _get_def)
        # MESSAGE to sleeping devices (kemi/ksrmessages.py): queued, pushed, delivered on REGISTER
        self.messages = ksrmessages.MessageRoutes(
            self.cfg, message_limits(_get_def), lambda: self.store.client, lambda aor: self.store.devices(aor),
            lambda job: self.store.enqueue(job), self._bindings, self._disconnected, _pv, _log)

    def load_route_secret(self) -> None:
        """In the main process, before the fork, so that every worker signs and checks Record-Route
        with one key: the deployment's, from Redis (a dialog then survives a restart and may go on
        through another node); with Redis down at start, a key of this run only."""
        client = sync_client(self.cfg.settings.redis_url, timeout=2.0)
        try:
            self._route_secret = route_secret(client)
        except StoreUnavailable as exc:
            _log(KSR.warn, "route-secret-unavailable", error=exc,
                 effect="dialogs set up now end with this run of Kamailio")
        finally:
            client.close()  # no socket may cross the fork

    def _record_route(self) -> None:
        """record_route() with the dialog's signature (access.dialog_signature) as a parameter."""
        sig = access.dialog_signature(self._route_secret, _pv("$ci"))
        KSR.rr.add_rr_param(f";{access.DIALOG_PARAM}={sig}")
        KSR.rr.record_route()

    def _dialog_ours(self) -> bool:
        """After loose_route(): whether the Route it consumed (the first: ours, with double
        Record-Route both carry the parameter) names us and carries our signature of this Call-ID."""
        route = _pv("$route_uri")
        return access.route_signed(route, self._route_secret, _pv("$ci")) and KSR.is_myself(route) > 0

    def startup_refusal(self) -> str | None:
        """Why this configuration must not run (auth off on a public address), or None."""
        if self._vm_refusal:
            return self._vm_refusal
        if self._cluster_refusal and self.cluster:
            return self._cluster_refusal
        if self.role:
            return self._host_refusal  # the host config authenticates, and owns its listen addresses
        return access.insecure_start_refusal(
            self.cfg.auth, _unquoted_def("LISTEN_IP"), KSR.kx.ifdef("ALLOW_INSECURE") > 0
        )

    # ------------------------------------------------------------------ process-local clients

    def child_init(self, rank: int) -> int:
        # every process (SIP workers, timers running the htable event): its logging goes to Kamailio
        ksrlog.install(KSR, _get_def("LOG_LEVEL"))
        _set_debug_level(_get_def("LOG_LEVEL"))
        if rank > 0:
            if self.cfg.pusher:
                self._warm_up()
            # what is loaded by now lives as long as the worker: out of the collector's sight, so
            # its collections walk only what requests allocate
            gc.freeze()
            _log(KSR.info, "ready", rank=rank, pusher=self.cfg.pusher, auth=self.cfg.auth)
        return 0

    def _warm_up(self) -> None:
        """Open this worker's Redis connections, load its scripts and UA mappings now, so the first
        call it routes does not pay for them; Redis being down here is not an error (requests retry
        and fail fast on their own)."""
        try:
            self.store.ping()
            self.state.warm_up()
            self._ua_mappings()
        except StoreUnavailable as exc:
            _log(KSR.warn, "redis-unavailable-at-start", error=exc)

    def _connect(self) -> None:
        import os

        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        settings = self.cfg.settings
        self._store = SyncStore(settings.redis_url, settings)
        self._state = ParkedCalls(self._store.client)  # one connection pool per process
        self._subscribers = Subscribers(self._store.client)
        self._voicemail = mwi.VoicemailStore(self._store.client)
        self._book = nodes.NodeBook(self._store.client, self.node)

    @property
    def store(self) -> SyncStore:
        self._connect()
        assert self._store is not None
        return self._store

    @property
    def state(self) -> ParkedCalls:
        self._connect()
        assert self._state is not None
        return self._state

    @property
    def book(self) -> nodes.NodeBook:
        self._connect()
        assert self._book is not None
        return self._book

    @property
    def voicemail(self) -> mwi.VoicemailStore:
        self._connect()
        assert self._voicemail is not None
        return self._voicemail

    @property
    def subscribers(self) -> Subscribers:
        self._connect()
        assert self._subscribers is not None
        return self._subscribers

    def _ua_mappings(self) -> list[UaMapping]:
        try:
            return self._mappings.get_or_load("all", self.store.ua_mappings)
        except StoreUnavailable as exc:
            _log(KSR.warn, "ua-mappings-unavailable", error=exc)
            return self._mappings.get("all", [], stale_ok=True)

    # ------------------------------------------------------------------ request pipeline

    def ksr_request_route(self, msg: object) -> int:
        try:
            self._request_pipeline()
        except Exception as exc:
            # a held REGISTER or a parked INVITE must still get a final response
            _crashed("request", exc)
            _answer_500()
        return 1

    def _request_pipeline(self) -> None:
        pipeline = (
            self.route_parking,
            self.route_cluster,
            self.route_flood,
            self.route_reqinit,
            self.route_natdetect,
            self.route_cancel,
            self.route_withindlg,
            self.route_retransmission,
            self.route_overload,
            self.route_domain,
            self.route_auth,
            self.route_mwi,
            self.route_register,
            self.route_invite,
            self.route_message,
            self.route_location,
        )
        for step in pipeline:
            if step():
                break

    def _from_node(self) -> bool:
        return self.cluster and mwi.source_allowed(_pv("$si"), self.cluster_nodes)

    def route_cluster(self) -> bool:
        """WITH_CLUSTER: what the other nodes send. DMQ's own messages (KDMQ) only from a node,
        else dropped: a stranger must not join the cluster and receive every REGISTER. A node's
        replicated REGISTER (route_replica_register) and its INVITE to a device connected here
        (route_to_flow) skip flood, auth and domain checks: the node did them. A REGISTER from
        anyone else must not carry a Path: with use_path on, a device could make every node send
        its calls to any address it names."""
        if not self.cluster:
            return NEXT
        from_node = self._from_node()
        if KSR.is_method("KDMQ"):
            if from_node:
                KSR.dmq.handle_message()
            else:
                _log(KSR.notice, "dmq-not-from-node", src=f"{_pv('$si')}:{_pv('$sp')}")
            return STOP
        if not from_node:
            if KSR.is_REGISTER() and KSR.hdr.is_present("Path") > 0:
                _log(KSR.notice, "register-rejected", code=403, reason="path", src=_pv("$si"))
                KSR.sl.sl_send_reply(403, "Path Not Allowed")
                return STOP
            return NEXT
        if KSR.is_REGISTER():
            self.route_replica_register()
            return STOP
        if KSR.siputils.has_totag() < 0 and not KSR.is_CANCEL() and not KSR.is_ACK():
            self.route_to_flow()
            return STOP
        return NEXT  # in-dialog requests, CANCELs: as anyone's (signed Record-Route, tm)

    def route_replica_register(self) -> None:
        """A REGISTER another node took and replicated (dmq_t_replicate): it authenticated it,
        stored the device in Redis and answered the device. Here the binding is saved with that
        node's Path, so calls from here reach the device through it, and a call parked here for
        the device is resumed now (tsilo), through that node."""
        aor = calls.aor_of(_pv("$tU"), _pv("$td"))
        if not self.cfg.pusher:
            self._save()
            return
        plan = calls.plan_register(aor, _pv("$ct"), _pv("$hdr(Expires)") or None, _pv("$ua"),
                                   self._ua_mappings(), self._app_enabled, self.limits, time.time())
        if isinstance(plan, calls.RegisterReply):
            # (the node accepted it; a refusal here means the two disagree, e.g. an app just disabled)
            _log(KSR.notice, "replica-register-rejected", code=plan.code, aor=aor, node=_pv("$si"))
            KSR.sl.sl_send_reply(plan.code, plan.reason)
            return
        if not self._save() or not isinstance(plan, calls.SaveDevice):
            return
        evicted = [d for d in _pv(f"$hdr({EVICTED_HEADER})").split(",") if d]
        self._drop_stale_bindings(aor, plan.device.device_id, plan.device.contact, evicted)
        for device_id in (plan.device.device_id, *evicted):
            self._resume(aor, device_id)

    def route_to_flow(self) -> None:
        """An initial request another node sends for a device connected here (its binding there
        has our Path). tsilo's resume sends it with our Path entry as its Route, whose received
        parameter names the device's address (path use_received); the router's own ringing
        sends it to us with the device's Contact as request URI, and our binding of that
        Contact says where the device is. Either way it goes out over the device's own flow
        (TCP/TLS connection, NAT pinhole)."""
        route = _pv("$hdr(Route)")
        if route:
            if KSR.is_myself(calls.first_route_uri(route)) < 0:
                _log(KSR.notice, "node-route-refused", method=_pv("$rm"), src=_pv("$si"))
                KSR.sl.sl_send_reply(403, "Route Not Recognized")
                return
            # (-1 once our Route, the only one, is consumed: rr's "not route driven", expected)
            KSR.rr.loose_route()
        else:
            ours = [b for b in self._bindings(calls.aor_of(_pv("$tU"), _pv("$td"))) if b.uri == _pv("$ru")]
            if not ours:
                KSR.sl.sl_send_reply(404, "Not Found")
                return
            if ours[0].received:
                KSR.pv.sets("$du", ours[0].received)
        if KSR.is_INVITE():
            self._record_route()
        self._relay()

    def _replicate_register(self, evicted: list[str] | None = None) -> None:
        """WITH_CLUSTER: send this REGISTER, once saved and answered, to the other nodes
        (dmq_t_replicate) with a Path back to us carrying the device's address when we use it.
        After the answer, not before: the replication makes a transaction, and tm then refuses
        the registrar's stateful 200 (seen: "failed to reply stateful"). A retransmission of the
        REGISTER is absorbed by that transaction while it lives (a few seconds: the nodes answer
        at once), and answered again after it."""
        if not self.cluster:
            return
        # A wake on this node (tsilo appending to a parked INVITE, in this process) leaves the
        # request URI marked as used, and tm would then find nothing to replicate ("no branches
        # for forwarding"): setting it again marks it new.
        KSR.pv.sets("$ru", _pv("$ru"))
        KSR.textops.remove_hf(EVICTED_HEADER)  # (the other nodes trust only ours)
        if evicted:
            # the same phone under its old ids (only Redis knew): the other nodes resume the calls
            # they parked for those ids to it, and drop their bindings, as this node did
            KSR.hdr.append(f"{EVICTED_HEADER}: {','.join(evicted)}\r\n")
        # the device's address only where this node uses it too (NAT detected: route_natdetect)
        if _pv("$avp(RECEIVED)"):
            KSR.path.add_path_received()
        else:
            KSR.path.add_path()
        if KSR.dmq.t_replicate_mode(1) < 0:
            _log(KSR.err, "replicate-failed", aor=_pv("$tu"))

    def route_parking(self) -> bool:
        """Our own parking branches (see _park): swallowed, never answered. tm kills the branch
        (no CANCEL: it never got a reply) when the parked INVITE gets its final reply."""
        if _pv("$rU").startswith(PARK_PREFIX) and KSR.is_myself_srcip() > 0:
            return STOP
        return NEXT

    def route_flood(self) -> bool:
        """Per-source request rate (pike): a source above PIKE_DENSITY is ignored for BAN_TIME.
        Dropped without a reply, so a flood costs us one lookup and gets nothing back. The
        proxy's own addresses are exempt (its parking branches, local tools)."""
        if not self.pike or KSR.is_myself_srcip() > 0 or self._from_node():
            return NEXT
        src = _pv("$si")
        if KSR.htable.sht_get(BAN_TABLE, src) is not None:
            return STOP
        if KSR.pike.pike_check_req() < 0:
            KSR.htable.sht_setxi(BAN_TABLE, src, 1, self.ban_time)
            _log(KSR.warn, "source-banned", src=src, seconds=self.ban_time, method=_pv("$rm"))
            return STOP
        return NEXT

    def route_domain(self) -> bool:
        """Requests for domains we do not serve are refused before anything is read or stored:
        a REGISTER by its To and request URI, other initial requests by their request URI."""
        if KSR.is_REGISTER():
            return self._refuse_register()
        if KSR.is_ACK() or KSR.is_CANCEL():
            return NEXT
        if not self._served(_pv("$rd")):
            _log(KSR.notice, "foreign-domain", method=_pv("$rm"), domain=_pv("$rd"), src=_pv("$si"))
            KSR.sl.sl_send_reply(403, "Relaying Forbidden")
            return STOP
        return NEXT

    def _refuse_register(self) -> bool:
        """STOP (answered) a REGISTER this proxy must not take: a foreign domain, or not over TLS
        when REGISTER_TLS_ONLY is set."""
        if self.register_tls_only and _pv("$pr").lower() not in ("tls", "wss"):
            _log(KSR.notice, "register-rejected", code=403, reason="not-tls", src=_pv("$si"))
            KSR.sl.sl_send_reply(403, "REGISTER Requires TLS")
            return STOP
        for domain in (_pv("$td"), _pv("$rd")):
            if not self._served(domain):
                _log(KSR.notice, "register-rejected", code=403, reason="foreign-domain", domain=domain,
                     src=_pv("$si"))
                KSR.sl.sl_send_reply(403, "Domain Not Served")
                return STOP
        return NEXT

    def _served(self, domain: str) -> bool:
        """Cached per worker (a call asks about 4 times; Kamailio's own names do not change while
        it runs), up to SERVED_CACHE_SIZE names, so a flood of made-up domains cannot grow it."""
        known = self._served_cache.get(domain)
        if known is None:
            known = access.is_served(domain, self.served, lambda host: KSR.is_myself(f"sip:{host}") > 0)
            if len(self._served_cache) < SERVED_CACHE_SIZE:
                self._served_cache[domain] = known
        return known

    def route_reqinit(self) -> bool:
        if self.metrics.enabled and self.metrics.non_http_on_metrics_port(KSR.pv.geti("$Rp") or 0):
            KSR.sl.sl_send_reply(403, "Not A SIP Port")
            return STOP
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return STOP
        if KSR.sanity.sanity_check(17895, 7) < 0:
            _log(KSR.err, "malformed-request", src=f"{_pv('$si')}:{_pv('$sp')}")
            return STOP
        if not _clean_uris("$ru", "$fu", "$tu", "$ci"):
            # RFC 3261 URIs (and Call-IDs) are UTF-8 without NULs; anything else would reach Redis
            # keys, usrloc and the KSR calls (which cannot take a NUL) as garbage
            _log(KSR.notice, "malformed-request", src=f"{_pv('$si')}:{_pv('$sp')}", reason="uri-bytes")
            KSR.sl.sl_send_reply(400, "Bad Request (Invalid URI Bytes)")
            return STOP
        if KSR.is_OPTIONS() and not _pv("$rU"):
            KSR.sl.sl_send_reply(200, "Keepalive")
            return STOP
        return NEXT

    def route_natdetect(self) -> bool:
        KSR.force_rport()
        if KSR.nathelper.nat_uac_test(19) > 0:
            if KSR.is_REGISTER():
                KSR.nathelper.fix_nated_register()
            elif KSR.siputils.is_first_hop() > 0:
                KSR.nathelper.set_contact_alias()
        return NEXT

    def route_cancel(self) -> bool:
        if not KSR.is_CANCEL():
            return NEXT
        if KSR.tm.t_check_trans() > 0 and not self._cancel_parked():
            KSR.tm.t_relay()
        return STOP

    def _cancel_parked(self) -> bool:
        """The caller hung up: a parked INVITE is answered 487 by us (its unreplied parking
        branch would keep it open; tm cancels its real branches with that final reply)."""
        key = calls.call_key(_pv("$ci"))
        if not self.cfg.pusher or calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key)) is None:
            return False
        self._end_parked(key, reason=calls.end_reason(487), reply=487)
        KSR.sl.sl_send_reply(200, "Canceling")
        return True

    def route_withindlg(self) -> bool:
        if KSR.siputils.has_totag() < 0:
            return NEXT
        if KSR.rr.loose_route() > 0:
            if not self._dialog_ours():
                # a To tag and a Route naming us do not make a dialog we record-routed: refused,
                # so nobody can use the proxy to send requests anywhere
                _log(KSR.notice, "dialog-not-ours", method=_pv("$rm"), src=f"{_pv('$si')}:{_pv('$sp')}")
                if not KSR.is_ACK():
                    KSR.sl.sl_send_reply(403, "Dialog Not Recognized")
                return STOP
            if KSR.is_INVITE():
                self._record_route()
            if not _pv("$du"):
                # we are the last proxy: the request URI's alias is the device's flow here. With a
                # Route left (another node's, WITH_CLUSTER), that node holds the flow and the alias
                KSR.nathelper.handle_ruri_alias()
            self._relay()
            return STOP
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                self._relay()
            return STOP
        KSR.sl.sl_send_reply(404, "Not here")
        return STOP

    def route_retransmission(self) -> bool:
        if KSR.tmx.t_precheck_trans() > 0:
            KSR.tm.t_check_trans()
            return STOP
        if KSR.tm.t_check_trans() == 0:
            return STOP
        return NEXT

    def route_overload(self) -> bool:
        """New calls above MAX_CPS per second get 503 with Retry-After before any work is spent on
        them (pipelimit TAILDROP, shared by the workers): excess load is shed early and cheaply,
        and the calls already accepted (and every wake-up REGISTER) keep the node's capacity.
        One log line per second per worker at most: a flood must not flood the log."""
        limit = self.limits.max_calls_per_second
        if not limit or not KSR.is_INVITE():
            return NEXT
        if KSR.pipelimit.pl_check_limit(OVERLOAD_PIPE, "TAILDROP", limit) != -1:
            return NEXT
        now = time.monotonic()
        if now - self._shed_logged >= 1.0:
            self._shed_logged = now
            _log(KSR.warn, "overload-shed", limit=limit, src=_pv("$si"))
        KSR.hdr.append_to_reply(f"Retry-After: {OVERLOAD_RETRY_AFTER}\r\n")
        KSR.sl.sl_send_reply(503, "Overloaded")
        return STOP

    def route_auth(self) -> bool:
        # (a MESSAGE is authenticated as an INVITE is: its From, when it claims a local user)
        if not self.cfg.auth or not (KSR.is_REGISTER() or KSR.is_INVITE() or KSR.is_method("MESSAGE")):
            return NEXT
        register = KSR.is_REGISTER()
        user, domain = (_pv("$tU"), _pv("$td")) if register else (_pv("$fU"), _pv("$fd"))
        realm = self.cfg.realm or domain
        from_served = register or self._served(domain)
        ha1: str | None = None
        store_up = True
        if from_served:  # (credentials exist for served domains only: no lookup for others)
            try:
                ha1 = self._ha1(user, domain)
            except StoreUnavailable as exc:
                _log(KSR.err, "auth-store-unavailable", user=user, method=_pv("$rm"), error=exc)
                store_up = False
        verdict = access.auth_precheck(register, ha1 is not None, store_up, from_served, self.fail_open_invite)
        if verdict is None:
            assert ha1 is not None
            verdict = access.auth_result(KSR.auth.pv_auth_check(realm, ha1, 1, 1))
        if verdict is access.AuthVerdict.PASS:
            KSR.auth.consume_credentials()
            return NEXT
        if verdict is access.AuthVerdict.SKIP:
            return NEXT
        if verdict is access.AuthVerdict.UNAVAILABLE:
            KSR.hdr.append_to_reply("Retry-After: 5\r\n")
            KSR.sl.sl_send_reply(503, "Credentials Store Unavailable")
            return STOP
        if KSR.auth.has_credentials(realm) > 0:
            # one line whether or not the user exists; the reply is the same challenge too
            _log(KSR.notice, "auth-failed", user=user, src=f"{_pv('$si')}:{_pv('$sp')}", verdict=verdict.value)
        KSR.auth.auth_challenge(realm, access.challenge_flags(verdict))
        return STOP

    def _ha1(self, user: str, domain: str) -> str | None:
        """Subscriber HA1 (None: not a local user), cached per worker for _HA1_TTL seconds: the
        challenged REGISTER fills the cache the authenticated one (the wake-up path) reads."""
        return self._ha1_cache.get_or_load((user, domain), lambda: self.subscribers.ha1(user, domain))

    # ------------------------------------------------------------------ voicemail (RFC 3842 MWI)

    def route_mwi(self) -> bool:
        """A voicemail server's message summary (NOTIFY, Event: message-summary) for a user with
        push devices: answered 200 here, and a rise in new voice messages pushes voicemailReceived
        (pushlib.mwi). Only VOICEMAIL_SOURCES may send one (403 for anyone else: a stranger must not
        make us push any user). Not forwarded to the user's bindings: the push carries the counts
        and reaches awake and sleeping apps alike. A user without a push device: NEXT (the summary
        is relayed to the bindings, as any other request)."""
        if not self.cfg.pusher or _pv("$rm") != "NOTIFY":
            return NEXT
        if _pv("$hdr(Event)").split(";", 1)[0].strip().lower() != mwi.EVENT:
            return NEXT
        aor = calls.aor_of(_pv("$rU"), _pv("$rd"))
        src = _pv("$si")
        if not mwi.source_allowed(src, self.vm_sources):
            _log(KSR.notice, "mwi-refused", aor=aor, src=src, reason="not-a-voicemail-source")
            KSR.sl.sl_send_reply(403, "Forbidden (Not A Voicemail Server)")
            return STOP
        if _pv("$cT").split(";", 1)[0].strip().lower() != mwi.CONTENT_TYPE:
            _log(KSR.notice, "mwi-refused", aor=aor, src=src, reason="content-type", type=_pv("$cT")[:60])
            KSR.hdr.append_to_reply(f"Accept: {mwi.CONTENT_TYPE}\r\n")
            KSR.sl.sl_send_reply(415, "Unsupported Media Type")
            return STOP
        try:
            summary = mwi.parse_summary(_pv("$rb"))
        except mwi.MwiError as exc:
            _log(KSR.notice, "mwi-refused", aor=aor, src=src, reason="malformed", error=exc)
            KSR.sl.sl_send_reply(400, "Bad Request (Malformed Message Summary)")
            return STOP
        now = time.time()
        try:
            if not any(push_capable(d, now) for d in self.store.devices(aor)):
                return NEXT
            self._voicemail_push(aor, summary, now)
        except StoreUnavailable as exc:
            _log(KSR.err, "mwi-store-unavailable", aor=aor, error=exc)
            KSR.hdr.append_to_reply("Retry-After: 5\r\n")
            KSR.sl.sl_send_reply(503, "Service Unavailable")
            return STOP
        KSR.sl.sl_send_reply(200, "OK")
        return STOP

    def _voicemail_push(self, aor: str, summary: mwi.MessageSummary, now: float) -> None:
        """Keep the user's counts; push on a rise (StoreUnavailable: nothing pushed, and the previous
        counts put back when the push could not be queued, so the server's retry pushes)."""
        previous, pushed = mwi.record_and_push(self.voicemail, self.store.enqueue, aor, summary.new, summary.old,
                                               now, self.cfg.settings.message_ttl)
        _log(KSR.info, "mwi", aor=aor, new=summary.new, old=summary.old, previous=previous, pushed=pushed)

    def pusher_mwi(self, msg: object) -> int:
        """Role mode: route(PUSHER_MWI) for NOTIFYs (kamailio/pusher-role.cfg)."""
        return self._verdict("mwi", self.route_mwi)

    def _fallback_uri(self, aor: str) -> str:
        """Where an unanswered parked call to `aor` goes: the user's own voicemail URI (set with
        `pushlib-admin subscriber voicemail` or the API) before FALLBACK_URI; "" = nowhere (480)."""
        try:
            own = self.voicemail.uri(aor)
        except StoreUnavailable as exc:
            _log(KSR.warn, "voicemail-uri-unavailable", aor=aor, error=exc, used="FALLBACK_URI")
            own = None
        return calls.fallback_target(own or self.cfg.fallback_uri, aor)

    # ------------------------------------------------------------------ REGISTER

    def route_register(self) -> bool:
        if not KSR.is_REGISTER():
            return NEXT
        if self.role and self._refuse_register():  # (KEMI mode checked it before auth)
            return STOP
        if not self.cfg.pusher:
            self._save_and_replicate()
            return STOP
        aor = calls.aor_of(_pv("$tU"), _pv("$td"))
        plan = calls.plan_register(aor, _pv("$ct"), _pv("$hdr(Expires)") or None, _pv("$ua"),
                                   self._ua_mappings(), self._app_enabled, self.limits, time.time())
        if isinstance(plan, calls.RegisterReply):
            _log(KSR.notice, "register-rejected", code=plan.code, aor=aor, **dict(plan.log_fields))
            self.metrics.register_rejected(plan.code)
            KSR.sl.sl_send_reply(plan.code, plan.reason)
            return STOP
        if isinstance(plan, calls.SaveBinding):
            if plan.legacy_ua is not None and not self._legacy_logged.get(aor, False):
                self._legacy_logged.put(aor, True)
                _log(KSR.notice, "legacy-params-no-ua-mapping", aor=aor, ua=plan.legacy_ua)
            if plan.feature_caps:
                KSR.hdr.append_to_reply(f"Feature-Caps: {plan.feature_caps}\r\n")
            self._save_and_replicate()
        elif isinstance(plan, calls.UnregisterAll):
            self._forget_all_devices(aor)
            self._save_and_replicate()
        elif isinstance(plan, calls.RemoveDevice):
            try:
                self.store.remove_device(aor, plan.device_id)
                self._unschedule_refresh(aor, [plan.device_id])
            except StoreUnavailable as exc:
                _log(KSR.err, "device-remove-failed", aor=aor, device=plan.device_id, error=exc)
            self._save_and_replicate()
        else:
            self._save_device(aor, plan)
        return STOP

    def _save_device(self, aor: str, plan: calls.SaveDevice) -> None:
        device = plan.device
        self.metrics.push_register(device.params.provider.value)
        before = self.cfg.settings.reregister_before
        caps = reregister.with_pnsreg(plan.feature_caps, _pv("$ct"), before, device.expires_at - device.registered_at)
        KSR.hdr.append_to_reply(f"Feature-Caps: {caps}\r\n")
        # Order matters for wake latency: save the binding (reply held back), forward the parked
        # INVITEs to it, then write the push record and only then answer the REGISTER.
        if not self._save(reply=False):
            return
        woken = self._resume(aor, device.device_id, record=False)
        wake = schema.wake_args(aor, device.device_id) if woken else None
        try:
            # one round trip for the record, the wake and whether messages wait for the user
            evicted, queued, wake_recorded = self.store.save_device_probing(device, schema.messages_key(aor), wake)
            if woken and not wake_recorded:
                self._record_woken(aor, device.device_id, woken)
        except StoreUnavailable as exc:
            # Redis degrades push, never SIP: the binding stands and the phone keeps the call it
            # was just given; the record is written at its next REGISTER (the stored one, if any,
            # still pushes it meanwhile).
            _log(KSR.err, "device-store-unavailable", aor=aor, device=device.device_id, kept="binding",
                 error=exc)
            evicted, queued = [], False
            if woken:
                self._woken_unrecorded(device.device_id, woken)
        else:
            self._schedule_refresh(device, evicted)
        # the same phone under another id (it changed +sip.instance, or began to send one; same
        # token): a call it was pushed for under the old id is resumed to it too, once its old
        # bindings are gone (with the same address they would be a second branch to the phone)
        self._drop_stale_bindings(aor, device.device_id, device.contact, evicted)
        for old_id in evicted:
            self._resume(aor, old_id)
        KSR.registrar.reg_send_reply()
        self._replicate_register(evicted)
        # after the 200 OK: the messages queued while it slept (also those queued under an old id)
        for queued_id in (device.device_id, *evicted) if queued else ():
            self.messages.deliver(aor, queued_id, device.contact)

    def _app_enabled(self, provider: str, app_id: str) -> bool | None:
        """Whether we push for this app (None: not configured), so nobody can make us push for apps
        we do not serve. Cached per worker for _APP_TTL seconds; with Redis down the REGISTER goes
        on (saving the device fails with 503 anyway)."""
        try:
            return self._app_cache.get_or_load((provider, app_id), lambda: self.store.app_enabled(provider, app_id))
        except StoreUnavailable as exc:
            _log(KSR.warn, "app-check-unavailable", app=app_id, error=exc)
            return True

    def _save_and_replicate(self) -> None:
        if self._save():
            self._replicate_register()

    def _save(self, reply: bool = True) -> bool:
        if KSR.registrar.save(LOCATION, 0 if reply else 0x02) < 0:
            _log(KSR.err, "save-failed", aor=_pv("$tu"), src=f"{_pv('$si')}:{_pv('$sp')}")
            if not reply:  # with the no-reply flag the registrar left its error unanswered
                KSR.registrar.reg_send_reply()
            return False
        return True

    def _schedule_refresh(self, device: Device, evicted: list[str]) -> None:
        """REREGISTER_PUSH_BEFORE: the device's re-registration push is due a lead before its
        binding expires (pushlib.reregister); evicted devices are no longer pushed. Redis failing
        here costs that one refresh push, never the REGISTER."""
        due = reregister.due_at(device.registered_at, device.expires_at, self.cfg.settings.reregister_before)
        if due is None:
            return
        try:
            reregister.schedule(self.store.client, device.aor, device.device_id, due)
            self._unschedule_refresh(device.aor, evicted)
        except StoreUnavailable as exc:
            _log(KSR.warn, "refresh-schedule-failed", aor=device.aor, device=device.device_id, error=exc)

    def _unschedule_refresh(self, aor: str, device_ids: list[str]) -> None:
        if self.cfg.settings.reregister_before > 0:
            reregister.unschedule(self.store.client, aor, device_ids)

    def _forget_all_devices(self, aor: str) -> None:
        try:
            for d in self.store.devices(aor):
                self.store.remove_device(aor, d.device_id)
                self._unschedule_refresh(aor, [d.device_id])
        except StoreUnavailable as exc:
            _log(KSR.err, "device-remove-failed", aor=aor, error=exc)

    def _drop_stale_bindings(self, aor: str, device_id: str, contact_uri: str, evicted: list[str]) -> None:
        """Remove the device's older bindings (new port/connection/Call-ID) and evicted devices'."""
        mappings = self._ua_mappings()
        stale = calls.stale_bindings(self._bindings(aor), device_id, contact_uri,
                                     lambda b: calls.binding_device_id(b, mappings), evicted)
        for b in stale:
            KSR.registrar.unregister_ruid(LOCATION, aor, b.ruid)
            _log(KSR.info, "stale-binding-removed", aor=aor, device=device_id)

    def _resume(self, aor: str, device_id: str, record: bool = True) -> list[str]:
        """Forward the calls parked for this device to its fresh binding; their keys.

        The fast path is shared memory: `pnpend` says whether the device was pushed for a call
        parked on this node (tsilo transactions are per node too), so the parked INVITE goes out
        before any Redis round trip; Redis then records the device as woken (for cancel pushes),
        here, or (`record` False) by the caller with the device's own save.
        """
        # Taken atomically (under the slot lock): a retransmitted REGISTER in another worker
        # finds nothing, so the parked INVITE is forwarded once.
        pkey = calls.pending_key(aor, device_id)
        KSR.htable.sht_lock(PEND_TABLE, pkey)
        try:
            keys = calls.pending_calls(KSR.htable.sht_get(PEND_TABLE, pkey))
            if keys:
                KSR.htable.sht_rm(PEND_TABLE, pkey)
        finally:
            KSR.htable.sht_unlock(PEND_TABLE, pkey)
        # only calls still parked (a call that ended must not get the device as a branch)
        alive = [k for k in keys if KSR.htable.sht_get(WAIT_TABLE, k) is not None]
        if not alive:
            return []
        for k in alive:  # (counted before the branch exists: its failure must find it counted)
            if KSR.htable.sht_get(BRANCH_COUNT_TABLE, k) is not None:
                KSR.htable.sht_inc(BRANCH_COUNT_TABLE, k)
        rc = KSR.tsilo.ts_append_by_contact(LOCATION, aor)
        _log(KSR.info, "wake", aor=aor, device=device_id, calls=",".join(alive), rc=rc)
        self.metrics.woken(alive)
        if record:
            self._record_woken(aor, device_id, alive)
        return alive

    def _record_woken(self, aor: str, device_id: str, keys: list[str]) -> None:
        try:
            self.state.wake(aor, device_id)
        except StoreUnavailable as exc:
            _log(KSR.err, "wake-state-unavailable", aor=aor, device=device_id, error=exc)
            self._woken_unrecorded(device_id, keys)

    @staticmethod
    def _woken_unrecorded(device_id: str, keys: list[str]) -> None:
        """Redis could not record the wake: remembered here, so the calls' ends owe this device no
        cancel push (it got the INVITE)."""
        for k in keys:
            KSR.htable.sht_sets(WOKEN_TABLE, k, calls.add_pending_call(KSR.htable.sht_get(WOKEN_TABLE, k), device_id))

    # ------------------------------------------------------------------ INVITE

    def route_invite(self, role: bool = False) -> bool:
        """Push-aware INVITE handling. In role mode (`role`) the host config keeps what the push
        role has nothing to add to: INVITEs for other domains, and users with neither a push
        device nor a binding (NEXT: its own routing runs); KEMI mode answers those itself."""
        if not KSR.is_INVITE() or not self.cfg.pusher:
            return NEXT
        if role and not self._served(_pv("$rd")):
            return NEXT
        if role and self.route_overload():  # (KEMI mode sheds in its request pipeline)
            return STOP
        aor = calls.aor_of(_pv("$rU"), _pv("$rd"))
        bindings = self._bindings(aor)
        devices: list[Device] | None
        try:
            devices = self.store.devices(aor)
        except StoreUnavailable as exc:
            _log(KSR.err, "device-store-unavailable", aor=aor, error=exc)
            devices = None
        now = time.time()
        plan = calls.plan_invite(bindings, devices, now, self.cfg.awake_window, self._disconnected(bindings))
        self._drop_dead(aor, plan.drop, devices or [])
        if plan.verdict is calls.Verdict.NOT_FOUND:
            if role:
                return NEXT
            KSR.sl.sl_send_reply(404, "Not Found")
            return STOP
        if role and plan.verdict is calls.Verdict.RING and not devices:
            return NEXT  # plain contacts only: the host's own lookup() does the same, with its features
        for flag in self._host_flags:  # (role mode: e.g. the host's accounting flags)
            KSR.setflag(flag)
        self._record_route()
        if plan.verdict is calls.Verdict.UNAVAILABLE:
            _log(KSR.notice, "unavailable", aor=aor, store="down" if devices is None else "up")
            KSR.sl.sl_send_reply(480, "Temporarily Unavailable")
            return STOP
        if plan.verdict is calls.Verdict.RING:
            self._ring_unparked(aor, plan.ring, devices)
            return STOP
        # limits: calls parked for this user at once, then call pushes per device and minute
        if not self._take_park_slot(aor):
            if plan.ring:
                self._ring_unparked(aor, plan.ring, devices)
            else:
                KSR.sl.sl_send_reply(486, "Busy Here")
            return STOP
        plan = self._limit_pushes(aor, plan, now)
        if plan.verdict is calls.Verdict.PARK:
            self._park(aor, plan, now)
            return STOP
        self._give_back_park_slot(aor)
        if plan.ring:
            self._ring_unparked(aor, plan.ring, devices)
        else:
            KSR.sl.sl_send_reply(480, "Temporarily Unavailable")
        return STOP

    def route_message(self, role: bool = False) -> bool:
        """A MESSAGE to a served user whose push devices sleep: queued for them, 202, pushed
        (kemi/ksrmessages.py). Otherwise NEXT: routed as before (route_location, or the host's)."""
        if not self.cfg.pusher or not KSR.is_method("MESSAGE") or not _pv("$rU"):
            return NEXT
        if role and not self._served(_pv("$rd")):
            return NEXT
        return self.messages.route(role)

    def _drop_dead(self, aor: str, drop: tuple[calls.Binding, ...], devices: list[Device]) -> None:
        """Remove the bindings of dead devices (the dispatcher marked them when their last token
        died) and then their records: the next call does not even look at them."""
        for b in drop:
            KSR.registrar.unregister_ruid(LOCATION, aor, b.ruid)
            for d in devices:
                if d.dead and d.contact == b.uri:
                    try:
                        self.store.remove_device(aor, d.device_id)
                    except StoreUnavailable as exc:
                        _log(KSR.err, "device-remove-failed", aor=aor, device=d.device_id, error=exc)
                    _log(KSR.notice, "dead-binding-removed", aor=aor, device=d.device_id)

    @staticmethod
    def _disconnected(bindings: list[calls.Binding]) -> frozenset[str]:
        """Push bindings whose REGISTER came over a TCP/TLS connection Kamailio no longer has: the
        phone was suspended (and its connection dropped) inside the awake window, so it is pushed,
        not rung (a phone does not accept connections: nothing else could reach it)."""
        return frozenset(b.uri for b in bindings
                         if b.conid > 0 and calls.looks_push(b.uri) and calls.reached_over_stream(b.uri)
                         and KSR.tcpops.tcp_conid_state(b.conid) < 0)

    def _ring_unparked(self, aor: str, ring: tuple[calls.Binding, ...], devices: list[Device] | None) -> None:
        """Ring without parking. A user with push devices is owed a missed-call push if nobody
        answers (the failure route sends it): the call is marked in MISSED_TABLE."""
        if devices:
            KSR.htable.sht_setxs(MISSED_TABLE, calls.call_key(_pv("$ci")), aor, MISSED_MARK_TTL)
            if self.cfg.push_on_silence_ms and calls.rings_push_device(ring, devices) and self._watch_silence(ring):
                self._ring(ring)
                # in tsilo only now that the transaction has its branches (see _park)
                KSR.tsilo.ts_store_uri(aor)
                return
        self._ring(ring)

    def _watch_silence(self, ring: tuple[calls.Binding, ...]) -> bool:
        """A push device rung directly may have been suspended since its REGISTER: its branch gets
        PUSH_ON_SILENCE ms to send a provisional reply (RFC 3261 wants a 100 within 200 ms, so a
        plain phone rung alongside loses nothing), then tm ends it with 408 and the branch-failure
        route pushes the device and parks the call for it. The transaction is made now (the caller
        stores it in tsilo once it has its branches, so the woken device's REGISTER can add its
        own); False when it cannot be (rung without the watch then)."""
        if KSR.tm.t_newtran() < 0:
            _log(KSR.err, "silence-watch-failed", call=calls.call_key(_pv("$ci")))
            return False
        KSR.tm.t_save_lumps()
        KSR.tm.t_set_fr(0, self.cfg.push_on_silence_ms)
        KSR.tm.t_on_branch_failure(self._branch_failure_route)
        # the branch-failure route sees the original R-URI and the branch's index only; _ring
        # makes branch i of tm the i-th binding of `ring`
        key = calls.call_key(_pv("$ci"))
        for i, b in enumerate(ring):
            KSR.htable.sht_setxs(BRANCH_TABLE, f"{key}|{i}", b.uri, BRANCH_MARK_TTL)
        return True

    def _limit_pushes(self, aor: str, plan: calls.InvitePlan, now: float) -> calls.InvitePlan:
        """Leave out of the plan the devices already pushed MAX_CALL_PUSHES_PER_MINUTE times this
        minute: a caller dialling in a loop cannot turn the user's phone into a pager."""
        limit = self.limits.max_call_pushes_per_minute
        if not limit:
            return plan
        allowed = []
        for device in plan.push:
            if (KSR.htable.sht_inc(PUSH_RATE_TABLE, access.push_bucket(aor, device.device_id, now)) or 0) <= limit:
                allowed.append(device)
            else:
                _log(KSR.notice, "push-rate-limited", aor=aor, device=device.device_id, limit=limit)
        if len(allowed) == len(plan.push):
            return plan
        if allowed:
            return calls.InvitePlan(plan.verdict, plan.ring, tuple(allowed))
        return calls.InvitePlan(calls.Verdict.RING if plan.ring else calls.Verdict.UNAVAILABLE, plan.ring)

    def _take_park_slot(self, aor: str) -> bool:
        """Count one more call parked for `aor` (given back in _finish); False over the limit."""
        limit = self.limits.max_parked_per_user
        if not limit:
            return True
        # (the table's initval=0 makes sht_inc create the counter; a negative return is an
        # htable error: the call goes on rather than fail on our bookkeeping)
        if (KSR.htable.sht_inc(PARKED_TABLE, aor) or 0) > limit:
            KSR.htable.sht_dec(PARKED_TABLE, aor)
            _log(KSR.notice, "park-limit", aor=aor, limit=limit)
            return False
        return True

    def _give_back_park_slot(self, aor: str) -> None:
        if self.limits.max_parked_per_user and (KSR.htable.sht_dec(PARKED_TABLE, aor) or 0) <= 0:
            KSR.htable.sht_rm(PARKED_TABLE, aor)

    def _park(self, aor: str, plan: calls.InvitePlan, now: float) -> None:
        """Park the INVITE for the pushed devices (ringing the awake ones in parallel).

        Order matters: the transaction gets all its branches (t_relay) before a REGISTER can
        resume it (tsilo store, pnpend marks) and before the push that makes the device REGISTER
        goes out.
        A REGISTER appending a branch (tsilo, under tm's reply lock) while this worker's t_relay
        was still adding its own (without that lock) corrupted the transaction under load."""
        call_id = _pv("$ci")
        key = calls.call_key(call_id)
        if KSR.tm.t_newtran() < 0:
            _log(KSR.err, "park-newtran-failed", aor=aor, call=key)
            self._give_back_park_slot(aor)
            KSR.sl.sl_reply_error()
            return
        KSR.tm.t_save_lumps()
        pushed = tuple(d.device_id for d in plan.push)
        self._arm_window(aor, key, call_id)
        self._set_parking_branch(key)
        KSR.tm.t_reply(100, "Trying")
        if plan.ring:
            KSR.corex.append_branch()
            self._ring(plan.ring)
        else:
            self._arm_tm_routes()
            self._relay()
        # Only now is the transaction visible to tsilo: a REGISTER waking another call of this
        # AOR appends to every transaction stored for it (ts_append_by_contact), and an append
        # racing this worker's t_relay corrupted tm (BUG: retransmission already started).
        KSR.tsilo.ts_store_uri(aor)
        window = max(1, int(self.cfg.settings.wait_window))
        KSR.htable.sht_setxi(BRANCH_COUNT_TABLE, key, len(plan.ring), window + 5)
        self._mark_pending(aor, key, pushed)
        if self._record_and_push(aor, key, pushed, now):
            _log(KSR.info, "park", aor=aor, call=key, pushed=",".join(pushed), ring=len(plan.ring))
            self.metrics.parked(key)
            self._list_caller(aor, key)
        elif not plan.ring:
            self._end_parked(key, reason="push-unavailable", reply=480, recorded=False)

    def _caller(self) -> tuple[str, str]:
        """The caller's (name, number) as call pushes may carry it (HIDE_CALLER)."""
        return calls.pushed_caller(calls.caller_identity(_pv("$hdr(From)"), _pv("$fU")),
                                   self.cfg.settings.hide_caller)

    def _record_and_push(self, aor: str, key: str, pushed: tuple[str, ...], now: float) -> bool:
        """Record the parked call in Redis (whom it waits for, what its end owes) and queue its
        push, in one round trip; False (logged) when Redis cannot take them. The push's job id
        comes from the Call-ID, so the dispatcher never delivers it twice to a device."""
        caller, settings = self._caller(), self.cfg.settings
        call_id = _pv("$ci")
        call = ParkedCall(aor=aor, key=key, call_id=call_id, cseq=_pv("$cs"), caller_name=caller[0],
                          caller_number=caller[1], deadline=now + settings.wait_window, pushed=pushed)
        job = calls.incoming_call_job(aor, call_id, caller, pushed, now, settings.wait_window)
        try:
            self.state.park_and_push(call, job, settings, now)
        except StoreUnavailable as exc:
            _log(KSR.err, "push-unavailable", aor=aor, call=key, error=exc)
            return False
        return True

    def _record_parked(self, aor: str, key: str, pushed: tuple[str, ...], now: float) -> None:
        """Record the parked call in Redis (StoreUnavailable): whom it waits for, what its end owes."""
        caller = self._caller()
        self.state.park(ParkedCall(aor=aor, key=key, call_id=_pv("$ci"), cseq=_pv("$cs"), caller_name=caller[0],
                                   caller_number=caller[1], deadline=now + self.cfg.settings.wait_window,
                                   pushed=pushed), now)

    def _push_call(self, aor: str, key: str, pushed: tuple[str, ...], now: float) -> bool:
        """Queue the call push to `pushed` (its job id is derived from the Call-ID, so the
        dispatcher never delivers it twice to a device); False (logged) when Redis cannot take it."""
        job = calls.incoming_call_job(aor, _pv("$ci"), self._caller(), pushed, now, self.cfg.settings.wait_window)
        try:
            self.store.enqueue(job)
        except StoreUnavailable as exc:
            _log(KSR.err, "push-unavailable", aor=aor, call=key, error=exc)
            return False
        return True

    def _arm_window(self, aor: str, key: str, call_id: str) -> None:
        """The parked call's window timer (pnwait), which is also how a CANCEL finds it."""
        window = max(1, int(self.cfg.settings.wait_window))
        entry = calls.WaitEntry(aor=aor, call_id=call_id, cseq=_pv("$cs"))
        KSR.htable.sht_setxs(WAIT_TABLE, key, entry.encode(), window + WINDOW_BACKSTOP)

    def _mark_pending(self, aor: str, key: str, pushed: tuple[str, ...]) -> None:
        """Per pushed device, the mark its REGISTER looks for (pnpend): set once the transaction
        has its branches, so that the REGISTER's tsilo append never races this worker's t_relay."""
        window = max(1, int(self.cfg.settings.wait_window))
        for device_id in pushed:
            pkey = calls.pending_key(aor, device_id)
            KSR.htable.sht_lock(PEND_TABLE, pkey)
            try:
                value = calls.add_pending_call(KSR.htable.sht_get(PEND_TABLE, pkey), key)
                KSR.htable.sht_setxs(PEND_TABLE, pkey, value, window + 5)
            finally:
                KSR.htable.sht_unlock(PEND_TABLE, pkey)

    def _set_parking_branch(self, key: str) -> None:
        """Point the request at the parking branch (the caller relays it).

        Keep the parked transaction alive with a "parking branch": an INVITE to ourselves
        (R-URI user PARK_PREFIX...) that route_parking swallows without any reply. It stays
        pending until its fr timer, which IS the wait window: failed awake branches do not
        end the call while pushed devices may still wake, tsilo can append the woken device's
        branch, and when it times out with every other branch ended, tm runs the failure
        route, the one place where the call can still be relayed (to FALLBACK_URI) or get
        its 480. Devices still ringing then are ended by the htable backstop (pnwait).
        In KEMI mode it goes over TCP to our own SIP port: a reliable transport, so tm never
        retransmits it (over UDP that was ~9 INVITEs to ourselves per parked call and window);
        in role mode the host's listeners are unknown and it goes over UDP to where the call came in."""
        fr_ms = max(1000, int(self.cfg.settings.wait_window * 1000))
        KSR.tm.t_set_fr(max(fr_ms + 5000, 120_000), fr_ms)
        if self._park_tcp_port:
            where = f"{_pv('$Ri')}:{self._park_tcp_port};transport=tcp"
        else:
            where = f"{_pv('$Ri')}:{_pv('$Rp')};transport=udp"
        park_uri = f"sip:{PARK_PREFIX}{key}@{where}"
        KSR.pv.sets("$ru", park_uri)
        KSR.pv.sets("$du", park_uri)

    def _bindings(self, aor: str) -> list[calls.Binding]:
        if KSR.registrar.reg_fetch_contacts(LOCATION, aor, "pn") < 0:
            return []
        out: list[calls.Binding] = []
        for i in range(KSR.pv.geti("$ulc(pn=>count)") or 0):
            out.append(
                calls.Binding(
                    uri=_pv(f"$(ulc(pn=>addr)[{i}])"),
                    received=_pv(f"$(ulc(pn=>received)[{i}])"),
                    instance=_pv(f"$(ulc(pn=>instance)[{i}])"),
                    modified=float(KSR.pv.geti(f"$(ulc(pn=>modified)[{i}])") or 0),
                    ruid=_pv(f"$(ulc(pn=>ruid)[{i}])"),
                    user_agent=_pv(f"$(ulc(pn=>user_agent)[{i}])"),
                    conid=KSR.pv.geti(f"$(ulc(pn=>conid)[{i}])") or 0,
                    path=_pv(f"$(ulc(pn=>path)[{i}])") if self.cluster else "",
                )
            )
        KSR.registrar.reg_free_contacts("pn")
        return out

    def _ring(self, ring: tuple[calls.Binding, ...]) -> None:
        first, *others = ring
        for b in (*others, first):  # (the first is the request URI, the others branches)
            KSR.pv.sets("$ru", b.uri)
            if b.destination:
                KSR.pv.sets("$du", b.destination)
            else:
                KSR.pv.unset("$du")
            if b is not first:
                KSR.corex.append_branch()
        self._arm_tm_routes()
        self._relay()

    def _arm_tm_routes(self) -> None:
        """tm routes of an INVITE we relay: our failure route; in role mode the host's branch,
        reply and failure routes when it names them (its failure route calls route(PUSHER_FAILURE)
        first), so push calls get the host's NAT, media and failure handling like its own calls."""
        KSR.tm.t_on_failure(self._failure_route_name)
        if self._host_branch_route:
            KSR.tm.t_on_branch(self._host_branch_route)
        if self._host_reply_route:
            KSR.tm.t_on_reply(self._host_reply_route)

    def route_location(self) -> bool:
        """Initial requests other than push-handled INVITEs: plain registrar lookup + relay."""
        if not KSR.is_INVITE() and not _pv("$rU"):
            KSR.sl.sl_send_reply(404, "Not Found")
            return STOP
        if KSR.is_INVITE():
            self._record_route()
        if KSR.registrar.lookup(LOCATION) < 0:
            KSR.sl.sl_send_reply(404, "Not Found")
            return STOP
        self._relay()
        return STOP

    def _relay(self) -> None:
        if KSR.tm.t_relay() < 0:
            # (never the R-URI: a push binding's carries the device token in pn-prid)
            _log(KSR.err, "relay-failed", aor=_pv("$tu"), host=_pv("$rd"), method=_pv("$rm"))
            KSR.sl.sl_reply_error()

    # ------------------------------------------------------------------ ending parked calls

    def _end_parked(self, key: str, reason: str, reply: int = 0, answered: bool = False,
                    recorded: bool = True) -> None:
        """End a parked call once: stop its timer, optionally answer the caller, owe its pushes
        (none when Redis never `recorded` it)."""
        entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
        if entry is None:
            return
        KSR.htable.sht_rm(WAIT_TABLE, key)
        self._finish(entry, key, reason, reply, answered, recorded=recorded)

    def _finish(self, entry: calls.WaitEntry, key: str, reason: str, reply: int, answered: bool,
                cancel: bool = False, recorded: bool = True) -> None:
        aor = entry.aor
        self._give_back_park_slot(aor)
        self.metrics.ended(key, reason)
        # The transaction is ended from the shared-memory entry first: a caller's CANCEL gets
        # its 487 (a timeout its 480) even while Redis is down; Redis only knows the pushes owed.
        if reply:
            replied = KSR.tmx.t_reply_callid(entry.call_id, entry.cseq, reply, calls.reason_phrase(reply)) >= 0
            if not replied and self.role and reply == 480 and not answered:
                # at the window's end the call already had its final reply (or was gone) and the
                # role never saw it: the host does not call route(PUSHER_REPLY) in its reply_route
                _log(KSR.err, "reply-not-seen", call=key, hint="call route(PUSHER_REPLY) in the main reply_route")
                answered = True  # no missed-call push for a call that was most likely answered
        elif cancel:
            # no final reply: tm cancels the open branches and, once they end, runs the
            # failure route, where the call can still be relayed (to the fallback URI)
            KSR.tmx.t_cancel_callid(entry.call_id, entry.cseq, 0)
        if recorded:
            self._settle_end(calls.OwedEnd(aor, key, reason, answered, time.time()))
        if self.cluster:
            try:
                self.book.unlist_call(key)
            except StoreUnavailable as exc:  # (a stale entry: answered again if this node dies)
                _log(KSR.warn, "node-unlist-failed", call=key, error=exc)

    # ------------------------------------------------------------------ a clustered node dies

    def _list_caller(self, aor: str, key: str) -> None:
        """WITH_CLUSTER: what another node needs to answer this call's caller if this node dies
        while the call is parked (pushlib.nodes). UDP callers only: a TCP/TLS caller sees its
        connection to a dead node reset, and fails at once by itself."""
        if not self.cluster or _pv("$pr") != "udp":
            return
        answer = nodes.CallerAnswer(
            aor=aor, key=key, dest=nodes.udp_destination(_pv("$si"), _pv("$sp")), via=_pv("$(hdr(Via)[*])"),
            from_=_pv("$hdr(From)"), to=_pv("$hdr(To)"), call_id=_pv("$ci"), cseq=_pv("$hdr(CSeq)"))
        try:
            self.book.list_call(answer)
        except StoreUnavailable as exc:
            _log(KSR.warn, "node-list-failed", call=key, error=exc)

    def ksr_node_tick(self, msg: object, evname: str = "") -> int:
        """WITH_CLUSTER, every second (rtimer): this node's heartbeat, and the callers of a node
        whose heartbeat is gone answered 503 from here, their calls' end pushes owed."""
        try:
            self._node_tick()
        except StoreUnavailable as exc:
            now = time.monotonic()
            if now - self._tick_failed_logged >= 60:  # one line a minute through an outage
                self._tick_failed_logged = now
                _log(KSR.err, "node-heartbeat-failed", node=self.node, error=exc)
        except Exception as exc:
            _crashed("node-tick", exc)
        return 1

    def _node_tick(self) -> None:
        book = self.book
        book.heartbeat()
        for node in book.dead_nodes():
            answers = book.take_over(node)
            if answers is None:
                continue  # another node took it
            _log(KSR.warn, "node-failed", node=node, calls=len(answers), by=self.node)
            for a in answers:
                KSR.corex.send_data(a.dest, a.response(503, "Service Unavailable", secrets.token_hex(6)))
                self._settle_end(calls.OwedEnd(a.aor, a.key, "node-failed", False, time.time()))

    def _settle_end(self, owed: calls.OwedEnd) -> None:
        """Finish the call's Redis record and queue its end-of-call pushes. What Redis cannot take
        now waits in shared memory (`pnretry`) and is retried every few seconds, so a Redis outage
        delays these pushes instead of losing them."""
        jobs = owed.jobs
        try:
            if jobs is None:
                call = self.state.finish(owed.aor, owed.key)
                if call is None:
                    KSR.htable.sht_rm(WOKEN_TABLE, owed.key)
                    return  # another process ended it and owes the pushes
                woken = calls.pending_calls(KSR.htable.sht_get(WOKEN_TABLE, owed.key))
                jobs = tuple(calls.owed_end_jobs(call, woken, owed.answered, owed.ended_at, self.cfg.settings,
                                                 owed.reason))
            for i, job in enumerate(jobs):
                try:
                    self.store.enqueue(job)
                except StoreUnavailable:
                    jobs = jobs[i:]
                    raise
        except StoreUnavailable as exc:
            self._store_down_until = time.monotonic() + 1.0
            self._retry_end(replace(owed, jobs=jobs), exc)
            return
        KSR.htable.sht_rm(WOKEN_TABLE, owed.key)
        _log(KSR.info, "end", aor=owed.aor, call=owed.key, reason=owed.reason,
             jobs=",".join(j.kind.value for j in jobs), attempt=owed.attempt)

    def _retry_end(self, owed: calls.OwedEnd, exc: StoreUnavailable) -> None:
        if owed.given_up(time.time()):
            _log(KSR.err, "end-push-dropped", aor=owed.aor, call=owed.key, reason=owed.reason,
                 attempts=owed.attempt + 1, error=exc)
            KSR.htable.sht_rm(WOKEN_TABLE, owed.key)
            return
        if owed.attempt == 0:  # one line per call, not one per attempt
            _log(KSR.err, "end-state-unavailable", aor=owed.aor, call=owed.key, reason=owed.reason,
                 step="finish" if owed.jobs is None else "enqueue", retry_every=calls.OWED_END_RETRY, error=exc)
        KSR.htable.sht_setxs(RETRY_TABLE, owed.retry_key(), replace(owed, attempt=owed.attempt + 1).encode(),
                             calls.OWED_END_RETRY)

    # ------------------------------------------------------------------ tm callbacks

    def ksr_failure_route(self, msg: object) -> int:
        try:
            self._failure_route()
        except Exception as exc:
            _crashed("failure", exc)
            KSR.tm.t_reply(500, "Server Internal Error")  # every branch has ended: the caller waits
        return 1

    def _failure_route(self) -> bool:
        """True when the failure is handled here (relayed to the fallback, or answered); False
        leaves it to tm's best reply or, in role mode, to the rest of the host's failure route."""
        key = calls.call_key(_pv("$ci"))
        code = KSR.pv.geti("$T_reply_code") or 0
        missed_aor = KSR.htable.sht_get(MISSED_TABLE, key)
        if missed_aor is not None:
            KSR.htable.sht_rm(MISSED_TABLE, key)
            self._owe_missed_call(str(missed_aor), key, code)
        entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
        aor = None if entry is None else entry.aor
        fallback_aor = KSR.htable.sht_get(FALLBACK_TABLE, key)
        if fallback_aor is not None:
            KSR.htable.sht_rm(FALLBACK_TABLE, key)
        action = calls.failure_route_action(
            code, aor is not None, KSR.tm.t_is_canceled() > 0, fallback_aor is not None
        )
        if action is calls.FailureRouteAction.END_ALL:
            self._end_parked(key, reason=calls.end_reason(code))
        elif action is not calls.FailureRouteAction.RELAY:
            if action is calls.FailureRouteAction.WINDOW_END:
                self._end_parked(key, reason=calls.end_reason(0))  # (the fallback was set up by the timer)
            if self._to_fallback(str(aor if aor is not None else fallback_aor)):
                return True
            if action is calls.FailureRouteAction.WINDOW_END and self._failure_route_name != FAILURE_ROUTE:
                # a host failure route chained: the window's end is its "no answer" (the parking
                # branch's 408: voicemail, ...); if it does nothing, tm answers that 408
                return False
            KSR.tm.t_reply(480, calls.reason_phrase(480))
            return True
        return False

    def ksr_branch_failure(self, msg: object, evname: str = "") -> int:
        """tm branch-failure route (armed by _watch_silence): one branch of the call has failed."""
        try:
            self._branch_failure()
        except Exception as exc:
            _crashed("branch-failure", exc)
        return 1

    def _branch_failure(self) -> None:
        """A push device rung directly that stayed silent (tm's 408 after PUSH_ON_SILENCE ms) or
        answered 503 is pushed, and the call waits for its REGISTER as for a sleeping phone:
        parked now if it was not yet (the parking branch keeps it open), joined if it was."""
        if KSR.tm.t_is_canceled() > 0:
            return
        key = calls.call_key(_pv("$ci"))
        entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
        missed_aor = KSR.htable.sht_get(MISSED_TABLE, key)
        aor = entry.aor if entry is not None else None if missed_aor is None else str(missed_aor)
        if aor is None:
            return  # the call has ended (or was never one to a push user)
        code = KSR.pv.geti("$T_reply_code") or 0
        branch_uri = KSR.htable.sht_get(BRANCH_TABLE, f"{key}|{KSR.pv.geti('$T_branch_idx') or 0}")
        if branch_uri is None:
            return  # (the parking branch, or a mark already expired)
        now = time.time()
        try:
            device = calls.device_to_push_on_failure(str(branch_uri), code, self.store.devices(aor), now)
        except StoreUnavailable as exc:
            _log(KSR.err, "device-store-unavailable", aor=aor, call=key, error=exc)
            return
        if device is None:
            return
        if not self._push_allowed(aor, device, now):
            return
        if entry is not None:
            self._push_into_parked(aor, key, device, now)
        elif self._take_park_slot(aor):
            self._park_silent(aor, key, device, now)

    def _push_allowed(self, aor: str, device: Device, now: float) -> bool:
        plan = self._limit_pushes(aor, calls.InvitePlan(calls.Verdict.PARK, (), (device,)), now)
        return bool(plan.push)

    def _push_into_parked(self, aor: str, key: str, device: Device, now: float) -> None:
        """The call is already parked (other devices pushed): this device joins it."""
        pushed = (device.device_id,)
        try:
            if not self.state.add_pushed(aor, key, device.device_id, now):
                return
        except StoreUnavailable as exc:
            _log(KSR.err, "push-unavailable", aor=aor, call=key, error=exc)
            return
        self._mark_pending(aor, key, pushed)
        if self._push_call(aor, key, pushed, now):
            _log(KSR.info, "silent-device-pushed", aor=aor, call=key, device=device.device_id, parked="already")

    def _park_silent(self, aor: str, key: str, device: Device, now: float) -> None:
        """Park a ringing call for a silent device (branch-failure route, under tm's reply lock):
        relay the parking branch, then push; the call's missed-call push is now the parked call's."""
        pushed = (device.device_id,)
        try:
            self._record_parked(aor, key, pushed, now)
        except StoreUnavailable as exc:
            _log(KSR.err, "push-unavailable", aor=aor, call=key, error=exc)
            self._give_back_park_slot(aor)
            return
        KSR.htable.sht_rm(MISSED_TABLE, key)
        self._arm_window(aor, key, _pv("$ci"))
        self._set_parking_branch(key)
        if KSR.tm.t_relay() < 0:
            _log(KSR.err, "parking-branch-failed", aor=aor, call=key)
        self._mark_pending(aor, key, pushed)
        if self._push_call(aor, key, pushed, now):
            _log(KSR.info, "silent-device-pushed", aor=aor, call=key, device=device.device_id, parked="now")
            self.metrics.parked(key)

    def _owe_missed_call(self, aor: str, key: str, code: int) -> None:
        """An unparked call to a user with push devices ended unanswered (rang out, busy, or the
        caller hung up): one missedCall push (its job id comes from the Call-ID: once per call)."""
        job = calls.missed_call_job(aor, _pv("$ci"), self._caller(), time.time(), self.cfg.settings.message_ttl)
        try:
            self.store.enqueue(job)
        except StoreUnavailable as exc:
            _log(KSR.err, "missed-call-push-unavailable", aor=aor, call=key, error=exc)
            return
        _log(KSR.info, "missed", aor=aor, call=key, code=code)

    def _to_fallback(self, aor: str) -> bool:
        """Relay the unanswered call to the user's voicemail URI, else FALLBACK_URI, as a new branch
        (failure route only).

        No failure route is armed for it: if the fallback fails too, tm sends its reply upstream.
        """
        uri = self._fallback_uri(aor)
        if not uri:
            return False
        KSR.pv.sets("$ru", uri)
        KSR.pv.unset("$du")
        KSR.hdr.append(f"Diversion: {calls.diversion_header(aor)}\r\n")
        if KSR.tm.t_relay() < 0:
            _log(KSR.err, "fallback-relay-failed", aor=aor, ruri=uri)
            return False
        _log(KSR.info, "fallback", aor=aor, ruri=uri)
        self.metrics.fallback()
        return True

    def ksr_onreply_route(self, msg: object) -> int:
        try:
            self._onreply()
        except Exception as exc:
            _crashed("reply", exc)
        return 1

    def _onreply(self) -> None:
        if not self.cfg.pusher or _pv("$rm") != "INVITE":
            return
        code = KSR.pv.geti("$rs") or 0
        if code < 200:
            return
        key = calls.call_key(_pv("$ci"))
        entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
        if entry is None:
            return
        if 200 <= code < 300:
            self._end_parked(key, reason=calls.end_reason(code), answered=True)
        elif calls.failure_action(code, True, False) is calls.FailureAction.END_ALL:
            self._end_now(key, entry, code)
            _log(KSR.info, "end-all", call=key, code=code)
        elif self._nobody_left(entry, key):
            # the last open branch failed and every pushed device has woken: nobody can answer
            # any more, so the caller gets this answer now rather than at the end of the window
            self._end_now(key, entry, code)
            _log(KSR.info, "end-last-branch", call=key, code=code)
        else:
            _log(KSR.info, "keep-waiting", call=key, code=code)

    def _end_now(self, key: str, entry: calls.WaitEntry, code: int) -> None:
        """End a parked call with `code` at once, from a reply route. tm cannot end the parking
        branch from inside a reply route (the transaction's reply lock is held), so an async task
        process answers the caller at once and tm cancels every other branch. If no task can be
        queued, the wait-window timer is re-armed to do it within 1-2 s."""
        KSR.htable.sht_rm(WAIT_TABLE, key)  # a replaced item would keep its old expiry
        KSR.htable.sht_setxs(WAIT_TABLE, key, entry.with_code(code).encode(), 1)
        # (`async` is a Python keyword: the KEMI module is reached by name)
        if getattr(KSR, "async").task_data(self._end_now_route, key) < 0:
            _log(KSR.warn, "end-now-not-queued", call=key, code=code)

    def _nobody_left(self, entry: calls.WaitEntry, key: str) -> bool:
        """A branch of a parked call failed: whether it was the last one that could answer (the
        count of open device branches, `pnbr`, reaches 0) and no pushed device is still asleep.
        Calls whose branches are not counted (parked from the branch-failure route) wait out
        their window as before."""
        if KSR.htable.sht_get(BRANCH_COUNT_TABLE, key) is None:
            return False
        if (KSR.htable.sht_dec(BRANCH_COUNT_TABLE, key) or 0) > 0:
            return False
        try:
            return self.state.asleep(entry.aor, key) == 0
        except StoreUnavailable as exc:
            _log(KSR.err, "end-state-unavailable", aor=entry.aor, call=key, error=exc)
            return False

    def ksr_reply_route(self, msg: object) -> int:
        try:
            self._alias_nated_reply()
        except Exception as exc:
            _crashed("reply", exc)
        return self.ksr_onreply_route(msg)

    @staticmethod
    def _alias_nated_reply() -> None:
        """A NATed callee's 1xx/2xx to an INVITE names its private address in Contact (another
        port than the one the reply came from, or an RFC 1918 address): alias that Contact to
        the reply's source, so the caller's in-dialog requests (ACK, BYE, re-INVITE) are sent
        back there (handle_ruri_alias in route_withindlg), over the device's own connection
        on TCP. Mode 1 of is_first_hop: on loopback the device's address is a local one too."""
        code = KSR.pv.geti("$rs") or 0
        if not (100 < code < 300) or _pv("$rm") != "INVITE" or not _pv("$ct"):
            return
        if KSR.siputils.is_first_hop_mode(1) > 0 and KSR.nathelper.nat_uac_test(129) > 0:
            KSR.nathelper.set_contact_alias()

    def ksr_onsend_route(self, msg: object) -> int:
        return 1

    def ksr_branch_route(self, msg: object) -> int:
        return 1

    # ------------------------------------------------------------------ events and workers

    def ksr_htable_event(self, msg: object, evname: str) -> int:
        if evname == f"htable:expired:{WAIT_TABLE}":
            try:
                self._window_expired()
            except Exception as exc:
                _crashed("expired", exc)
        elif evname == f"htable:expired:{RETRY_TABLE}":
            try:
                self._retry_owed_end()
            except Exception as exc:
                _crashed("retry-end", exc)
        return 1

    def ksr_uac_event(self, msg: object, evname: str = "") -> int:
        """uac's `uac:reply` event (modparam uac event_callback): a queued MESSAGE's final reply."""
        try:
            self.messages.on_reply()
        except Exception as exc:
            _crashed("uac-reply", exc)
        return 1

    def ksr_xhttp_event(self, msg: object, evname: str = "") -> int:
        """xhttp's event route (WITH_METRICS): the Prometheus scrape endpoint."""
        try:
            self.metrics.http_request(_pv("$si"), KSR.pv.geti("$Rp") or 0)
        except Exception as exc:
            _crashed("xhttp", exc)
        return 1

    def _retry_owed_end(self) -> None:
        owed = calls.OwedEnd.decode(_pv("$shtrecord(value)"))
        if owed is None:
            return
        if time.monotonic() < self._store_down_until:
            # Redis failed this process less than a second ago: with it unreachable (a timeout,
            # not a refusal) every try would hold the htable timer, which also ends the windows
            self._retry_end(owed, StoreUnavailable("skipped: redis failed under a second ago"))
            return
        self._settle_end(owed)

    def ksr_end_now(self, msg: object, evname: str = "") -> int:
        """async task process (queued by _onreply): end a call a device rejected for everyone."""
        try:
            # The worker that queued this is still inside the reply route of the rejecting branch;
            # tm records that branch's final reply only after the route returns. Ending the call
            # before that would make tm CANCEL a branch that has already answered.
            time.sleep(_END_NOW_DELAY)
            key = _pv("$async(data)")
            entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
            if entry is not None and entry.code:
                KSR.htable.sht_rm(WAIT_TABLE, key)  # (the timer's backstop entry: whoever removes it ends it)
                self._end(key, entry)
        except Exception as exc:
            _crashed("end-now", exc)
        return 1

    def _window_expired(self) -> None:
        key = _pv("$shtrecord(key)")
        entry = calls.WaitEntry.decode(_pv("$shtrecord(value)"))
        if not key or entry is None:
            return
        self._end(key, entry)

    def _end(self, key: str, entry: calls.WaitEntry) -> None:
        """The call's wait is over (window end, or a busy/decline code in the entry): answer it."""
        end = entry.window_end(fallback=bool(self._fallback_uri(entry.aor)))
        if end.to_fallback:
            KSR.htable.sht_setxs(FALLBACK_TABLE, key, entry.aor, 120)
        self._finish(entry, key, reason=end.reason, reply=end.reply, answered=False, cancel=end.to_fallback)

    def ksr_dispatcher(self, msg: object, idx: str = "0") -> int:
        """evrexec worker: run the push dispatcher's asyncio loop in this dedicated process."""
        # evrexec processes get no child_init: the dispatcher's push outcome lines need this
        ksrlog.install(KSR, _get_def("LOG_LEVEL"))
        _set_debug_level(_get_def("LOG_LEVEL"))
        while True:
            try:
                _log(KSR.info, "dispatcher-start", worker=idx)
                dispatcher = Dispatcher(self.cfg.settings, consumer=f"kamailio-{idx}",
                                        on_call_token_dead=self._call_token_dead)
                asyncio.run(dispatcher.run(asyncio.Event()))
            except Exception as exc:
                _log(KSR.err, "dispatcher-crashed", worker=idx, error=_error_text(exc))
            time.sleep(1.0)

    def _call_token_dead(self, job: PushJob, device: Device) -> None:
        """(the in-process dispatcher, on a dead token in a call push) A call parked only for
        devices that can no longer be reached ends now, as at its window's end (480 or the
        fallback URI, the missed-call push owed), not after its whole window."""
        key = calls.call_key(job.data.get("call_id", ""))
        entry = calls.WaitEntry.decode(KSR.htable.sht_get(WAIT_TABLE, key))
        if entry is None:
            return
        unreachable = calls.add_pending_call(KSR.htable.sht_get(UNREACHABLE_TABLE, key), device.device_id)
        KSR.htable.sht_setxs(UNREACHABLE_TABLE, key, unreachable, max(1, int(self.cfg.settings.wait_window)) + 5)
        try:
            call = self.state.parked(entry.aor, key)
        except StoreUnavailable as exc:
            _log(KSR.err, "unreachable-state-unavailable", aor=entry.aor, call=key, error=exc)
            return
        counted = KSR.htable.sht_get(BRANCH_COUNT_TABLE, key)
        if counted is None:
            return  # parked from a branch failure: its other branches are not counted (see _nobody_left)
        if calls.nobody_can_answer(call, calls.pending_calls(unreachable), int(counted)):
            _log(KSR.notice, "nobody-reachable", aor=entry.aor, call=key, dead=unreachable)
            # the window timer ends it within 1-2 s by the usual path (its entry: whoever removes it ends it)
            KSR.htable.sht_rm(WAIT_TABLE, key)
            KSR.htable.sht_setxs(WAIT_TABLE, key, entry.encode(), 1)

    # ------------------------------------------------------------------ role mode (python_exec)

    @staticmethod
    def _verdict(where: str, route: Callable[[], bool]) -> int:
        try:
            done = route()
        except Exception as exc:
            # answered here, and "done": the host must not route a request the role half handled
            _crashed(where, exc)
            _answer_500()
            done = True
        KSR.pv.sets("$var(pusher)", "done" if done else "next")
        return 1

    def pusher_pre(self, msg: object) -> int:
        return self._verdict("pre", self.route_parking)

    def pusher_register(self, msg: object) -> int:
        return self._verdict("register", self.route_register)

    def pusher_invite(self, msg: object) -> int:
        return self._verdict("invite", lambda: self.route_invite(role=True))

    def pusher_message(self, msg: object) -> int:
        return self._verdict("message", lambda: self.route_message(role=True))

    def pusher_uac_reply(self, msg: object) -> int:
        return self.ksr_uac_event(msg)

    def pusher_cancel(self, msg: object) -> int:
        return self._verdict("cancel", self._cancel_parked)

    def pusher_reply(self, msg: object) -> int:
        return self.ksr_onreply_route(msg)

    def pusher_failure(self, msg: object) -> int:
        """route(PUSHER_FAILURE): "done" when the role handled the failure (the host's failure
        route must then stop), "next" when the host's failure handling applies."""
        try:
            done = self._failure_route()
        except Exception as exc:
            _crashed("failure", exc)
            KSR.tm.t_reply(500, "Server Internal Error")
            done = True
        KSR.pv.sets("$var(pusher)", "done" if done else "next")
        return 1

    def pusher_branch_failure(self, msg: object) -> int:
        return self.ksr_branch_failure(msg)

    def pusher_end_now(self, msg: object) -> int:
        return self.ksr_end_now(msg)

    def pusher_retry_end(self, msg: object) -> int:
        return self.ksr_htable_event(msg, f"htable:expired:{RETRY_TABLE}")

    def pusher_expired(self, msg: object) -> int:
        return self.ksr_htable_event(msg, f"htable:expired:{WAIT_TABLE}")

    def pusher_dispatcher(self, msg: object) -> int:
        return self.ksr_dispatcher(msg, "0")
