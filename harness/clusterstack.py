"""Several push proxy nodes (WITH_CLUSTER) on one Redis, on loopback, for the scale-out tests and
benchmark.

Node i listens on 127.0.0.<i+2> (one SIP port for all), so the nodes tell each other apart from
callers and devices (on 127.0.0.1) by address, as CLUSTER_NODES does in a deployment. Each node
learns the cluster from the next one (CLUSTER_PEER) over DMQ; `cluster_stack()` returns once
every node lists every other as active. Every process is stopped by PID, every dir removed.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from harness.localrun import free_port
from harness.localstack import (
    KamailioProc,
    PushEnv,
    RedisEndpoint,
    Stack,
    kamailio_process,
    push_env,
    pusher_defines,
    wait_log,
)

__all__ = ["ClusterStack", "cluster_defines", "cluster_stack", "dmq_active_nodes", "node_host"]


def node_host(index: int) -> str:
    return f"127.0.0.{index + 2}"


def cluster_defines(index: int, count: int, port: int) -> dict[str, str | None]:
    """The WITH_CLUSTER defines of node `index` of `count` (all on SIP port `port`)."""
    hosts = [node_host(i) for i in range(count)]
    defines: dict[str, str | None] = {
        "WITH_CLUSTER": None,
        "CLUSTER_ADDRESS": f'"sip:{hosts[index]}:{port}"',
        "CLUSTER_PEER": f'"sip:{hosts[(index + 1) % count]}:{port}"',
        "CLUSTER_NODES": '"' + ",".join(hosts) + '"',
    }
    if count > 2:
        defines["CLUSTER_PEER2"] = f'"sip:{hosts[(index + 2) % count]}:{port}"'
    return defines


def dmq_active_nodes(node: KamailioProc) -> set[str]:
    """The DMQ peers this node lists as active, by host (kamcmd over its ctl socket)."""
    out = subprocess.run(
        ["kamcmd", "-s", f"unixs:{node.rundir / 'kamailio_ctl'}", "dmq.list_nodes"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout
    hosts: set[str] = set()
    for block in out.split("{"):
        host = re.search(r"host:\s*(\S+)", block)
        if host and re.search(r"status:\s*active", block) and not re.search(r"local:\s*1", block):
            hosts.add(host.group(1))
    return hosts


@dataclass
class ClusterStack:
    env: PushEnv
    nodes: list[KamailioProc]

    def stack(self, index: int) -> Stack:
        """A one-node view (for the helpers written for a single Kamailio)."""
        return self.env.stack(self.nodes[index])


@contextmanager
def cluster_stack(count: int = 2, *, wait_window: float = 30, awake_window: float = 10, auth: bool = False,
                  extra_defines: Mapping[str, str | None] | None = None,
                  redis: RedisEndpoint | None = None) -> Iterator[ClusterStack]:
    """Redis (a server of its own, or `redis`: e.g. a Redis Cluster) + sandbox + `count` clustered
    Kamailio nodes, each with its in-process dispatcher (all on the one consumer group); yielded
    once the nodes see each other over DMQ."""
    port = free_port()
    with ExitStack() as es:
        env = push_env(es, redis, wait_window)
        nodes: list[KamailioProc] = []
        for i in range(count):
            defines = pusher_defines(env.redis.url, auth=auth, wait_window=wait_window,
                                     awake_window=awake_window, extra={**cluster_defines(i, count, port),
                                                                       **(extra_defines or {})})
            node = es.enter_context(kamailio_process(defines, host=node_host(i), port=port))
            wait_log(node, "pusher: dispatcher-start", timeout=15)
            nodes.append(node)
        wait_cluster(nodes, count)
        yield ClusterStack(env, nodes)


def wait_cluster(nodes: list[KamailioProc], count: int, timeout: float = 20.0) -> None:
    """Until every running node lists the other running nodes as active DMQ peers."""
    end = time.monotonic() + timeout
    while True:
        running = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
        missing = {n.host: {m.host for m in running if m is not n} - dmq_active_nodes(n) for n in running}
        if not any(missing.values()):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"DMQ peers not active after {timeout}s: {missing} (of {count} nodes)")
        time.sleep(0.2)
