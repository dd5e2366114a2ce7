"""Wake-latency benchmark: park, push, wake, resume over real Kamailio, measured from a pcap.

Starts redis-server + the sandbox providers + Kamailio (KEMI mode, auth on, awake window 0 so
every call pushes) on loopback, captures the SIP port with tshark, and runs N sequential calls:

    caller INVITE -> (proxy parks, pushes) -> sandbox records the VoIP push ->
    device re-REGISTERs (401, then authenticated) -> proxy sends the INVITE to the device -> 200

Reported (median / p99, milliseconds):
- wake latency: authenticated REGISTER in -> INVITE out to the device (pcap timestamps);
- INVITE -> push received: caller INVITE in (pcap) -> push recorded by the sandbox (same clock).

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

from tests.sip_support import (  # noqa: E402
    DOMAIN,
    SipClient,
    apns_token,
    push_stack,
    rfc8599_apns_contact,
)
from tests.support import stop_process  # noqa: E402


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
    args = ap.parse_args()

    with push_stack(auth=True, wait_window=30, awake_window=0) as st, \
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

        pcap = Path(tmp) / "wake.pcap"
        capture = subprocess.Popen(
            ["tshark", "-i", "lo", "-q", "-w", str(pcap), "-f", f"udp port {sip_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            time.sleep(2.0)  # let dumpcap open the interface
            push_time: dict[str, float] = {}
            seen = 0
            with SipClient(sip_port) as reg:
                for i in range(args.calls):
                    call_id = f"bench-{i}-{uuid.uuid4().hex[:8]}"
                    caller.sendto(invite(user, call_id, caller_port, sip_port).encode(), ("127.0.0.1", sip_port))
                    deadline = time.monotonic() + 10
                    while True:
                        pushes = st.sandbox.control.pushes(tok)  # type: ignore[attr-defined]
                        if len(pushes) > seen:
                            push_time[call_id] = float(pushes[seen]["time"])
                            seen = len(pushes)
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"no push for call {i}")
                        time.sleep(0.001)
                    time.sleep(args.wake_delay)
                    r = reg.register(user, contact, password=password, call_id=call_id.replace("bench", "reg"))
                    assert r.status == 200, r.status
                    req = recv_until(device, r"INVITE ")
                    device.sendto(answer_200(req, device_port).encode(), ("127.0.0.1", sip_port))
                    recv_until(caller, r"SIP/2.0 200")
            time.sleep(1.0)
        finally:
            stop_process(capture)
        invite_in, register_in, invite_out = pcap_times(pcap, sip_port, device_port)

    wake, to_push = [], []
    for call_id, t_out in invite_out.items():
        t_reg = register_in.get(call_id.replace("bench", "reg"))
        if t_reg is not None:
            wake.append(t_out - t_reg)
        if call_id in invite_in and call_id in push_time:
            to_push.append(push_time[call_id] - invite_in[call_id])
    if len(wake) < args.calls * 0.9:
        raise SystemExit(f"only {len(wake)} of {args.calls} calls found in the capture")
    result = {
        "calls": args.calls,
        "wake_delay_s": args.wake_delay,
        "wake_latency_register_to_invite_out": summary(wake),
        "invite_to_push_received": summary(to_push),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    w, p = result["wake_latency_register_to_invite_out"], result["invite_to_push_received"]
    print(f"wake latency (auth REGISTER in -> INVITE out): p50 {w['p50_ms']} ms  p99 {w['p99_ms']} ms  "
          f"(n={w['count']})")
    print(f"INVITE in -> push received by sandbox:      p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  "
          f"(n={p['count']})")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
