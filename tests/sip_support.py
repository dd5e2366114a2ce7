"""Kamailio, SIPp and SIP-client helpers for the integration tests and the demo.

- `kamailio_process()` runs the project's Kamailio (KEMI or role mode) in the foreground on a
  free loopback port with its own runtime dir; stopped by PID, dir removed.
- `push_stack()` starts redis-server + the sandbox providers + Kamailio (auth on by default),
  registers sandbox apps (an APNs token-auth app and an FCM app) and yields a `Stack` with
  everything a flow needs: `make demo` and the tests build on it.
- `SipClient` is a tiny UDP/TCP SIP sender for REGISTERs (with digest auth), used as the
  "REGISTER half" of a simulated device; `sipp_device()` is the answering half (a SIPp UAS
  on the port the Contact points at) and `sipp_caller()` the caller.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from pushlib.callstate import Subscribers, connect
from pushlib.models import AppCredentials, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import ROOT, RedisServer, free_port, redis_server, stop_process, wait_for_port

KAMAILIO_CFG = ROOT / "kamailio" / "kamailio.cfg"
NATIVE_HOST_CFG = ROOT / "tests" / "native-host.cfg"
SCENARIOS = ROOT / "sipp-scenarios"
DOMAIN = "127.0.0.1"
BUNDLE = "com.example.phone"
TEAM = "TEAM000001"
FCM_PROJECT = "example-phone"


# --------------------------------------------------------------------------- Kamailio


@dataclass
class KamailioProc:
    port: int
    cfg: Path
    defines: dict[str, str | None]
    rundir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.rundir / f"kamailio-{self.starts}.log"

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.rundir.glob("kamailio-*.log"))
        )

    def args(self) -> list[str]:
        argv = ["kamailio", "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.rundir), "-w", str(ROOT)]
        defines = dict(self.defines)
        defines["SIP_PORT"] = str(self.port)
        for name, value in defines.items():
            argv += ["-A", name if value is None else f"{name}={value}"]
        return argv

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.args(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env},
            )
        try:
            wait_for_port(self.port, timeout=15)
            wait_log(self, "pusher: ready", timeout=15, since=self.starts)
        except TimeoutError:
            self.stop()
            raise RuntimeError("kamailio did not start:\n" + self.log()[-4000:]) from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def wait_log(k: KamailioProc, needle: str, timeout: float = 10.0, since: int = 0) -> str:
    """Wait until `needle` appears in the Kamailio log (of start number >= since); return the line."""
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
    defines: dict[str, str | None] = {
        "WITH_PUSHER": None,
        "REDIS_URL": f'"{redis_url}"',
        "WAIT_WINDOW": str(int(wait_window)),
        "AWAKE_WINDOW": str(int(awake_window)),
        "CHILDREN": "2",
        "LOG_LEVEL": "2",
    }
    if auth:
        defines["WITH_AUTH"] = None
    if external_dispatcher:
        defines["WITH_EXTERNAL_DISPATCHER"] = None
    defines.update(extra or {})
    return defines


@contextmanager
def kamailio_process(
    defines: Mapping[str, str | None], cfg: Path = KAMAILIO_CFG, env: Mapping[str, str] | None = None
) -> Iterator[KamailioProc]:
    rundir = Path(tempfile.mkdtemp(prefix="pn-kamailio-"))
    k = KamailioProc(free_port(), cfg, dict(defines), rundir, dict(env or {}))
    try:
        k.start()
        yield k
    finally:
        k.stop()
        shutil.rmtree(rundir, ignore_errors=True)


# --------------------------------------------------------------------------- SIP client


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: str

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(raw: str) -> SipResponse:
    head = raw.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    m = re.match(r"SIP/2.0 (\d{3}) ?(.*)", lines[0])
    if not m:
        raise ValueError(f"not a SIP response: {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return SipResponse(int(m.group(1)), m.group(2), headers, raw)


def _digest(method: str, uri: str, user: str, password: str, challenge: str, cnonce: str) -> str:
    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
    realm, nonce = fields["realm"], fields["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    if "auth" in fields.get("qop", "").split(","):
        nc = "00000001"
        resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')
    resp = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5')


class SipClient:
    """One SIP endpoint socket (UDP or TCP) towards the proxy, for REGISTERs and raw requests."""

    def __init__(self, proxy_port: int, transport: str = "udp", host: str = "127.0.0.1") -> None:
        self.transport = transport
        self.proxy = (host, proxy_port)
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((host, 0))
        else:
            self.sock = socket.create_connection(self.proxy, timeout=5)
        self.sock.settimeout(5)
        self.local_port = int(self.sock.getsockname()[1])
        self._buf = b""

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: str) -> None:
        payload = data.encode("utf-8", "surrogateescape")
        if self.transport == "udp":
            self.sock.sendto(payload, self.proxy)
        else:
            self.sock.sendall(payload)

    def recv_response(self, timeout: float = 5.0, skip_provisional: bool = True) -> SipResponse:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no SIP response")
            self.sock.settimeout(left)
            if self.transport == "udp":
                data, _ = self.sock.recvfrom(65535)
                text = data.decode("utf-8", "replace")
            else:
                while b"\r\n\r\n" not in self._buf:
                    chunk = self.sock.recv(65535)
                    if not chunk:
                        raise ConnectionError("proxy closed the TCP connection")
                    self._buf += chunk
                head, rest = self._buf.split(b"\r\n\r\n", 1)
                m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
                length = int(m.group(1)) if m else 0
                while len(rest) < length:
                    rest += self.sock.recv(65535)
                self._buf = rest[length:]
                text = (head + b"\r\n\r\n" + rest[:length]).decode("utf-8", "replace")
            if not text.startswith("SIP/2.0"):
                continue  # a request (e.g. OPTIONS keepalive): ignore
            resp = parse_response(text)
            if skip_provisional and resp.status < 200:
                continue
            return resp

    def register(
        self,
        user: str,
        contact: str,
        *,
        expires: int | None = 300,
        password: str | None = None,
        user_agent: str = "PushTest/1.0",
        call_id: str | None = None,
        domain: str = DOMAIN,
        extra_headers: Sequence[str] = (),
        timeout: float = 5.0,
    ) -> SipResponse:
        """Send a REGISTER (answering one digest challenge when a password is given)."""
        call_id = call_id or uuid.uuid4().hex
        tag = secrets.token_hex(4)
        uri = f"sip:{domain}"
        auth: str | None = None
        for cseq in (1, 2):
            branch = "z9hG4bK" + secrets.token_hex(8)
            lines = [
                f"REGISTER {uri} SIP/2.0",
                f"Via: SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.local_port};branch={branch};rport",
                f"From: <sip:{user}@{domain}>;tag={tag}",
                f"To: <sip:{user}@{domain}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                f"Contact: {contact}",
                "Max-Forwards: 70",
                f"User-Agent: {user_agent}",
            ]
            if expires is not None:
                lines.append(f"Expires: {expires}")
            if auth:
                lines.append(f"Authorization: {auth}")
            lines += list(extra_headers)
            self.send_raw("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n")
            resp = self.recv_response(timeout)
            if resp.status == 401 and password is not None and auth is None:
                auth = _digest("REGISTER", uri, user, password, resp.header("WWW-Authenticate")[0],
                               secrets.token_hex(4))
                continue
            return resp
        return resp


def rfc8599_apns_contact(port: int, token: str, transport: str = "udp", instance: str | None = None,
                         user: str = "dev", bundle: str = BUNDLE, team: str = TEAM) -> str:
    c = (f"<sip:{user}@127.0.0.1:{port};transport={transport};pn-provider=apns;"
         f"pn-param={team}.{bundle}.voip;pn-prid={token}>")
    if instance:
        c += f';+sip.instance="<urn:uuid:{instance}>"'
    return c


def rfc8599_fcm_contact(port: int, token: str, transport: str = "udp", instance: str | None = None,
                        user: str = "dev", project: str = FCM_PROJECT) -> str:
    c = f"<sip:{user}@127.0.0.1:{port};transport={transport};pn-provider=fcm;pn-param={project};pn-prid={token}>"
    if instance:
        c += f';+sip.instance="<urn:uuid:{instance}>"'
    return c


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return "fcm" + secrets.token_urlsafe(40).replace("-", "A").replace("_", "B")


# --------------------------------------------------------------------------- SIPp


@dataclass
class SippRun:
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
    """Stop every SIPp process these helpers started that is still running (test teardown)."""
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
    """A device's answering half: a SIPp UAS on a free port; returns once it listens."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dev-", dir=tmp))
    run = _sipp(scenario, ["-d", "200", *args], workdir, port, transport)
    end = time.monotonic() + 10
    while not _port_taken(port, transport):
        if run.proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"sipp device did not start: {(workdir / 'stderr.log').read_text()}")
        time.sleep(0.02)
    return run


