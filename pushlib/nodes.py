"""Clustered nodes (WITH_CLUSTER) watching each other through Redis, so that the callers of a
node that dies get an answer.

A parked INVITE is a tm transaction in one node's memory: when that node dies, nobody else can
end it. A caller over TCP/TLS sees its connection reset and fails at once; a caller over UDP
would hear nothing until its own timers give up (32 s and more). So each node lists, per parked
call, what a final response to its UDP caller needs (`CallerAnswer`), and beats a heartbeat key.
When a node's heartbeat has been gone for `ALIVE_TTL` seconds, the first surviving node to claim
it sends each listed caller a stateless 503 (RFC 3261 matches a response to the client
transaction by Via branch and CSeq, not by who sends it; 503 also tells an upstream proxy to try
another node) and owes the calls' end-of-call pushes as any call end does.

A node's id carries a token of its run (`node_id`), so a node restarted under the same address is
a new node, and its previous run's calls are swept like any dead node's.

Keys (each node's on one hash slot): `pn:nodes` (set of node ids), `pn:node:{id}:alive` (TTL),
`pn:node:{id}:calls` (hash: call key -> CallerAnswer), `pn:node:{id}:sweep` (the claim).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from pushlib.redisconn import unavailable_on_error

#: seconds a node counts as alive after its last heartbeat (it beats every HEARTBEAT seconds)
ALIVE_TTL = 3
HEARTBEAT = 1
#: how long a sweep claim and a node's call list outlive the longest wait window
CLAIM_TTL = 600
NODES_KEY = "pn:nodes"


def node_id(address: str) -> str:
    """This run of the node at `address` (its CLUSTER_ADDRESS): the address and a random token."""
    return f"{address.removeprefix('sip:')}/{secrets.token_hex(4)}"


def alive_key(node: str) -> str:
    return f"pn:node:{{{node}}}:alive"


def calls_key(node: str) -> str:
    return f"pn:node:{{{node}}}:calls"


def sweep_key(node: str) -> str:
    return f"pn:node:{{{node}}}:sweep"


def udp_destination(host: str, port: int | str) -> str:
    """The SIP URI a stateless response to a UDP source goes to (IPv6 in brackets)."""
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"sip:{host}:{int(port)};transport=udp"


@dataclass(frozen=True)
class CallerAnswer:
    """What a final response to a parked call's caller needs, from its INVITE as received."""

    aor: str
    key: str
    dest: str
    via: str
    from_: str
    to: str
    call_id: str
    cseq: str

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: object) -> CallerAnswer | None:
        """None for anything that is not an encoded CallerAnswer (another version's, or garbage)."""
        try:
            d = json.loads(str(raw))
            return cls(**{f: str(d[f]) for f in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def response(self, code: int, reason: str, to_tag: str) -> str:
        """The stateless final response text (the To tag is ours: nobody answered with one)."""
        to = self.to if ";tag=" in self.to.lower() else f"{self.to};tag={to_tag}"
        lines = [f"SIP/2.0 {code} {reason}", f"Via: {self.via}", f"From: {self.from_}", f"To: {to}",
                 f"Call-ID: {self.call_id}", f"CSeq: {self.cseq}", "Server: pushproxy", "Content-Length: 0"]
        return "\r\n".join(lines) + "\r\n\r\n"


class NodeBook:
    """One node's heartbeat and parked-call list, and the sweep of dead nodes' lists, on a sync
    client (the SIP worker's). Every method completes or raises StoreUnavailable."""

    def __init__(self, client: Any, node: str) -> None:
        self._r = client
        self.node = node

    def heartbeat(self) -> None:
        with unavailable_on_error("node heartbeat"):
            self._r.set(alive_key(self.node), "1", ex=ALIVE_TTL)
            self._r.sadd(NODES_KEY, self.node)

    def list_call(self, answer: CallerAnswer) -> None:
        key = calls_key(self.node)
        with unavailable_on_error("node list call"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(key, answer.key, answer.encode())
            pipe.expire(key, CLAIM_TTL)
            pipe.execute()

    def unlist_call(self, call_key: str) -> None:
        with unavailable_on_error("node unlist call"):
            self._r.hdel(calls_key(self.node), call_key)

    def dead_nodes(self) -> list[str]:
        """The other nodes whose heartbeat is gone."""
        with unavailable_on_error("node liveness"):
            others = sorted(n for n in self._r.smembers(NODES_KEY) if n != self.node)
            return [n for n in others if not self._r.exists(alive_key(n))]

    def take_over(self, node: str) -> list[CallerAnswer] | None:
        """Claim dead `node` (None: another node did) and take its call list, which is removed."""
        with unavailable_on_error("node take over"):
            if not self._r.set(sweep_key(node), self.node, nx=True, ex=CLAIM_TTL):
                return None
            pipe = self._r.pipeline(transaction=True)  # (one slot: the node's hash tag)
            pipe.hgetall(calls_key(node))
            pipe.delete(calls_key(node))
            listed, _ = pipe.execute()
            self._r.srem(NODES_KEY, node)
        answers = (CallerAnswer.decode(v) for v in dict(listed).values())
        return [a for a in answers if a is not None]
