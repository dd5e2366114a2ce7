"""Scale-out benchmark: one node against two clustered nodes (WITH_CLUSTER) on one Redis, same SIPp load.

Each configuration gets its own redis-server, sandbox and Kamailio node(s): our proxy exactly as
bench/capacity.py's "ours" measures it (KEMI, WITH_PUSHER, WITH_EXTERNAL_DISPATCHER so the pushes pile
up in the Redis stream, AWAKE_WINDOW=0, WITHOUT_AUTH, the abuse limits off, log level 1, 8 workers),
node i listening on 127.0.0.<i+2> (one SIP port for all; LOCAL_DOMAINS="127.0.0.1", the served
domain, which callers and devices use and send from):

- one:       one plain node (no WITH_CLUSTER);
- two-cross: two clustered nodes; half the calls are parked on node A and their devices wake on
             node B, the other half the other way round: every wake crosses nodes (the worst case:
             the REGISTER is replicated over DMQ, the parked call resumes through the other node);
- two-same:  two clustered nodes; callers and devices split evenly, each device wakes on the node
             that parked its call (the replication still happens: every REGISTER goes to both).

The load is capacity.py's: pre-registered sleeping RFC 8599 APNs devices; per step at R calls/s,
SIPp callers call distinct devices, SIPp "wakers" send each device's re-REGISTER --wake-delay (0.5 s)
after its call, one SIPp UAS answers for every device, the caller hangs up after --hold-ms. Every
configuration runs two lanes of R/2 calls/s (a caller and a waker each, sent to a node with SIPp's
-rsa), so the load generator costs the same in all three. A configuration stops stepping at its
first step with a failed call.

Per step: Kamailio CPU per call (utime+stime from /proc, summed over the nodes, and per node),
Redis commands per call (INFO commandstats delta, commands run inside scripts included, INFO
excluded), Redis CPU per call, Redis network bytes per call (INFO stats total_net_input_bytes /
total_net_output_bytes), and per node the bytes its connections sent to and got from Redis and the
TCP data segments it sent (about one per round trip; from `ss -ti` on its sockets). At --latency-rate
the SIP port is captured (dumpcap, bench/sipcapture.py) for the wake latency (REGISTER from the
device in -> INVITE out to the device, pcap timestamps, p50/p99) and the SIP messages between nodes
per call. After the call steps, a REGISTER-only step (the pool re-registering at --reg-rate) gives
Kamailio CPU, Redis commands and bytes and inter-node SIP messages per REGISTER: the DMQ
replication's cost.

Everything (SIPp included) shares this machine's cores: calls/s are CPU-bound here. The per-call
Redis figures do not depend on the machine and decide how far one Redis carries.

Usage:
    .venv/bin/python bench/cluster_bench.py --quick     # one 4 s step at 100 calls/s per configuration (< 60 s)
    .venv/bin/python bench/cluster_bench.py             # 50..400 calls/s, 10 s steps (~5 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.capacity import (  # noqa: E402
    CHILDREN,
    GENERATOR_SHORTFALL,
    BenchKamailio,
    Device,
    Sipp,
    SippResult,
    cpu_seconds,
    device_uas,
    log_findings,
    ours_defines,
    redis_command_mix,
    redis_sample,
    register,
    sipp_client_args,
    write_injection,
)
from bench.sipcapture import SipRow, capture, latency_summary, sip_rows, wake_latencies  # noqa: E402
from harness.clusterstack import cluster_defines, node_host, wait_cluster  # noqa: E402
from harness.localrun import free_port, redis_server  # noqa: E402
from harness.localstack import BUNDLE, KAMAILIO_CFG, TEAM, KamailioProc  # noqa: E402
from harness.sipua import DOMAIN, apns_token  # noqa: E402

RATES = (50, 100, 200, 300, 400)
QUICK_RATES = (100,)
LATENCY_RATE = 100
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: int
    lanes: tuple[tuple[int, int], ...]  # per lane: (node the calls go to, node the devices wake on)
    about: str


TOPOLOGIES = {
    "one": Topology("one", 1, ((0, 0), (0, 0)), "one plain node"),
    "two-cross": Topology("two-cross", 2, ((0, 1), (1, 0)),
                          "two clustered nodes, every device wakes on the node that did not park its call"),
    "two-same": Topology("two-same", 2, ((0, 0), (1, 1)),
                         "two clustered nodes, each device wakes on the node that parked its call"),
}


# --------------------------------------------------------------------------- measurements


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall clock): /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK, time.monotonic()


def net_bytes(client: redis.Redis) -> tuple[int, int]:
    """Redis's total_net_input_bytes, total_net_output_bytes."""
    stats: dict[str, Any] = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