def sipp_caller(tmp: Path, proxy_port: int, callee: str, transport: str,
                scenario: str = "caller-call.xml", args: Sequence[str] = ()) -> SippRun:
    workdir = Path(tempfile.mkdtemp(prefix="caller-", dir=tmp))
    return _sipp(scenario, ["-s", callee, *args, f"127.0.0.1:{proxy_port}"], workdir, free_port(), transport)


# --------------------------------------------------------------------------- the whole stack


@dataclass
class Stack:
    redis: RedisServer
    kamailio: KamailioProc
    store: SyncStore
    subscribers: Subscribers
    sandbox: object  # pushlib.sandbox.process.SandboxHandle
    apns_app: AppCredentials
    fcm_app: AppCredentials
    settings: Settings
    tmpdir: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def add_user(self, user: str, password: str | None = None) -> str:
        password = password or secrets.token_hex(8)
        self.subscribers.set_password(user, DOMAIN, password)
        self.passwords[user] = password
        return password

    def pushes(self, token: str | None = None) -> list[dict[str, object]]:
        return self.sandbox.control.pushes(token)  # type: ignore[attr-defined,no-any-return]

    def wait_pushes(self, token: str, count: int = 1, timeout: float = 10.0,
                    kind: str | None = None) -> list[dict[str, object]]:
        end = time.monotonic() + timeout
        while True:
            got = [p for p in self.pushes(token) if kind is None or push_kind(p) == kind]
            if len(got) >= count or time.monotonic() > end:
                return got
            time.sleep(0.05)


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
    """Redis + sandbox + Kamailio (KEMI mode, push role, in-process dispatcher, auth on by default).

    `cfg=NATIVE_HOST_CFG` runs the role mode instead (a native host config including
    kamailio/pusher-role.cfg; the host does no authentication)."""
    from pushlib.sandbox.process import sandbox_process

    with ExitStack() as es:
        tmpdir = Path(tempfile.mkdtemp(prefix="pn-stack-"))
        es.callback(shutil.rmtree, tmpdir, True)
        srv = redis if redis is not None else es.enter_context(redis_server())
        sandbox = es.enter_context(sandbox_process())
        settings = Settings(redis_url=srv.url, wait_window=wait_window)
        store = SyncStore(srv.url, settings)
        es.callback(store.close)
        apns_app = sandbox.control.apns_token_app(BUNDLE, TEAM)
        fcm_app = sandbox.control.fcm_app(FCM_PROJECT)
        store.save_app(apns_app)
        store.save_app(fcm_app)
        defines = pusher_defines(srv.url, auth=auth, wait_window=wait_window, awake_window=awake_window,
                                 extra=extra_defines)
        es.callback(stop_all_sipp)
        k = es.enter_context(kamailio_process(defines, cfg=cfg))
        wait_log(k, "pusher: dispatcher-start", timeout=15)
        yield Stack(srv, k, store, Subscribers(connect(srv.url)), sandbox, apns_app, fcm_app, settings, tmpdir)


