"""Wake latency from a loopback packet capture: the benchmarks' one clock for "the device is back ->
its parked call reaches it".

Kamailio's own logs cannot time a wake (log level 1 hides them, and a log line is written after the
work it reports); SIPp's timings are the load generator's, on the far side of its own scheduling.
The kernel's packet timestamps on lo see both messages on one clock, as they cross Kamailio's port:
capture the SIP port while a step runs (dumpcap), read the SIP fields back (tshark), pair each
device's re-REGISTER in with its parked call's INVITE out.

Used by bench/capacity.py (one node, ours and native) and bench/cluster_bench.py (one or two nodes).
Needs dumpcap and tshark (Debian's tshark package, which scripts/install-deps.sh installs).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.localrun import stop_process
from harness.sipua import DOMAIN


@contextmanager
def capture(path: Path, port: int, only: str | None = None) -> Iterator[Path]:
    """dumpcap on lo of everything to or from `port` (both transports), while the block runs.
    `only` (a capture filter, BPF) narrows it further: a long step at a high rate keeps just the
    packets it will read, and the pcap stays small. The caller deletes the file."""
    err = path.with_suffix(".err")
    bpf = f"port {port}" + (f" and ({only})" if only else "")
    with open(err, "wb") as errf:
        proc = subprocess.Popen(["dumpcap", "-i", "lo", "-q", "-f", bpf, "-w", str(path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                                start_new_session=True)
    try:
        end = time.monotonic() + 10
        while b"Capturing on" not in err.read_bytes():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("dumpcap did not start: " + err.read_text(errors="replace")[-1000:])
            time.sleep(0.05)
        time.sleep(0.2)
        yield path
    finally:
        time.sleep(0.3)
        stop_process(proc)
        err.unlink(missing_ok=True)


@dataclass
class SipRow:
    t: float
    src: str
    dst: str
    dport: int
    method: str  # request method, "" for a response
    status: str  # response code, "" for a request
    cseq_method: str
    user: str  # the To user
    call_id: str


def sip_rows(pcap: Path, sip_port: int) -> list[SipRow]:
    """Every SIP message of `pcap` (port `sip_port` decoded as SIP on both transports), in capture order."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "sip", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f",
         "-e", "frame.time_epoch", "-e", "ip.src", "-e", "ip.dst", "-e", "udp.dstport", "-e", "tcp.dstport",
         "-e", "sip.Method", "-e", "sip.Status-Code", "-e", "sip.CSeq.method", "-e", "sip.to.user", "-e", "sip.Call-ID",
         "-d", f"udp.port=={sip_port},sip", "-d", f"tcp.port=={sip_port},sip"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        ts, src, dst, udst, tdst, method, status, cseq, user, call_id = (line.split("\t") + [""] * 10)[:10]
        rows.append(SipRow(float(ts), src, dst, int(udst or tdst or 0), method, status, cseq, user, call_id))
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def wake_latencies(rows: Sequence[SipRow], device_port: int, hosts: set[str]) -> list[float]:
    """Per wake: the device's REGISTER reaching a node -> that call's INVITE leaving for the
    device (the first of each: retransmissions ignored), paired per device user in time order.
    A REGISTER with a new Call-ID replaces one still unanswered by an INVITE (that wake found no
    parked call, e.g. under overload: pairing it with the device's next call would count the gap
    between calls as a wake). Devices send from and listen on DOMAIN (loopback), the INVITE goes to
    `device_port`; `hosts` are the addresses the Kamailio node(s) listen on."""
    per_user: dict[str, list[tuple[float, str, str]]] = {}
    for r in rows:
        if r.method == "REGISTER" and r.src == DOMAIN and r.dst in hosts:
            per_user.setdefault(r.user, []).append((r.t, "R", r.call_id))
        elif r.method == "INVITE" and r.dst == DOMAIN and r.dport == device_port:
            per_user.setdefault(r.user, []).append((r.t, "I", r.call_id))
    out: list[float] = []
    for events in per_user.values():
        pending: tuple[float, str] | None = None  # (first seen, Call-ID) of the REGISTER waiting for its INVITE
        for t, kind, call_id in sorted(events):
            if kind == "R":
                if pending is None or pending[1] != call_id:
                    pending = (t, call_id)
            elif pending is not None:
                out.append(t - pending[0])
                pending = None
    return out


def latency_summary(values: Sequence[float]) -> dict[str, float] | None:
    """count, p50_ms, p99_ms, max_ms of `values` (seconds); None when there is none (nothing to
    report is not a zero)."""
    if not values:
        return None
    return {"count": len(values), "p50_ms": round(statistics.median(values) * 1000, 3),
            "p99_ms": round(percentile(values, 0.99) * 1000, 3), "max_ms": round(max(values) * 1000, 3)}