@dataclass
class SocketCounters:
    node: int
    sent: int  # bytes the node sent to Redis
    received: int  # bytes it got from Redis
    writes: int  # TCP data segments it sent (about one per request or pipeline)


def redis_sockets(redis_port: int, node_pids: Sequence[set[int]]) -> dict[str, SocketCounters]:
    """The Kamailio nodes' established connections to Redis, by local address, with their kernel
    counters (`ss -tinp`); a socket is a node's when one of its holders is that node's process."""
    out = subprocess.run(["ss", "-tinpH", "state", "established", "dport", f"= :{redis_port}"],
                         capture_output=True, text=True, timeout=10, check=False).stdout
    entries: list[str] = []
    for line in out.splitlines():
        if line[:1].isspace() and entries:
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(line.strip())
    found: dict[str, SocketCounters] = {}
    for entry in entries:
        words = entry.split()
        if len(words) < 3:
            continue
        local = words[2]
        pids = {int(p) for p in re.findall(r"pid=(\d+)", entry)}
        node = next((i for i, members in enumerate(node_pids) if pids & members), None)
        if node is None:
            continue
        counters = dict(w.split(":", 1) for w in words if ":" in w and w.split(":", 1)[1].isdigit())
        found[local] = SocketCounters(node, int(counters.get("bytes_sent", 0)), int(counters.get("bytes_received", 0)),
                                      int(counters.get("data_segs_out", 0)))
    return found


def per_node_redis(before: dict[str, SocketCounters], after: dict[str, SocketCounters], nodes: int,
                   per: int) -> list[dict[str, float]]:
    """Per node, per call (or REGISTER): bytes to / from Redis and writes, over the step."""
    sums = [[0, 0, 0] for _ in range(nodes)]
    for local, now in after.items():
        was = before.get(local, SocketCounters(now.node, 0, 0, 0))
        row = sums[now.node]
        row[0] += now.sent - was.sent
        row[1] += now.received - was.received
        row[2] += now.writes - was.writes
    return [{"bytes_to_redis": round(s[0] / per, 1), "bytes_from_redis": round(s[1] / per, 1),
             "writes": round(s[2] / per, 2)} for s in sums]


def internode(rows: Sequence[SipRow], hosts: set[str]) -> dict[str, int]:
    """SIP messages sent from one node to another, by kind ("KDMQ", "200 KDMQ", "INVITE", ...)."""
    kinds: dict[str, int] = {}
    for r in rows:
        if r.src in hosts and r.dst in hosts and r.src != r.dst:
            key = r.method or f"{r.status} {r.cseq_method}"
            kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- results


@dataclass
class CallStep:
    rate: int
    calls: int
    successful: int
    failed: int
    reregister_failed: int
    offered_rate: float
    elapsed_s: float
    kamailio_cpu_ms_per_call: float  # summed over the nodes
    kamailio_cpu_ms_per_call_by_node: list[float]
    kamailio_cores_by_node: list[float]
    machine_busy_cores: float  # every process on the machine (SIPp, Redis, other work) during the step
    redis_commands_per_call: float
    redis_cpu_ms_per_call: float
    redis_in_bytes_per_call: float
    redis_out_bytes_per_call: float
    redis_by_node_per_call: list[dict[str, float]]
    redis_commands: dict[str, int]
    captured: bool
    wake_latency: dict[str, float] | None
    internode_sip_per_call: float | None
    internode_kinds: dict[str, int]
    failure_kinds: dict[str, int]
    unexpected: dict[str, int]
    alive: bool

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.reregister_failed == 0

    @property
    def generator_limited(self) -> bool:
        return self.offered_rate < GENERATOR_SHORTFALL * self.rate


@dataclass
class RegStep:
    rate: int
    registers: int
    failed: int
    offered_rate: float
    kamailio_cpu_ms_per_register: float  # summed over the nodes
    kamailio_cpu_ms_per_register_by_node: list[float]
    redis_commands_per_register: float
    redis_in_bytes_per_register: float
    redis_out_bytes_per_register: float
    internode_sip_per_register: float | None
    internode_kinds: dict[str, int]


