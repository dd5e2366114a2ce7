"""The whole SIP push stack on loopback, for the demo, the integration tests and the benchmarks.

- `kamailio_process()` runs the project's Kamailio (KEMI or role mode) in the foreground on a
  free loopback port with its own runtime dir; stopped by PID, dir removed.
- `push_stack()` starts redis-server + the sandbox providers + Kamailio (auth on by default),
  registers sandbox apps (an APNs token-auth app and an FCM app) and yields a `Stack` with
  everything a flow needs.
- `sipp_device()` / `sipp_caller()` run SIPp: the answering half of a simulated device (a UAS
  on the port its Contact points at) and a caller. The REGISTER half is `harness.sipua.SipClient`.

Every process is started in its own session (process group = its PID) and stopped by that
PID; nothing is ever stopped by name, because other stacks may run on the same machine.
The stack needs the source checkout (kamailio/, kemi/, sipp-scenarios/ next to pushlib/).
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from harness.localrun import ROOT, RedisServer, free_port, redis_server, stop_process, wait_for_port
from harness.sipua import BUNDLE, DOMAIN, FCM_PROJECT, TEAM
from pushlib.credentials import Subscribers
from pushlib.models import AppCredentials, Provider, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle, sandbox_process

KAMAILIO_CFG = ROOT / "kamailio" / "kamailio.cfg"
SCENARIOS = ROOT / "sipp-scenarios"

__all__ = [
    "BUNDLE", "DOMAIN", "FCM_PROJECT", "KAMAILIO_CFG", "SCENARIOS", "TEAM",
    "KamailioProc", "PushEnv", "SippRun", "Stack", "check_config", "device_params", "kamailio_process",
    "push_env", "push_kind", "push_stack", "pusher_defines", "sipp_caller", "sipp_device", "sipp_events",
    "stop_all_sipp", "wait_log",
]


# --------------------------------------------------------------------------- Kamailio


@dataclass
class KamailioProc:
    """One Kamailio instance: `-DD -E` (foreground, log to stderr, captured per start in
    `rundir/kamailio-<n>.log`), runtime files in `rundir`, SIP_PORT forced to `port`."""

    port: int
    cfg: Path
    defines: dict[str, str | None]
    rundir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    host: str = "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.rundir / f"kamailio-{self.starts}.log"

    def log(self) -> str:
        """All logs of all starts, oldest first."""
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.rundir.glob("kamailio-*.log"))
        )

    def args(self) -> list[str]:
        # -w rundir: a core file (or anything else Kamailio writes) lands in the run dir, never in
        # the checkout; the router is then named by its absolute path
        argv = ["kamailio", "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.rundir), "-w", str(self.rundir)]
        defines = {"KEMI_ROUTER": f'"{ROOT / "kemi" / "router.py"}"', **self.defines}
        defines["SIP_PORT"] = str(self.port)
        for name, value in defines.items():
            argv += ["-A", name if value is None else f"{name}={value}"]
        return argv

    def start(self) -> None:
        """Start and wait until the router logged `pusher: ready`; on failure stop it and raise
        RuntimeError carrying the log tail."""
        self.spawn()
        try:
            wait_for_port(self.port, self.host, timeout=15)
            wait_log(self, "pusher: ready", timeout=15, since=self.starts)
        except TimeoutError:
            self.stop()
            raise RuntimeError("kamailio did not start:\n" + self.log()[-4000:]) from None

    def spawn(self) -> None:
        """Start the process (its output goes to the log file), without waiting for it."""
        self.starts += 1
        with open(self.log_path, "wb") as out:
            # cwd=ROOT: the cfg's default KEMI_ROUTER is relative to the checkout
            self.proc = subprocess.Popen(
                self.args(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env},
            )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def wait_log(k: KamailioProc, needle: str, timeout: float = 10.0, since: int = 0) -> str:
    """Wait until `needle` appears in the Kamailio log (of start number >= since); return the line.
    Raises TimeoutError, or RuntimeError when Kamailio exited meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for path in sorted(k.rundir.glob("kamailio-*.log")):
            if since and int(path.stem.split("-")[1]) < since:
                continue
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        if k.proc is not None and k.proc.poll() is not None:
            raise RuntimeError("kamailio exited:\n" + k.log()[-4000:])
        time.sleep(0.05)
    raise TimeoutError(f"{needle!r} not in kamailio log after {timeout}s")


def check_config(cfg: Path, defines: Mapping[str, str | None]) -> subprocess.CompletedProcess[str]:
    """`kamailio -c` on a config with defines (exit code 0 = valid)."""
    argv = ["kamailio", "-c", "-f", str(cfg)]
    for name, value in defines.items():
        argv += ["-A", name if value is None else f"{name}={value}"]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def pusher_defines(
    redis_url: str, *, auth: bool = False, wait_window: float = 30, awake_window: float = 10,
    external_dispatcher: bool = False, extra: Mapping[str, str | None] | None = None,
) -> dict[str, str | None]:
    """The `-A` defines of a push-role Kamailio (2 SIP workers: enough on loopback)."""
    defines: dict[str, str | None] = {
        "WITH_PUSHER": None,
        "REDIS_URL": f'"{redis_url}"',
        "WAIT_WINDOW": str(int(wait_window)),
        "AWAKE_WINDOW": str(int(awake_window)),
        "CHILDREN": "2",
        "LOG_LEVEL": "2",
    }
    if not auth:
        defines["WITHOUT_AUTH"] = None
    if external_dispatcher:
        defines["WITH_EXTERNAL_DISPATCHER"] = None
    defines.update(extra or {})
    return defines


