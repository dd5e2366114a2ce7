"""`make demo`: the flagship flow on loopback, measured from a packet capture.

Starts redis-server, the sandbox APNs/FCM providers and Kamailio (KEMI mode, push role, digest
auth on, embedded defaults) on free loopback ports with their own temp dirs. An iPhone-like device
registers over TCP with RFC 8599 params (answering the digest challenge) and goes silent; a caller
calls it; the proxy parks the call and the dispatcher sends a VoIP push to the sandbox; when the
sandbox has it the demo wakes the device (an authenticated re-REGISTER), the parked INVITE reaches
the device, it answers, and the caller hangs up.

The timeline comes from one clock: a tshark capture of loopback (the SIP port, the sandbox port and
the device's port) plus the sandbox's own push record time. Output ends with a line starting
`demo: call completed` and the next step (`NEXT_STEP`: `make demo-api`, a custom notification through
the HTTP API), exit status 0; on any failure a `demo: FAILED: ...` line and exit status 1.
Either way every process the demo started is stopped by PID and every temp dir removed; the
`demo: processes` line lists the process groups it started, all checked gone.

Run: `.venv/bin/python -m harness.demo` (needs kamailio, redis-server, sipp and tshark).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from harness.localrun import group_members, stop_process
from harness.localstack import BUNDLE, DOMAIN, TEAM, SippRun, Stack, push_stack, sipp_caller, sipp_device
from harness.sipua import SipClient, apns_token, rfc8599_apns_contact
from pushlib.models import Device, Provider, PushJob, PushKind, PushParams

CALLEE = "bob"  # the sleeping iPhone's user (a local subscriber: its REGISTERs are challenged)
# caller-call.xml calls From "alice": not a local subscriber, so her INVITE is not challenged
CALLER = "alice"
TSHARK_READY_TIMEOUT = 15.0
CALL_HOLD_MS = 300

# The timeline events, in the order they must happen (the test checks this order).
EVENTS = (
    "INVITE in",
    "push sent",
    "push received by the sandbox",
    "REGISTER in",
    "INVITE out to the device",
    "200 OK to the caller",
    "BYE in",
    "200 OK to the BYE",
)


class DemoError(RuntimeError):
    """A step of the flow failed; the message says which and why."""


class _Terminated(BaseException):
    """SIGTERM/SIGHUP: unwind through every cleanup like Ctrl-C does."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signal.Signals(signum).name)


def say(line: str) -> None:
    print(f"demo: {line}", flush=True)


# --------------------------------------------------------------------------- processes


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _tcp_ports_to(remote_port: int, pgid: int) -> set[int]:
    """Local ports of the TCP connections to 127.0.0.1:`remote_port` held by process group `pgid`:
    how the capture tells the dispatcher (a Kamailio child) from the demo's own sandbox polling."""
    inodes = _socket_inodes(group_members({pgid}))
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, inode = cols[1], cols[2], cols[9]
        if int(remote.split(":")[1], 16) == remote_port and inode in inodes:
            ports.add(int(local.split(":")[1], 16))
    return ports


@dataclass
class Capture:
    """A running tshark on lo writing `path`."""

    proc: subprocess.Popen[bytes]
    path: Path
    ports: tuple[int, ...]


@contextmanager
def capture(tmpdir: Path, ports: tuple[int, ...], started: list[tuple[str, int]]) -> Iterator[Capture]:
    """tshark on lo for `ports`, yielded once it is capturing (bounded wait); stopped by PID."""
    path = tmpdir / "demo.pcapng"
    err_path = tmpdir / "tshark.err"
    bpf = " or ".join(f"port {p}" for p in ports)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            ["tshark", "-i", "lo", "-q", "-w", str(path), "-f", bpf],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    started.append(("tshark", proc.pid))
    try:
        # tshark prints "Capturing on 'Loopback: lo'" once dumpcap has the interface open with
        # the filter applied: packets after that line are in the file.
        end = time.monotonic() + TSHARK_READY_TIMEOUT
        while "Capturing on" not in err_path.read_text(errors="replace"):
            if proc.poll() is not None:
                raise DemoError(f"tshark exited: {err_path.read_text(errors='replace').strip()}")
            if time.monotonic() > end:
                raise DemoError(f"tshark not capturing after {TSHARK_READY_TIMEOUT:.0f} s")
            time.sleep(0.02)
        yield Capture(proc, path, ports)
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class Packet:
    time: float
    src: int
    dst: int
    tcp_len: int
    method: str
    status: str
    cseq_method: str
    authorization: bool
    tls_types: str