@dataclass
class ConfigResult:
    name: str
    nodes: int
    about: str
    steps: list[CallStep] = field(default_factory=list)
    reg_step: RegStep | None = None
    max_calls_per_s: int = 0
    generator_limited: bool = False
    error_lines: int = 0
    error_examples: list[str] = field(default_factory=list)
    replicate_failed: int = 0  # "pusher: replicate-failed" lines: REGISTERs the other nodes never got
    log_findings: list[str] = field(default_factory=list)
    crashed: bool = False
    error: str = ""
    load_before: list[float] = field(default_factory=list)  # os.getloadavg()
    load_after: list[float] = field(default_factory=list)

    def at_max(self) -> CallStep | None:
        ok = [s for s in self.steps if s.ok]
        return ok[-1] if ok else None

    def latency_step(self) -> CallStep | None:
        return next((s for s in self.steps if s.captured), None)


# --------------------------------------------------------------------------- one configuration


@dataclass
class Lane:
    index: int
    call_node: int
    wake_node: int
    pool: list[Device] = field(default_factory=list)
    next_device: int = 0

    def take(self, count: int) -> list[Device]:
        out = [self.pool[(self.next_device + i) % len(self.pool)] for i in range(count)]
        self.next_device = (self.next_device + count) % len(self.pool)
        return out


