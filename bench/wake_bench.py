"""Wake-latency benchmark: park, push, wake, resume over real Kamailio, measured from a pcap.

Starts redis-server + the sandbox providers + Kamailio (KEMI mode, auth on, awake window 0 so
every call pushes) on loopback, captures the SIP, Redis and sandbox ports with tshark, and runs N
sequential calls:

    caller INVITE -> (proxy parks, pushes) -> sandbox records the VoIP push ->
    device re-REGISTERs (401, then authenticated) -> proxy sends the INVITE to the device -> 200

Reported (median / p99, milliseconds):
- wake latency: authenticated REGISTER in -> INVITE out to the device (pcap timestamps);
- INVITE -> push received: caller INVITE in (pcap) -> push recorded by the sandbox (same clock),
  split into segments from the same capture (Redis speaks plain RESP, so the job is visible):
    proxy       INVITE in -> the worker's XADD carrying the call's job
    redis_wake  XADD -> the reply that hands the entry to the dispatcher (its XREADGROUP)
    dispatcher  that reply -> first TLS payload packet on the dispatcher's connection to the sandbox
                (sub-split: -> job-devices EVALSHA sent, -> its reply, -> push on the wire)
    sandbox     push on the wire -> the sandbox's record time (its TLS/HTTP/2/validation work)
  plus the sandbox's answer (push on the wire -> first packet back), for reference.

The bench reads the sandbox's record only after the push is likely in (it polls from
--poll-after on, then every --poll-interval, and clears the record after each call), so its own
control requests do not compete with the push for the sandbox and the CPU.

Usage: .venv/bin/python bench/wake_bench.py [--calls 200] [--out bench/results/wake_bench.json]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.localrun import stop_process  # noqa: E402
from harness.localstack import DOMAIN, push_stack  # noqa: E402
from harness.sipua import SipClient, apns_token, rfc8599_apns_contact  # noqa: E402

# (name, start marker, end marker): the INVITE -> push received split; the first four add up.
SEGMENTS = (
    ("proxy", "invite_in", "xadd"),
    ("redis_wake", "xadd", "read_reply"),
    ("dispatcher", "read_reply", "push_sent"),
    ("sandbox", "push_sent", "recorded"),
    ("  disp: read->lookup", "read_reply", "devices_sent"),
    ("  disp: lookup (redis)", "devices_sent", "devices_reply"),
    ("  disp: lookup->push", "devices_reply", "push_sent"),
    ("sandbox answer", "push_sent", "push_answered"),
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 3),
        "p99_ms": round(percentile(values, 0.99) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
    }


def invite(user: str, call_id: str, port: int, proxy_port: int) -> str:
    return "\r\n".join([
        f"INVITE sip:{user}@{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{uuid.uuid4().hex};rport",
        f"From: \"Bench Caller\" <sip:caller@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <sip:{user}@{DOMAIN}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        f"Contact: <sip:caller@127.0.0.1:{port}>",
        "Max-Forwards: 70",
        "Content-Length: 0",
        "", "",
    ])


def answer_200(request: str, contact_port: int) -> str:
    head = request.split("\r\n\r\n", 1)[0].split("\r\n")
    keep = [h for h in head[1:] if re.match(r"(?i)(via|from|call-id|cseq|record-route)\s*:", h)]
    to = next(h for h in head[1:] if re.match(r"(?i)to\s*:", h))
    return ("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) + f"\r\n{to};tag=dev{uuid.uuid4().hex[:6]}\r\n"
            f"Contact: <sip:dev@127.0.0.1:{contact_port}>\r\nContent-Length: 0\r\n\r\n")


def recv_until(sock: socket.socket, pattern: str, timeout: float = 5.0) -> str:
    end = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, end - time.monotonic()))
        data = sock.recv(65535).decode("utf-8", "replace")
        if re.match(pattern, data):
            return data


def tcp_payloads(pcap: Path, port: int) -> list[tuple[float, int, int, bytes]]:
    """(epoch, src port, dst port, payload as captured) of every TCP packet with data on `port`."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"tcp.port=={port} && tcp.len>0", "-T", "fields",
         "-E", "separator=\t", "-e", "frame.time_epoch", "-e", "tcp.srcport", "-e", "tcp.dstport",
         "-e", "tcp.payload", "-d", f"tcp.port=={port},data"],
        capture_output=True, text=True, check=True,
    ).stdout
    packets = []
    for line in out.splitlines():
        ts, src, dst, payload = (line.split("\t") + [""] * 4)[:4]
        packets.append((float(ts), int(src), int(dst), bytes.fromhex(payload.replace(":", ""))))
    return packets