@contextmanager
def kamailio_process(
    defines: Mapping[str, str | None], cfg: Path = KAMAILIO_CFG, env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1", port: int | None = None,
) -> Iterator[KamailioProc]:
    """A started Kamailio on a free loopback port (or `port`) of `host` (its LISTEN_IP when not
    127.0.0.1); stopped by PID and its dir removed on exit."""
    rundir = Path(tempfile.mkdtemp(prefix="pn-kamailio-"))
    defines = {**defines, "LISTEN_IP": host} if host != "127.0.0.1" else defines
    k = KamailioProc(port or free_port(), cfg, dict(defines), rundir, dict(env or {}), host=host)
    try:
        k.start()
        yield k
    finally:
        k.stop()
        shutil.rmtree(rundir, ignore_errors=True)


# --------------------------------------------------------------------------- SIPp


@dataclass
class SippRun:
    """One SIPp process (`-m 1`) with its traces in `workdir`."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    port: int
    transport: str

    def wait(self, timeout: float = 60.0) -> int:
        """Exit code of SIPp (0 = scenario passed); -1 if it had to be stopped after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            return -1

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))

    def messages(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*messages*")))

    def final_codes(self) -> list[int]:
        return [int(c) for c in re.findall(r"final=(\d{3})", self.logs())]

    def received(self, method: str) -> int:
        """How many `method` requests this SIPp instance received."""
        return len(re.findall(rf"(?m)^{method} sip:", self.messages()))

    def stop(self) -> None:
        stop_process(self.proc)


_RUNNING: list[SippRun] = []


def stop_all_sipp() -> None:
    """Stop every SIPp process these helpers started that is still running (teardown)."""
    while _RUNNING:
        _RUNNING.pop().stop()


def _sipp(scenario: str, args: Sequence[str], workdir: Path, port: int, transport: str) -> SippRun:
    argv = [
        "sipp", "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port),
        "-t", "u1" if transport == "udp" else "t1", "-m", "1", "-nostdin",
        "-trace_logs", "-log_file", str(workdir / "sipp.log"),
        "-trace_err", "-error_file", str(workdir / "errors.log"),
        "-trace_msg", "-message_file", str(workdir / "sipp_messages.txt"),
        "-timeout", "90s", "-timeout_error", *args,
    ]
    with open(workdir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    run = SippRun(proc, workdir, port, transport)
    _RUNNING.append(run)
    return run


def _port_taken(port: int, transport: str) -> bool:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def sipp_device(tmp: Path, transport: str, scenario: str = "device-answer.xml",
                args: Sequence[str] = (), port: int | None = None) -> SippRun:
    """A device's answering half: a SIPp UAS on a free port; returns once it listens.
    Its workdir is created under `tmp` (the caller removes `tmp`)."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dev-", dir=tmp))
    run = _sipp(scenario, ["-d", "200", *args], workdir, port, transport)
    end = time.monotonic() + 10
    while not _port_taken(port, transport):
        if run.proc.poll() is not None or time.monotonic() > end:
            run.stop()
            raise RuntimeError(f"sipp device did not start: {(workdir / 'stderr.log').read_text()}")
        time.sleep(0.02)
    return run


def sipp_caller(tmp: Path, proxy_port: int, callee: str, transport: str,
                scenario: str = "caller-call.xml", args: Sequence[str] = (),
                proxy_host: str = "127.0.0.1") -> SippRun:
    """A caller calling `callee`@proxy (starts at once; `wait()` for its result)."""
    workdir = Path(tempfile.mkdtemp(prefix="caller-", dir=tmp))
    return _sipp(scenario, ["-s", callee, *args, f"{proxy_host}:{proxy_port}"], workdir, free_port(), transport)


_SIPP_STAMP = re.compile(r"^-+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n(.*?) message (sent|received)", re.M)


def sipp_events(run: SippRun) -> list[tuple[float, str, str]]:
    """(epoch, "sent"|"received", first line) for every message in a SIPp -trace_msg log."""
    text = run.messages()
    out: list[tuple[float, str, str]] = []
    for m in _SIPP_STAMP.finditer(text):
        stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        rest = text[m.end():].lstrip(" :(0123456789bytes)[]\n")
        first = rest.split("\n", 1)[0].strip()
        out.append((stamp, m.group(3), first))
    return out


# --------------------------------------------------------------------------- the whole stack


@dataclass
class Stack:
    """A running push stack. `sandbox` is a `SandboxHandle` (typed `object` for the callers
    that still reach into it with a type-ignore; use `handle` for a typed view)."""

    redis: RedisServer
    kamailio: KamailioProc
    store: SyncStore
    subscribers: Subscribers
    sandbox: object
    apns_app: AppCredentials
    fcm_app: AppCredentials
    settings: Settings
    tmpdir: Path
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def handle(self) -> SandboxHandle:
        return cast(SandboxHandle, self.sandbox)

    def add_user(self, user: str, password: str | None = None) -> str:
        """Create (or reset) subscriber `user`@DOMAIN; returns the password."""
        password = password or secrets.token_hex(8)
        self.subscribers.set_password(user, DOMAIN, password)
        self.passwords[user] = password
        return password

    def pushes(self, token: str | None = None) -> list[dict[str, Any]]:
        """Pushes the sandbox accepted (to `token` if given), oldest first."""
        return self.handle.control.pushes(token)

    def wait_pushes(self, token: str, count: int = 1, timeout: float = 10.0,
                    kind: str | None = None, poll: float = 0.05) -> list[dict[str, Any]]:
        """Pushes to `token` (of `kind`) once there are `count`, or whatever came by `timeout`."""
        end = time.monotonic() + timeout
        while True:
            got = [p for p in self.pushes(token) if kind is None or push_kind(p) == kind]
            if len(got) >= count or time.monotonic() > end:
                return got
            time.sleep(poll)


def push_kind(record: Mapping[str, object]) -> str:
    """The notification kind a sandbox push record carries (payload field `type` / `kind`)."""
    payload = record.get("payload")
    text = str(payload)
    m = re.search(r"'(?:type|kind|event)': '(\w+)'", text)
    return m.group(1) if m else ""


@contextmanager
def push_stack(*, auth: bool = True, wait_window: float = 30, awake_window: float = 10,
               extra_defines: Mapping[str, str | None] | None = None,
               redis: RedisServer | None = None, cfg: Path = KAMAILIO_CFG) -> Iterator[Stack]:
    """Redis + sandbox + Kamailio (KEMI mode, push role, in-process dispatcher, auth on by default),
    yielded once the dispatcher started. Everything (SIPp runs included) is stopped by PID and
    every temp dir removed on exit, also when start-up fails half way.

    `cfg` may name a native host config including kamailio/pusher-role.cfg (role mode)."""
    with ExitStack() as es:
        env = push_env(es, redis, wait_window)
        defines = pusher_defines(env.redis.url, auth=auth, wait_window=wait_window, awake_window=awake_window,
                                 extra=extra_defines)
        k = es.enter_context(kamailio_process(defines, cfg=cfg))
        wait_log(k, "pusher: dispatcher-start", timeout=15)
        yield env.stack(k)


class RedisEndpoint(Protocol):
    """A Redis the stack can use: one server (`RedisServer`), or a Redis Cluster
    (`harness.rediscluster.RedisCluster`, its `redis+cluster://` URL)."""

    @property
    def url(self) -> str: ...


@dataclass
class PushEnv:
    """What every push stack runs beside its Kamailio node(s): Redis, the sandbox providers with
    their two apps registered, and a store on that Redis."""

    redis: RedisEndpoint
    sandbox: SandboxHandle
    settings: Settings
    store: SyncStore
    apns_app: AppCredentials
    fcm_app: AppCredentials
    tmpdir: Path

    def stack(self, kamailio: KamailioProc) -> Stack:
        # (a Redis Cluster for the cluster tests, which never stop or restart it through the Stack)
        return Stack(cast(RedisServer, self.redis), kamailio, self.store, Subscribers(self.store.client), self.sandbox,
                     self.apns_app, self.fcm_app, self.settings, self.tmpdir)


def push_env(es: ExitStack, redis: RedisEndpoint | None, wait_window: float) -> PushEnv:
    """Start (in `es`, undone in reverse order) the sandbox and, unless given, Redis; register the
    sandbox's apps; SIPp runs are stopped too when `es` closes."""
    tmpdir = Path(tempfile.mkdtemp(prefix="pn-stack-"))
    es.callback(shutil.rmtree, tmpdir, True)
    srv: RedisEndpoint = redis if redis is not None else es.enter_context(redis_server())
    sandbox = es.enter_context(sandbox_process())
    settings = Settings(redis_url=srv.url, wait_window=wait_window)
    store = SyncStore(srv.url, settings)
    es.callback(store.close)
    apns_app = sandbox.control.apns_token_app(BUNDLE, TEAM)
    fcm_app = sandbox.control.fcm_app(FCM_PROJECT)
    store.save_app(apns_app)
    store.save_app(fcm_app)
    es.callback(stop_all_sipp)
    return PushEnv(srv, sandbox, settings, store, apns_app, fcm_app, tmpdir)


def device_params(token: str) -> PushParams:
    """The push params of an iOS VoIP device of the stack's APNs app."""
    return PushParams(Provider.APNS, BUNDLE, voip_token=token, team_id=TEAM)