class ClusterRunner:
    """Runs the steps of one configuration on its started node(s)."""

    def __init__(self, topo: Topology, nodes: list[BenchKamailio], sip_port: int, rds: redis.Redis,
                 redis_port: int, device_port: int, workdir: Path, args: argparse.Namespace,
                 result: ConfigResult) -> None:
        self.topo = topo
        self.nodes = nodes
        self.sip_port = sip_port
        self.rds = rds
        self.redis_port = redis_port
        self.device_port = device_port
        self.workdir = workdir
        self.args = args
        self.result = result
        self.lanes = [Lane(i, c, w) for i, (c, w) in enumerate(topo.lanes)]
        self.hosts = {n.host for n in nodes}

    def rsa(self, node: int) -> list[str]:
        return ["-rsa", f"{self.nodes[node].host}:{self.sip_port}"]

    def grow_pools(self, size: int) -> None:
        """Each lane's pool to `size` devices, registered on the lane's wake node (not measured)."""
        for lane in self.lanes:
            if size <= len(lane.pool):
                continue
            new = [Device(f"l{lane.index}d{len(lane.pool) + i}", apns_token(), str(uuid.uuid4()))
                   for i in range(size - len(lane.pool))]
            res = register(self.workdir, f"prereg-{lane.index}-{len(lane.pool)}", self.sip_port, self.device_port,
                           new, self.args.prereg_rate, self.rsa(lane.wake_node))
            if res.failed:
                raise RuntimeError(f"{res.failed} of {res.total} pre-registrations failed "
                                   f"{res.failure_kinds} {res.unexpected}")
            lane.pool.extend(new)
        time.sleep(0.5)  # (the last replicas reach the other node)

    def node_pids(self) -> list[set[int]]:
        return [set(n.pids()) for n in self.nodes]

    def call_step(self, rate: int, captured: bool) -> CallStep:
        a = self.args
        per_lane = max(1, rate // len(self.lanes))
        rate = per_lane * len(self.lanes)
        lane_calls = per_lane * a.step_seconds
        calls = lane_calls * len(self.lanes)
        self.grow_pools(max(per_lane * a.pool_seconds, 1))
        callers_argv, wakers_argv = [], []
        for lane in self.lanes:
            devices = lane.take(lane_calls)
            tag = f"calls-{rate}-{lane.index}"
            calls_inf = self.workdir / f"{tag}-calls.csv"
            write_injection(calls_inf, [(d.user,) for d in devices])
            wake_inf = self.workdir / f"{tag}-wake.csv"
            write_injection(wake_inf, [(d.user, d.token, d.instance) for d in devices])
            callers_argv.append(
                [*sipp_client_args("capacity-caller.xml", self.sip_port, calls_inf, per_lane, lane_calls),
                 "-d", str(a.hold_ms), "-recv_timeout", str(int((a.window + 10) * 1000)), *self.rsa(lane.call_node)])
            wakers_argv.append(
                [*sipp_client_args("capacity-register.xml", self.sip_port, wake_inf, per_lane, lane_calls),
                 "-key", "device_port", str(self.device_port), "-key", "pn_param", f"{TEAM}.{BUNDLE}.voip",
                 "-recv_timeout", "10000", *self.rsa(lane.wake_node)])
        pids = self.node_pids()
        with ExitStack() as es:
            pcap = es.enter_context(capture(self.workdir / f"calls-{rate}.pcap", self.sip_port)) if captured else None
            cmd0: dict[str, Any] = self.rds.info("commandstats")
            sock0 = redis_sockets(self.redis_port, pids)
            r0, n0 = redis_sample(self.rds), net_bytes(self.rds)
            c0 = [cpu_seconds(list(p)) for p in pids]
            m0, t0 = machine_busy()
            callers = [Sipp(self.workdir, f"calls-{rate}-{i}-caller", argv, lane_calls)
                       for i, argv in enumerate(callers_argv)]
            for c in callers:
                es.callback(c.stop)
            time.sleep(a.wake_delay)
            wakers = [Sipp(self.workdir, f"calls-{rate}-{i}-wake", argv, lane_calls)
                      for i, argv in enumerate(wakers_argv)]
            for w in wakers:
                es.callback(w.stop)
            budget = a.step_seconds + a.window + 40
            results = [c.wait(budget - (time.monotonic() - t0)) for c in callers]
            wresults = [w.wait(budget + 10 - (time.monotonic() - t0)) for w in wakers]
            c1 = [cpu_seconds(list(p)) for p in pids]
            m1, t1 = machine_busy()
            r1, n1 = redis_sample(self.rds), net_bytes(self.rds)
            sock1 = redis_sockets(self.redis_port, pids)
            cmd1: dict[str, Any] = self.rds.info("commandstats")
        wake: dict[str, float] | None = None
        inter: dict[str, int] = {}
        if pcap is not None:
            rows = sip_rows(pcap, self.sip_port)
            wake = latency_summary(wake_latencies(rows, self.device_port, self.hosts))
            inter = internode(rows, self.hosts)
            pcap.unlink(missing_ok=True)
        cpu = [c1[i] - c0[i] for i in range(len(pids))]
        wall = t1 - t0
        return CallStep(
            rate=rate, calls=calls, successful=sum(r.successful for r in results),
            failed=sum(r.failed for r in results), reregister_failed=sum(r.failed for r in wresults),
            offered_rate=round(sum(r.offered_rate for r in results), 1), elapsed_s=round(wall, 1),
            kamailio_cpu_ms_per_call=round(sum(cpu) * 1000 / calls, 3),
            kamailio_cpu_ms_per_call_by_node=[round(c * 1000 / calls, 3) for c in cpu],
            kamailio_cores_by_node=[round(c / wall, 2) for c in cpu],
            machine_busy_cores=round((m1 - m0) / wall, 2),
            redis_commands_per_call=round((r1.commands - r0.commands) / calls, 2),
            redis_cpu_ms_per_call=round((r1.cpu_s - r0.cpu_s) * 1000 / calls, 4),
            redis_in_bytes_per_call=round((n1[0] - n0[0]) / calls, 1),
            redis_out_bytes_per_call=round((n1[1] - n0[1]) / calls, 1),
            redis_by_node_per_call=per_node_redis(sock0, sock1, len(self.nodes), calls),
            redis_commands=redis_command_mix(cmd0, cmd1),
            captured=pcap is not None, wake_latency=wake,
            internode_sip_per_call=round(sum(inter.values()) / calls, 2) if pcap is not None else None,
            internode_kinds=inter,
            failure_kinds=_merged([r.failure_kinds for r in results], [r.failure_kinds for r in wresults]),
            unexpected=_merged([r.unexpected for r in results], [r.unexpected for r in wresults]),
            alive=all(n.alive() for n in self.nodes),
        )

    def reg_step(self, rate: int) -> RegStep:
        """The pools re-REGISTER (push params, same tokens) at `rate`/s split over the lanes' wake
        nodes, captured: the cost of a REGISTER, its replication included."""
        a = self.args
        per_lane = max(1, rate // len(self.lanes))
        count = per_lane * a.reg_seconds
        total = count * len(self.lanes)
        pids = self.node_pids()
        with capture(self.workdir / "reg.pcap", self.sip_port) as pcap:
            r0, n0 = redis_sample(self.rds), net_bytes(self.rds)
            c0 = [cpu_seconds(list(p)) for p in pids]
            runs: list[SippResult] = []
            with ExitStack() as es:
                sipps = []
                for lane in self.lanes:
                    inf = self.workdir / f"reg-{lane.index}.csv"
                    write_injection(inf, [(d.user, d.token, d.instance) for d in lane.take(count)])
                    argv = [*sipp_client_args("capacity-register.xml", self.sip_port, inf, per_lane, count),
                            "-key", "device_port", str(self.device_port), "-key", "pn_param",
                            f"{TEAM}.{BUNDLE}.voip", "-recv_timeout", "10000", *self.rsa(lane.wake_node)]
                    run = Sipp(self.workdir, f"reg-{lane.index}", argv, count)
                    es.callback(run.stop)
                    sipps.append(run)
                runs = [s.wait(a.reg_seconds + 40) for s in sipps]
            time.sleep(0.3)  # (the last replicas are answered)
            c1 = [cpu_seconds(list(p)) for p in pids]
            r1, n1 = redis_sample(self.rds), net_bytes(self.rds)
        inter = internode(sip_rows(pcap, self.sip_port), self.hosts)
        pcap.unlink(missing_ok=True)
        cpu = [c1[i] - c0[i] for i in range(len(pids))]
        return RegStep(
            rate=per_lane * len(self.lanes), registers=total, failed=sum(r.failed for r in runs),
            offered_rate=round(sum(r.offered_rate for r in runs), 1),
            kamailio_cpu_ms_per_register=round(sum(cpu) * 1000 / total, 3),
            kamailio_cpu_ms_per_register_by_node=[round(c * 1000 / total, 3) for c in cpu],
            redis_commands_per_register=round((r1.commands - r0.commands) / total, 2),
            redis_in_bytes_per_register=round((n1[0] - n0[0]) / total, 1),
            redis_out_bytes_per_register=round((n1[1] - n0[1]) / total, 1),
            internode_sip_per_register=round(sum(inter.values()) / total, 2), internode_kinds=inter,
        )

    def run(self, rates: Sequence[int]) -> None:
        res = self.result
        latency_rate = next((r for r in rates if r >= self.args.latency_rate), rates[-1])
        for rate in rates:
            step = self.call_step(rate, captured=rate == latency_rate)
            res.steps.append(step)
            wake = step.wake_latency
            print(f"  {res.name:<9} {step.rate:>4} calls/s: {step.successful}/{step.calls} ok, "
                  f"{step.reregister_failed} re-REGISTERs failed (offered {step.offered_rate}/s); "
                  f"kamailio {step.kamailio_cpu_ms_per_call} ms/call {step.kamailio_cpu_ms_per_call_by_node}, "
                  f"redis {step.redis_commands_per_call} cmd/call, {step.redis_in_bytes_per_call:.0f}+"
                  f"{step.redis_out_bytes_per_call:.0f} B/call; machine {step.machine_busy_cores} cores busy"
                  + (f"; wake p50 {wake['p50_ms']} p99 {wake['p99_ms']} ms (n={wake['count']:.0f}), "
                     f"{step.internode_sip_per_call} inter-node msgs/call" if wake else "")
                  + (f"; failures {step.failure_kinds} {step.unexpected}" if not step.ok else ""), flush=True)
            self.scan_logs()
            if not step.alive:
                res.crashed = True
                return
            if not step.ok:
                break
            res.max_calls_per_s = step.rate if not step.generator_limited else int(step.offered_rate)
            if step.generator_limited:
                res.generator_limited = True
                print(f"  {res.name}: SIPp offered only {step.offered_rate}/s: stepping stops", flush=True)
                break
            time.sleep(1.0)
        time.sleep(1.0)
        reg = self.reg_step(self.args.reg_rate)
        res.reg_step = reg
        print(f"  {res.name:<9} {reg.rate:>4} REGISTER/s: {reg.registers - reg.failed}/{reg.registers} ok; "
              f"kamailio {reg.kamailio_cpu_ms_per_register} ms/REGISTER {reg.kamailio_cpu_ms_per_register_by_node}, "
              f"redis {reg.redis_commands_per_register} cmd/REGISTER, {reg.internode_sip_per_register} inter-node "
              f"msgs/REGISTER {reg.internode_kinds}", flush=True)
        self.scan_logs()

    def scan_logs(self) -> None:
        errors: list[str] = []
        bad: list[str] = []
        for i, node in enumerate(self.nodes):
            e, b = log_findings(node.log())
            errors += [f"[node {i}] {ln[:300]}" for ln in e]
            bad += [f"[node {i}] {ln[:400]}" for ln in b]
        self.result.error_lines = len(errors)
        self.result.replicate_failed = sum("pusher: replicate-failed" in ln for ln in errors)
        self.result.error_examples = errors[:5]
        self.result.log_findings = bad[:20]


def _merged(callers: Sequence[dict[str, int]], wakers: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for prefix, group in (("", callers), ("re-REGISTER ", wakers)):
        for d in group:
            for k, v in d.items():
                out[prefix + k] = out.get(prefix + k, 0) + v
    return out


def start_nodes(topo: Topology, base: dict[str, str | None], rundir: Path) -> tuple[list[BenchKamailio], int]:
    """The configuration's node(s) on one free SIP port (not yet started)."""
    port = free_port()
    nodes = []
    for i in range(topo.nodes):
        # a plain node serves the domain's own address, as capacity.py's does; cluster nodes each
        # have their own address (a node knows the others by it), the domain stays 127.0.0.1
        host = node_host(i) if topo.nodes > 1 else DOMAIN
        defines = {**base, "LOCAL_DOMAINS": f'"{DOMAIN}"'}
        if topo.nodes > 1:
            defines.update({"LISTEN_IP": host, **cluster_defines(i, topo.nodes, port)})
        node_dir = rundir / f"node{i}"
        node_dir.mkdir()
        nodes.append(BenchKamailio(port, KAMAILIO_CFG, defines, node_dir, {}, host=host))
    return nodes, port


def run_config(topo: Topology, args: argparse.Namespace, rates: Sequence[int], tmp: Path) -> ConfigResult:
    result = ConfigResult(topo.name, topo.nodes, topo.about, load_before=[round(x, 2) for x in os.getloadavg()])
    workdir = tmp / topo.name
    workdir.mkdir()
    rundir = Path(tempfile.mkdtemp(prefix=f"cluster-{topo.name}-", dir=tmp))
    nodes: list[BenchKamailio] = []
    runner: ClusterRunner | None = None
    with ExitStack() as es:
        srv = es.enter_context(redis_server())
        rds = redis.Redis(host="127.0.0.1", port=srv.port, decode_responses=True)
        es.callback(rds.close)
        try:
            base = ours_defines(es, srv, args.window, {"CHILDREN": str(args.children)})
            nodes, port = start_nodes(topo, base, rundir)
            for node in nodes:
                es.callback(node.stop)
                node.start()
            if topo.nodes > 1:
                procs: list[KamailioProc] = list(nodes)
                wait_cluster(procs, topo.nodes)
            device_port = es.enter_context(device_uas(workdir))
            runner = ClusterRunner(topo, nodes, port, rds, srv.port, device_port, workdir, args, result)
            runner.run(rates)
        except Exception as exc:  # a failed configuration still reports what it measured
            result.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            print(f"  {topo.name}: ERROR {result.error}", flush=True)
        finally:
            if any(n.proc is not None and not n.alive() for n in nodes):
                result.crashed = True
            if runner is not None:
                runner.scan_logs()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for i, node in enumerate(nodes):
                    (args.logs / f"{topo.name}-node{i}.log").write_text(node.log())
    shutil.rmtree(rundir, ignore_errors=True)
    result.load_after = [round(x, 2) for x in os.getloadavg()]
    return result


# --------------------------------------------------------------------------- report


def summarize(results: dict[str, ConfigResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in results.items():
        best, lat, reg = r.at_max(), r.latency_step(), r.reg_step
        out[name] = {
            "nodes": r.nodes,
            "max_calls_per_s_0_failed": r.max_calls_per_s,
            "calls_limited_by_load_generator": r.generator_limited,
            "at_max": None if best is None else {
                "rate": best.rate,
                "kamailio_cpu_ms_per_call": best.kamailio_cpu_ms_per_call,
                "kamailio_cpu_ms_per_call_by_node": best.kamailio_cpu_ms_per_call_by_node,
                "redis_commands_per_call": best.redis_commands_per_call,
                "redis_cpu_ms_per_call": best.redis_cpu_ms_per_call,
                "redis_in_bytes_per_call": best.redis_in_bytes_per_call,
                "redis_out_bytes_per_call": best.redis_out_bytes_per_call,
                "redis_by_node_per_call": best.redis_by_node_per_call,
            },
            "at_latency_rate": None if lat is None else {
                "rate": lat.rate,
                "ok": lat.ok,
                "wake_latency": lat.wake_latency,
                "internode_sip_per_call": lat.internode_sip_per_call,
                "kamailio_cpu_ms_per_call": lat.kamailio_cpu_ms_per_call,
                "redis_commands_per_call": lat.redis_commands_per_call,
                "redis_in_bytes_per_call": lat.redis_in_bytes_per_call,
                "redis_out_bytes_per_call": lat.redis_out_bytes_per_call,
            },
            "register": None if reg is None else {
                "rate": reg.rate,
                "failed": reg.failed,
                "kamailio_cpu_ms_per_register": reg.kamailio_cpu_ms_per_register,
                "redis_commands_per_register": reg.redis_commands_per_register,
                "redis_in_bytes_per_register": reg.redis_in_bytes_per_register,
                "redis_out_bytes_per_register": reg.redis_out_bytes_per_register,
                "internode_sip_per_register": reg.internode_sip_per_register,
            },
            "crashed": r.crashed,
            "error": r.error,
            "error_lines": r.error_lines,
            "replicate_failed": r.replicate_failed,
            "log_findings": len(r.log_findings),
            "load_before": r.load_before,
            "load_after": r.load_after,
        }
    one = results.get("one")
    one_reg = one.reg_step if one is not None else None
    for name, r in results.items():
        if name == "one" or one is None:
            continue
        cmp: dict[str, Any] = {"max_calls_per_s": (round(r.max_calls_per_s / one.max_calls_per_s, 2)
                                                   if one.max_calls_per_s else None)}
        lat_one, lat = one.latency_step(), r.latency_step()
        if lat_one is not None and lat is not None and lat_one.kamailio_cpu_ms_per_call:
            cmp["kamailio_cpu_per_call_at_latency_rate"] = round(
                lat.kamailio_cpu_ms_per_call / lat_one.kamailio_cpu_ms_per_call, 2)
        if one_reg is not None and r.reg_step is not None:
            cmp["extra_kamailio_cpu_ms_per_register"] = round(
                r.reg_step.kamailio_cpu_ms_per_register - one_reg.kamailio_cpu_ms_per_register, 3)
        out[f"{name}_over_one"] = cmp
    return out


def _cell(value: object, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def print_report(results: dict[str, ConfigResult], summary: dict[str, Any], latency_rate: int) -> None:
    print()
    print(f"| config | nodes | max calls/s (0 failed) | Kamailio CPU ms/call (per node) | wake p50 / p99 ms "
          f"@{latency_rate}/s | inter-node SIP msgs/call | Redis cmds/call | Redis bytes/call in + out "
          f"| Kamailio ms/REGISTER | inter-node msgs/REGISTER | Redis cmds/REGISTER |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        best, lat, reg = r.at_max(), r.latency_step(), r.reg_step
        ref = best or lat
        cpu = "-" if best is None else (f"{best.kamailio_cpu_ms_per_call:.2f}" + (
            " (" + " + ".join(f"{c:.2f}" for c in best.kamailio_cpu_ms_per_call_by_node) + ")"
            if r.nodes > 1 else ""))
        wake = (f"{lat.wake_latency['p50_ms']:.2f} / {lat.wake_latency['p99_ms']:.2f}"
                if lat is not None and lat.wake_latency else "-")
        calls = f"{'≥ ' if r.generator_limited else ''}{r.max_calls_per_s}"
        print(f"| {name} | {r.nodes} | {calls} | {cpu} | {wake} | "
              f"{_cell(lat.internode_sip_per_call if lat else None)} | "
              f"{_cell(ref.redis_commands_per_call if ref else None, '.1f')} | "
              + (f"{ref.redis_in_bytes_per_call:.0f} + {ref.redis_out_bytes_per_call:.0f}" if ref else "-")
              + f" | {_cell(reg.kamailio_cpu_ms_per_register if reg else None, '.3f')} | "
              f"{_cell(reg.internode_sip_per_register if reg else None)} | "
              f"{_cell(reg.redis_commands_per_register if reg else None, '.2f')} |")
    for key, cmp in summary.items():
        if key.endswith("_over_one"):
            print(f"\n{key.replace('_', ' ')}: {cmp}", end="")
    print("\n\nPer step (rate: ok/calls, Kamailio ms/call summed, machine busy cores):")
    for name, r in results.items():
        steps = ", ".join(f"{s.rate}: {s.successful}/{s.calls} {s.kamailio_cpu_ms_per_call:.2f} "
                          f"{s.machine_busy_cores:.2f}" for s in r.steps)
        print(f"  {name:<9} {steps}")
        top = r.at_max() or (r.steps[-1] if r.steps else None)
        if top is not None and top.redis_commands:
            mix = ", ".join(f"{k} {v / top.calls:.2f}" for k, v in list(top.redis_commands.items())[:10])
            print(f"  {'':<9} Redis commands per call at {top.rate}/s: {mix}")
            per_node = "; ".join(f"node {i}: {d['bytes_to_redis']:.0f} B out, {d['bytes_from_redis']:.0f} B in, "
                                 f"{d['writes']:.2f} writes" for i, d in enumerate(top.redis_by_node_per_call))
            print(f"  {'':<9} per call, by node (Kamailio's Redis sockets): {per_node}")
        lat = r.latency_step()
        if lat is not None and lat.internode_kinds:
            print(f"  {'':<9} inter-node SIP messages at {lat.rate}/s: {lat.internode_kinds}")
        print(f"  {'':<9} load average before {r.load_before}, after {r.load_after}")
    print("\nLog scan (CRITICAL / BUG / crash):")
    for name, r in results.items():
        state = "CRASHED (a Kamailio process exited)" if r.crashed else "no crash"
        print(f"  {name}: {len(r.log_findings)} line(s), {state}, {r.error_lines} ERROR line(s), "
              f"{r.replicate_failed} REGISTER(s) not replicated (pusher: replicate-failed)"
              + (f"; error: {r.error}" if r.error else ""))
        for line in r.log_findings[:5] + r.error_examples[:3]:
            print(f"    {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"one {QUICK_RATES[0]} calls/s step of 4 s per configuration, 2 s of REGISTERs (< 60 s)")
    ap.add_argument("--rates", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help=f"calls/s per step, comma separated (default {','.join(map(str, RATES))})")
    ap.add_argument("--step-seconds", type=int, default=None, help="seconds of calls per step (default 10; quick 4)")
    ap.add_argument("--configs", default=",".join(TOPOLOGIES), help="which configurations, in order")
    ap.add_argument("--latency-rate", type=int, default=LATENCY_RATE,
                    help="the step (first rate at or above this) whose SIP traffic is captured for the wake "
                         "latency and the inter-node messages")
    ap.add_argument("--reg-rate", type=int, default=None,
                    help="REGISTER/s of the REGISTER step (default 400; quick 200)")
    ap.add_argument("--reg-seconds", type=int, default=None, help="seconds of the REGISTER step (default 5; quick 2)")
    ap.add_argument("--children", type=int, default=CHILDREN, help=f"SIP workers per node (default {CHILDREN})")
    ap.add_argument("--window", type=int, default=5, help="wait window (s): a parked call gets 480 after it")
    ap.add_argument("--wake-delay", type=float, default=0.5, help="seconds from a call's start to its re-REGISTER")
    ap.add_argument("--hold-ms", type=int, default=500, help="the caller's pause between ACK and BYE")
    ap.add_argument("--pool-seconds", type=int, default=4,
                    help="devices per lane = the lane's rate x this many seconds (a device is called again after)")
    ap.add_argument("--prereg-rate", type=int, default=500, help="REGISTER/s per lane while filling the pools")
    ap.add_argument("--logs", type=Path, default=None, help="copy each node's Kamailio log into this directory")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default bench/results/cluster_bench-<timestamp>.json)")
    args = ap.parse_args()
    if args.step_seconds is None:
        args.step_seconds = 4 if args.quick else 10
    if args.reg_rate is None:
        args.reg_rate = 200 if args.quick else 400
    if args.reg_seconds is None:
        args.reg_seconds = 2 if args.quick else 5
    rates = args.rates or (QUICK_RATES if args.quick else RATES)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in TOPOLOGIES for c in configs):
        raise SystemExit(f"--configs: some of {', '.join(TOPOLOGIES)}")
    for tool in ("kamailio", "kamcmd", "sipp", "redis-server", "dumpcap", "tshark", "ss"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")

    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, ConfigResult] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    try:
        for name in configs:
            topo = TOPOLOGIES[name]
            print(f"{name} ({topo.about}): steps {', '.join(map(str, rates))} calls/s x {args.step_seconds} s, "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
            results[name] = run_config(topo, args, rates, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(results)
    latency_rate = next((r for r in rates if r >= args.latency_rate), rates[-1])
    out = args.out or ROOT / "bench" / "results" / f"cluster_bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "params": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in vars(args).items() if k not in ("out", "logs")}  # (paths of this machine)
        | {"rates": list(rates), "latency_rate": latency_rate, "cpus": os.cpu_count()},
        "summary": summary,
        "configs": {name: asdict(r) for name, r in results.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print_report(results, summary, latency_rate)
    print(f"\nresults: {out}")
    if any(r.error or r.crashed for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