def kamailio_ports(sandbox_port: int) -> set[int]:
    """Local ports of Kamailio's (the in-process dispatcher's) connections to the sandbox."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dport", f"= :{sandbox_port}"],
                         capture_output=True, text=True, check=True).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if '"kamailio"' in line}


_JOB_ID = re.compile(rb"\$6\r\njob_id\r\n\$\d+\r\n([^\r]+)\r\n")


def split_times(pcap: Path, redis_port: int, sandbox_port: int, dispatcher_ports: set[int],
                call_ids: list[str]) -> dict[str, dict[str, float]]:
    """Per call: the epoch of each marker of the INVITE -> push path (see the module doc)."""
    redis = tcp_payloads(pcap, redis_port)
    to_sandbox = [(t, s, d, b) for t, s, d, b in tcp_payloads(pcap, sandbox_port)
                  if s in dispatcher_ports or d in dispatcher_ports]
    marks: dict[str, dict[str, float]] = {}
    for call_id in call_ids:
        cid = call_id.encode()
        m: dict[str, float] = {}
        job = b""
        for t, src, dst, data in redis:
            if "xadd" not in m:
                if dst == redis_port and b"XADD" in data and cid in data:
                    m["xadd"] = t
                    found = _JOB_ID.search(data)
                    job = found.group(1) if found else b""
                continue
            if "read_reply" not in m:
                if src == redis_port and cid in data:
                    m["read_reply"] = t
                continue
            if "devices_sent" not in m:
                if dst == redis_port and job and job in data and b"EVALSHA" in data:
                    m["devices_sent"] = t
                continue
            if src == redis_port:
                m["devices_reply"] = t
                break
        if "read_reply" in m:
            after = [(t, d) for t, s, d, _ in to_sandbox if t >= m["read_reply"]]
            push = next((t for t, d in after if d == sandbox_port), None)
            if push is not None:
                m["push_sent"] = push
                answer = next((t for t, d in after if d != sandbox_port and t >= push), None)
                if answer is not None:
                    m["push_answered"] = answer
        marks[call_id] = m
    return marks


def pcap_times(pcap: Path, sip_port: int, device_port: int) -> tuple[dict[str, float], dict[str, float],
                                                                        dict[str, float]]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "sip.Request-Line", "-T", "fields", "-E", "separator=\t",
         "-e", "frame.time_epoch", "-e", "udp.srcport", "-e", "udp.dstport", "-e", "sip.Method",
         "-e", "sip.Call-ID", "-e", "sip.CSeq.seq", "-d", f"udp.port=={device_port},sip"],
        capture_output=True, text=True, check=True,
    ).stdout
    invite_in: dict[str, float] = {}
    register_in: dict[str, float] = {}
    invite_out: dict[str, float] = {}
    for line in out.splitlines():
        ts, src, dst, method, call_id, cseq = (line.split("\t") + [""] * 6)[:6]
        t = float(ts)
        if method == "INVITE" and dst == str(sip_port) and call_id.startswith("bench-"):
            invite_in.setdefault(call_id, t)
        elif method == "INVITE" and src == str(sip_port) and dst == str(device_port):
            invite_out.setdefault(call_id, t)
        elif method == "REGISTER" and dst == str(sip_port) and cseq == "2":
            register_in.setdefault(call_id, t)
    return invite_in, register_in, invite_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wake_bench.json")
    ap.add_argument("--wake-delay", type=float, default=0.05,
                    help="seconds between the push arriving and the device's REGISTER (a real app "
                         "needs far longer to wake; this keeps the push's own work out of the wake sample)")
    ap.add_argument("--poll-after", type=float, default=0.03,
                    help="seconds after the INVITE before the bench first asks the sandbox for the push")
    ap.add_argument("--poll-interval", type=float, default=0.005,
                    help="seconds between the bench's requests to the sandbox while waiting for the push")
    args = ap.parse_args()

    # one device called back to back: the per-device call push limit (an abuse guard) is off here
    with push_stack(auth=True, wait_window=30, awake_window=0,
                    extra_defines={"MAX_CALL_PUSHES_PER_MINUTE": "0"}) as st, \
            tempfile.TemporaryDirectory(prefix="wake-bench-") as tmp:
        sip_port = st.kamailio.port
        user, tok = "bench", apns_token()
        password = st.add_user(user)
        device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        device.bind(("127.0.0.1", 0))
        device_port = device.getsockname()[1]
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind(("127.0.0.1", 0))
        caller_port = caller.getsockname()[1]
        contact = rfc8599_apns_contact(device_port, tok, instance=str(uuid.uuid4()))
        with SipClient(sip_port) as reg:
            assert reg.register(user, contact, password=password).status == 200

        redis_port = st.redis.port
        sandbox_port = st.sandbox.port  # type: ignore[attr-defined]
        control = st.sandbox.control  # type: ignore[attr-defined]
        pcap = Path(tmp) / "wake.pcap"
        capture = subprocess.Popen(
            ["tshark", "-i", "lo", "-q", "-s", "2048", "-w", str(pcap), "-f",
             f"udp port {sip_port} or tcp port {redis_port} or tcp port {sandbox_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            time.sleep(2.0)  # let dumpcap open the interface
            push_time: dict[str, float] = {}
            call_ids: list[str] = []
            control.clear()
            with SipClient(sip_port) as reg:
                for i in range(args.calls):
                    call_id = f"bench-{i}-{uuid.uuid4().hex[:8]}"
                    call_ids.append(call_id)
                    caller.sendto(invite(user, call_id, caller_port, sip_port).encode(), ("127.0.0.1", sip_port))
                    deadline = time.monotonic() + 10
                    time.sleep(args.poll_after)
                    while True:
                        pushes = control.pushes(tok)
                        if pushes:
                            push_time[call_id] = float(pushes[0]["time"])
                            control.clear()
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"no push for call {i}")
                        time.sleep(args.poll_interval)
                    time.sleep(args.wake_delay)
                    r = reg.register(user, contact, password=password, call_id=call_id.replace("bench", "reg"))
                    assert r.status == 200, r.status
                    req = recv_until(device, r"INVITE ")
                    device.sendto(answer_200(req, device_port).encode(), ("127.0.0.1", sip_port))
                    recv_until(caller, r"SIP/2.0 200")
            time.sleep(1.0)
            dispatcher_ports = kamailio_ports(sandbox_port)
        finally:
            stop_process(capture)
        invite_in, register_in, invite_out = pcap_times(pcap, sip_port, device_port)
        marks = split_times(pcap, redis_port, sandbox_port, dispatcher_ports, call_ids)

    wake, to_push = [], []
    for call_id, t_out in invite_out.items():
        t_reg = register_in.get(call_id.replace("bench", "reg"))
        if t_reg is not None:
            wake.append(t_out - t_reg)
        if call_id in invite_in and call_id in push_time:
            to_push.append(push_time[call_id] - invite_in[call_id])
    if len(wake) < args.calls * 0.9:
        raise SystemExit(f"only {len(wake)} of {args.calls} calls found in the capture")
    segments: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
    for call_id, m in marks.items():
        m = dict(m)
        if call_id in invite_in:
            m["invite_in"] = invite_in[call_id]
        if call_id in push_time:
            m["recorded"] = push_time[call_id]
        for name, start, end in SEGMENTS:
            if start in m and end in m:
                segments[name].append(m[end] - m[start])
    result = {
        "calls": args.calls,
        "wake_delay_s": args.wake_delay,
        "wake_latency_register_to_invite_out": summary(wake),
        "invite_to_push_received": summary(to_push),
        "invite_to_push_split": {name: summary(v) for name, v in segments.items() if v},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    w, p = result["wake_latency_register_to_invite_out"], result["invite_to_push_received"]
    print(f"wake latency (auth REGISTER in -> INVITE out): p50 {w['p50_ms']} ms  p99 {w['p99_ms']} ms  "
          f"(n={w['count']})")
    print(f"INVITE in -> push received by sandbox:      p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  "
          f"(n={p['count']})")
    print("INVITE -> push received, split (pcap + sandbox clock):")
    for name, start, end in SEGMENTS:
        seg = result["invite_to_push_split"].get(name)
        if seg is not None:
            print(f"  {name:<22} {start:>13} -> {end:<14} p50 {seg['p50_ms']:7.3f} ms  "
                  f"p99 {seg['p99_ms']:7.3f} ms  (n={seg['count']})")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