def read_capture(cap: Capture, sip_port: int, sandbox_port: int, device_port: int) -> list[Packet]:
    """The captured TCP packets, decoded (SIP on the proxy and device ports, TLS on the sandbox's)."""
    fields = ["frame.time_epoch", "tcp.srcport", "tcp.dstport", "tcp.len", "sip.Method", "sip.Status-Code",
              "sip.CSeq.method", "sip.Authorization", "tls.record.content_type"]
    argv = ["tshark", "-r", str(cap.path), "-Y", "tcp", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f",
            "-d", f"tcp.port=={sip_port},sip", "-d", f"tcp.port=={device_port},sip",
            "-d", f"tcp.port=={sandbox_port},tls"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise DemoError(f"tshark could not read the capture: {out.stderr.strip()[-500:]}")
    packets = []
    for line in out.stdout.splitlines():
        ts, src, dst, tlen, method, status, cseq_m, auth, tls = (line.split("\t") + [""] * 9)[:9]
        packets.append(Packet(float(ts), int(src), int(dst), int(tlen or 0), method, status, cseq_m,
                              bool(auth), tls))
    return packets


# --------------------------------------------------------------------------- the flow


def warm_up(stack: Stack) -> float:
    """Open the dispatcher's HTTP/2 + TLS connection to the (sandbox) APNs host before the call, so
    the call's push shows the steady state rather than a TCP+TLS handshake and a JWT signature: a
    registration-refresh push to another device of the same app. Returns its enqueue-to-delivery
    time in seconds."""
    token = apns_token()
    now = time.time()
    params = PushParams(Provider.APNS, BUNDLE, alert_token=token, team_id=TEAM)
    aor = f"sip:warmup@{DOMAIN}"
    stack.store.save_device(Device(aor, "warmup", params, registered_at=now, expires_at=now + 600,
                                   user_agent="demo warm-up"))
    stack.store.enqueue(PushJob(str(uuid.uuid4()), PushKind.REGISTRATION_REFRESH, aor, deadline=now + 20,
                                created_at=now))
    pushes = stack.wait_pushes(token, 1, timeout=15, poll=0.01)
    if not pushes:
        raise DemoError("warm-up push did not reach the sandbox within 15 s")
    return float(pushes[0]["time"]) - now


def first(packets: list[Packet], after: float, what: str, match: Any) -> float:
    """Time of the first packet at or after `after` satisfying `match`; DemoError names `what`."""
    for p in packets:
        if p.time >= after and match(p):
            return p.time
    raise DemoError(f"the capture has no {what}")


def run_demo(started: list[tuple[str, int]]) -> str:
    """The whole flow; returns the summary for the last line. Appends (name, pid) of every process
    group it starts to `started` (as soon as it exists, so a failure still reports it)."""
    t0 = time.monotonic()
    with ExitStack() as es:
        stack = es.enter_context(push_stack(auth=True))
        kam = stack.kamailio
        assert kam.proc is not None
        sandbox = stack.handle
        started += [("redis", stack.redis.proc.pid), ("sandbox", sandbox.proc.pid), ("kamailio", kam.proc.pid)]
        sip_port = kam.port
        say(f"stack up in {time.monotonic() - t0:.1f} s on loopback: Kamailio SIP 127.0.0.1:{sip_port} "
            f"(UDP+TCP), redis :{stack.redis.port}, sandbox APNs/FCM {sandbox.url}")
        say(f"digest auth ON (realm {DOMAIN}); wait window {stack.settings.wait_window:g} s, "
            "awake window 10 s (embedded defaults)")

        password = stack.add_user(CALLEE)
        device = sipp_device(stack.tmpdir, "tcp")
        started.append(("sipp-device", device.proc.pid))
        token = apns_token()
        contact = rfc8599_apns_contact(device.port, token, "tcp", instance=str(uuid.uuid4()), user=CALLEE)
        with SipClient(sip_port, "tcp") as c:
            r = c.register(CALLEE, contact, password=password, user_agent="DemoPhone/1.0 iOS")
        if r.status != 200:
            raise DemoError(f"device REGISTER got {r.status} {r.reason}")
        caps = ", ".join(r.header("Feature-Caps")) or "-"
        say(f"{CALLEE}@{DOMAIN} registered over TCP with digest auth (200 OK, Feature-Caps: {caps}): "
            f"pn-provider=apns pn-param={TEAM}.{BUNDLE}.voip pn-prid={token[:8]}…; answers on :{device.port}")
        aor = f"sip:{CALLEE}@{DOMAIN}"
        # The app sleeps: a phone that registered seconds ago counts as awake (AWAKE_WINDOW) and is
        # called directly; back-dating its record makes it the sleeping phone of the story.
        for d in stack.store.devices(aor):
            stack.store.save_device(replace(d, registered_at=time.time() - 3600))
        say("the device goes silent (its last REGISTER back-dated 1 h, past the awake window)")

        warm = warm_up(stack)
        say(f"warm-up: a registration-refresh push to another device opened the dispatcher's HTTP/2+TLS "
            f"connection to the sandbox ({warm * 1000:.0f} ms); the call's push reuses it")

        cap = es.enter_context(capture(stack.tmpdir, (sip_port, sandbox.port, device.port), started))
        say(f"tshark capturing lo (ports {sip_port}, {sandbox.port}, {device.port}); {CALLER} calls {CALLEE} over TCP")
        dispatcher_ports = _tcp_ports_to(sandbox.port, kam.proc.pid)
        caller = sipp_caller(stack.tmpdir, sip_port, CALLEE, "tcp", args=["-d", str(CALL_HOLD_MS)])
        started.append(("sipp-caller", caller.proc.pid))
        pushes = stack.wait_pushes(token, 1, timeout=10, poll=0.002)
        if not pushes:
            raise DemoError("no VoIP push reached the sandbox within 10 s:\n" + kam.log()[-2000:])
        push = pushes[0]
        # the app wakes: a new TCP connection and an authenticated REGISTER (401, then 200)
        with SipClient(sip_port, "tcp") as c:
            r = c.register(CALLEE, contact, password=password, user_agent="DemoPhone/1.0 iOS")
        if r.status != 200:
            raise DemoError(f"wake REGISTER got {r.status} {r.reason}")
        _expect_sipp(caller, "caller", 30)
        if caller.final_codes() != [200]:
            raise DemoError(f"the caller's final answer was {caller.final_codes()}, not [200]")
        _expect_sipp(device, "device", 15)
        dispatcher_ports |= _tcp_ports_to(sandbox.port, kam.proc.pid)
        time.sleep(0.2)  # the last packets reach the file before tshark stops
        stop_process(cap.proc)
        packets = read_capture(cap, sip_port, sandbox.port, device.port)

        invite_in = first(packets, 0, "INVITE from the caller",
                          lambda p: p.method == "INVITE" and p.dst == sip_port)
        if dispatcher_ports:
            def from_dispatcher(p: Packet) -> bool:
                return p.src in dispatcher_ports
            sender = "dispatcher -> sandbox, first TLS data"
        else:  # /proc gave nothing (unexpected): anything that is not the demo's own polling
            own = _tcp_ports_to(sandbox.port, os.getpgid(0))

            def from_dispatcher(p: Packet) -> bool:
                return p.src not in own
            sender = "-> sandbox, first TLS data (dispatcher port unknown)"
        push_sent = first(packets, invite_in, "TLS data to the sandbox after the INVITE",
                          lambda p: p.dst == sandbox.port and p.tcp_len > 0 and "23" in p.tls_types.split(",")
                          and from_dispatcher(p))
        push_received = float(push["time"])
        register_in = first(packets, push_received, "authenticated REGISTER after the push",
                            lambda p: p.method == "REGISTER" and p.dst == sip_port and p.authorization)
        invite_out = first(packets, register_in, "INVITE to the device",
                           lambda p: p.method == "INVITE" and p.dst == device.port)
        ok_caller = first(packets, invite_out, "200 OK (INVITE) to the caller",
                          lambda p: p.status == "200" and p.cseq_method == "INVITE" and p.src == sip_port)
        bye_in = first(packets, ok_caller, "BYE from the caller",
                       lambda p: p.method == "BYE" and p.dst == sip_port)
        ok_bye = first(packets, bye_in, "200 OK (BYE) to the caller",
                       lambda p: p.status == "200" and p.cseq_method == "BYE" and p.src == sip_port)
        trying = next((p.time for p in packets if p.time >= invite_in and p.status == "100"
                       and p.cseq_method == "INVITE" and p.src == sip_port), None)
        parked = "" if trying is None else f"; parked, 100 Trying at t+{(trying - invite_in) * 1000:.1f} ms"
        log = kam.log()
        if "pusher: park" not in log or "pusher: wake" not in log:
            raise DemoError("Kamailio's log lacks the park/wake lines: the call did not take the push path")
        timeline = [
            (EVENTS[0], invite_in, f"caller -> proxy :{sip_port}{parked}"),
            (EVENTS[1], push_sent, sender),
            (EVENTS[2], push_received, f"{push.get('push_type')} push, topic {push.get('topic')}, sandbox clock"),
            (EVENTS[3], register_in, "woken device, with Authorization"),
            (EVENTS[4], invite_out, f"proxy -> device :{device.port}"),
            (EVENTS[5], ok_caller, "the device rang 200 ms and answered"),
            (EVENTS[6], bye_in, f"caller hangs up after {CALL_HOLD_MS} ms"),
            (EVENTS[7], ok_bye, "proxy -> caller"),
        ]
        say("timeline (ms after the INVITE; loopback capture + sandbox record, one clock):")
        for name, t, detail in timeline:
            say(f"t+{(t - invite_in) * 1000:9.2f} ms  {name:<29} {detail}")
        return (f"INVITE in -> push received {(push_received - invite_in) * 1000:.1f} ms, "
                f"REGISTER in -> INVITE out {(invite_out - register_in) * 1000:.2f} ms, "
                f"INVITE in -> 200 OK {(ok_caller - invite_in) * 1000:.1f} ms (200 ms of ringing), hung up")
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def _expect_sipp(run: SippRun, who: str, timeout: float) -> None:
    code = run.wait(timeout)
    if code != 0:
        raise DemoError(f"the {who} (SIPp) ended with {code}:\n{run.logs()[-1500:]}")


NEXT_STEP = ("next: `make demo-api` sends one custom notification through the HTTP API to an iPhone and an "
             "Android phone and shows what the sandbox received")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when the call completed, 1 otherwise. Nothing it started outlives it."""
    del argv  # no options: the demo runs on embedded defaults
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started: list[tuple[str, int]] = []
    summary = ""
    error = ""
    try:
        summary = run_demo(started)
    except DemoError as exc:
        error = str(exc)
    except (KeyboardInterrupt, _Terminated) as exc:
        error = f"interrupted ({exc.__class__.__name__} {exc})"
    except Exception as exc:  # a start-up failure (no kamailio, port trouble...) is still reported plainly
        error = f"{exc.__class__.__name__}: {exc}"
    left = group_members({pid for _, pid in started})
    names = " ".join(f"{name}={pid}" for name, pid in started)
    say(f"processes (own process groups): {names}; " + (f"STILL ALIVE: {left}" if left else "all stopped"))
    if left and not error:
        error = f"processes left behind: {left}"
    if error:
        print(f"demo: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    say(f"call completed: {summary}")
    say(NEXT_STEP)
    return 0


if __name__ == "__main__":
    sys.exit(main())
