"""A private Redis Cluster on loopback for tests and benchmarks: 3 masters + 3 replicas.

Six `redis-server` processes (`cluster-enabled yes`, each with its own free client port, its own
free cluster-bus port (`cluster-port`, so no port+10000 guess) and its own directory under one
temp dir), joined with `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`, then
waited for until every node says `cluster_state:ok`, knows all six nodes and every replica's link
to its master is up. `RedisCluster.url` is the `redis+cluster://` URL pushlib takes
(`pushlib.settings.cluster_url`).

Every process is started in its own session and stopped by its PID (`localrun.stop_process`),
the temp dir removed, also when the start fails half way or the test using it fails. Every wait
is bounded. Failover helpers: `failover` (CLUSTER FAILOVER on a replica, graceful) and `kill`
(SIGKILL of a master: its replica takes over after `cluster-node-timeout`), `restart` to bring a
killed node back (it rejoins as a replica of the node that replaced it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis

from harness.localrun import free_port, stop_process, wait_for_port

HOST = "127.0.0.1"
#: short, so a killed master's replica takes over in about 2 s (failure detection + election)
DEFAULT_NODE_TIMEOUT_MS = 1000
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for in time (the message says which)."""


@dataclass
class ClusterNode:
    port: int
    bus_port: int
    workdir: Path
    node_timeout_ms: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        # Replica validity factor 0: a replica always tries to take over, however long its link
        # was down (the tests kill masters right after writes).
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", HOST, "--dir", str(self.workdir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-replica-validity-factor", "0",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL, by PID: a crash, no goodbye to the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) connection to this one node, for admin commands."""
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=timeout,
                           socket_connect_timeout=timeout)


@dataclass
class RedisCluster:
    nodes: list[ClusterNode]
    workdir: Path
    node_timeout_ms: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """The URL pushlib takes for this cluster: every node as a startup node."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def _view(self, via: ClusterNode) -> list[dict[str, str]]:
        """CLUSTER NODES as `via` sees it: one dict per node (address, id, flags, master id)."""
        with via.client() as c:
            nodes: dict[str, dict[str, object]] = c.execute_command("CLUSTER NODES")
        return [{"id": str(v["node_id"]), "address": address, "flags": str(v["flags"]), "master": str(v["master_id"])}
                for address, v in nodes.items()]

    def masters(self) -> list[ClusterNode]:
        """The running nodes that are masters now (as each sees itself)."""
        found = []
        for n in self.nodes:
            if not n.running:
                continue
            with suppress(redis.RedisError), n.client() as c:
                if c.execute_command("ROLE")[0] == "master":
                    found.append(n)
        return found

    def replica_of(self, master: ClusterNode, timeout: float = 10.0) -> ClusterNode:
        """A running replica of `master` (as `master` sees the cluster), waiting for one to be
        attached (a replica learns its new master by gossip, right after a failover). Bounded."""
        end = time.monotonic() + timeout
        while True:
            view = self._view(master)
            master_id = next(v["id"] for v in view if "myself" in v["flags"])
            for v in view:
                if v["master"] == master_id and "fail" not in v["flags"]:
                    replica = self.node(int(v["address"].rsplit(":", 1)[1]))
                    if replica.running:
                        with replica.client() as c:
                            role = c.execute_command("ROLE")
                        if role[0] == "slave" and int(role[2]) == master.port and role[3] == "connected":
                            return replica
            if time.monotonic() > end:
                raise ClusterError(f"master {master.address} has no running replica after {timeout:.0f}s")
            time.sleep(0.05)

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The node serving `slot` now (CLUSTER SLOTS from any running node)."""
        for n in self.nodes:
            if not n.running:
                continue
            with suppress(redis.RedisError), n.client() as c:
                for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                    if int(start) <= slot <= int(end):
                        return self.node(int(primary[1]))
        raise ClusterError(f"no running node knows who serves slot {slot}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok, sees the same masters (one per slot
        range, none failing), and every replica's link to its master is up. Bounded."""
        end = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < end:
            try:
                last = self._health_problem()
                if not last:
                    return
            except redis.RedisError as exc:
                last = f"{exc.__class__.__name__}: {exc}"
            time.sleep(0.1)
        raise ClusterError(f"cluster not healthy after {timeout:.0f}s: {last}")

    def _health_problem(self) -> str:
        running = [n for n in self.nodes if n.running]
        for n in running:
            with n.client() as c:
                if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return f"{n.address}: not cluster_state:ok"
                role = c.execute_command("ROLE")
                if role[0] == "slave" and role[3] != "connected":
                    return f"{n.address}: replica link {role[3]}"
            view = self._view(n)
            me = next(v for v in view if "myself" in v["flags"])
            if ("master" in me["flags"]) != (role[0] == "master"):
                return f"{n.address}: role {role[0]} but flags {me['flags']}"
            if len(view) != len(self.nodes):
                return f"{n.address} knows {len(view)} of {len(self.nodes)} nodes"
            live = [v for v in view if "fail" not in v["flags"] and v["address"] in {r.address for r in running}]
            if len(live) != len(running):
                return f"{n.address} still sees a running node as failing"
        return ""

    def failover(self, replica: ClusterNode, timeout: float = 15.0) -> None:
        """CLUSTER FAILOVER on `replica` (graceful: its master stops writes, the replica catches
        up and takes over), then wait until it is master and the cluster is healthy."""
        with replica.client() as c:
            role = c.execute_command("ROLE")
            if role[0] != "slave":
                raise ClusterError(f"{replica.address} is not a replica")
            c.execute_command("CLUSTER FAILOVER")
        self._wait_master(replica, timeout)
        self.wait_healthy(timeout)

    def kill(self, master: ClusterNode) -> ClusterNode:
        """SIGKILL `master`; returns its replica, which takes over once the other masters agree
        the killed one failed (about `cluster-node-timeout` + an election)."""
        replica = self.replica_of(master)
        master.kill()
        return replica

    def wait_promoted(self, replica: ClusterNode, timeout: float = 15.0) -> None:
        self._wait_master(replica, timeout)

    def _wait_master(self, node: ClusterNode, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with suppress(redis.RedisError), node.client() as c:
                info = c.execute_command("CLUSTER INFO")
                if c.execute_command("ROLE")[0] == "master" and info.get("cluster_state") == "ok":
                    return
            time.sleep(0.05)
        raise ClusterError(f"{node.address} is not a master of a healthy cluster after {timeout:.0f}s")

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again (same port, dir and nodes.conf: it rejoins, as a
        replica of whoever took its slots) and wait for a healthy cluster."""
        if node.running:
            return
        node.start()
        self.wait_healthy(timeout)

    def flush(self) -> None:
        """FLUSHALL on every master."""
        for n in self.masters():
            with n.client() as c:
                c.flushall()

    def stop(self) -> None:
        """Stop every process this cluster started (by PID) and remove its temp dir."""
        if self._stopped:
            return
        self._stopped = True
        for n in self.nodes:
            with suppress(Exception):
                n.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (client and bus ports of every node)."""
    ports: list[int] = []
    for _ in range(count * 20):
        if len(ports) == count:
            return ports
        port = free_port()
        if port not in ports:
            ports.append(port)
    raise ClusterError("not enough free ports")


@contextmanager
def redis_cluster(masters: int = 3, replicas: int = 1,
                  node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS) -> Iterator[RedisCluster]:
    """Start a cluster (`masters` masters with `replicas` replicas each), yield it healthy, stop it."""
    total = masters * (1 + replicas)
    workdir = Path(tempfile.mkdtemp(prefix="pn-rcluster-"))
    ports = _free_ports(2 * total)
    cluster = RedisCluster([], workdir, node_timeout_ms)
    try:
        for i in range(total):
            nodedir = workdir / f"node{i}"
            nodedir.mkdir()
            node = ClusterNode(ports[2 * i], ports[2 * i + 1], nodedir, node_timeout_ms)
            cluster.nodes.append(node)
            node.start()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in cluster.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
        )
        if create.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed ({create.returncode}): "
                               f"{(create.stdout + create.stderr)[-2000:]}")
        cluster.wait_healthy(START_TIMEOUT)
        yield cluster
    finally:
        cluster.stop()


__all__ = ["DEFAULT_NODE_TIMEOUT_MS", "ClusterError", "ClusterNode", "RedisCluster", "redis_cluster"]