def device_params(token: str) -> PushParams:
    from pushlib.models import Provider

    return PushParams(Provider.APNS, BUNDLE, voip_token=token, team_id=TEAM)


# --------------------------------------------------------------------------- the flagship flow (demo)


_SIPP_STAMP = re.compile(r"^-+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n(.*?) message (sent|received)", re.M)


def sipp_events(run: SippRun) -> list[tuple[float, str, str]]:
    """(epoch, "sent"|"received", first line) for every message in a SIPp -trace_msg log."""
    import datetime

    text = run.messages()
    out: list[tuple[float, str, str]] = []
    for m in _SIPP_STAMP.finditer(text):
        stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        rest = text[m.end():].lstrip(" :(0123456789bytes)[]\n")
        first = rest.split("\n", 1)[0].strip()
        out.append((stamp, m.group(3), first))
    return out


def flagship_call(stack: Stack, transport: str = "tcp", user: str = "alice-phone") -> list[tuple[str, float]]:
    """The demo flow on a running stack: an iPhone-like device registers with RFC 8599 params and
    sleeps; a caller calls; the sandbox receives the VoIP push; the device wakes (re-REGISTERs with
    digest auth when the push arrives) and answers; the caller hangs up.

    Returns the timeline [(event, epoch seconds)] in order; raises AssertionError on any failure.
    """
    password = stack.passwords.get(user) or stack.add_user(user)
    token = apns_token()
    device = sipp_device(stack.tmpdir, transport)
    contact = rfc8599_apns_contact(device.port, token, transport, instance=str(uuid.uuid4()))
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, contact, password=password)
    assert r.status == 200, f"REGISTER: {r.status} {r.reason}"
    aor = f"sip:{user}@{DOMAIN}"
    from dataclasses import replace

    for d in stack.store.devices(aor):  # the app goes silent: its last REGISTER is long ago
        stack.store.save_device(replace(d, registered_at=time.time() - 3600))
    caller = sipp_caller(stack.tmpdir, stack.kamailio.port, user, transport, args=["-d", "500"])
    pushes = stack.wait_pushes(token, 1)
    assert pushes, "no push reached the sandbox"
    register_at = time.time()
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, contact, password=password)
    assert r.status == 200, f"wake REGISTER: {r.status} {r.reason}"
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert device.wait(15) == 0, device.logs()[-2000:]
    caller_ev, device_ev = sipp_events(caller), sipp_events(device)
    log = stack.kamailio.log()
    timeline = [
        ("INVITE sent by caller", next(t for t, d, f in caller_ev if d == "sent" and f.startswith("INVITE"))),
        ("push received by sandbox", float(pushes[0]["time"])),  # type: ignore[arg-type]
        ("REGISTER sent by woken device", register_at),
        ("INVITE received by device", next(t for t, d, f in device_ev if d == "received" and f.startswith("INVITE"))),
        ("200 OK received by caller", next(t for t, d, f in caller_ev if d == "received" and "200 OK" in f)),
        ("BYE answered", max(t for t, d, f in caller_ev if d == "received" and "200 OK" in f)),
    ]
    assert "pusher: park" in log and "pusher: wake" in log
    return timeline
