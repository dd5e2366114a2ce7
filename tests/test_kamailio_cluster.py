"""Integration: two clustered nodes (WITH_CLUSTER) on one Redis, on loopback (issue "Scale-out").

Node A (127.0.0.2) and node B (127.0.0.3) share the SIP port; callers and devices are on
127.0.0.1, the served domain. A REGISTER a node takes is replicated to the other over DMQ with a
Path back to it, so a call parked on A reaches a device that wakes on B, through B. Callers send
to a node with SIPp's -rsa (the request URI keeps the domain, 127.0.0.1).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.crc import key_slot

from harness.clusterstack import ClusterStack, cluster_stack, dmq_active_nodes, wait_cluster
from harness.rediscluster import RedisCluster, redis_cluster
from harness.sipua import SipPhone, open_sip_socket
from pushsandbox.certs import SandboxPki
from tests.support import (
    DOMAIN,
    TLS_CFG,
    KamailioProc,
    SipClient,
    SippRun,
    SipResponse,
    apns_token,
    fcm_token,
    free_port,
    push_kind,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    stop_all_sipp,
    wait_log,
)
from tests.support import asleep as back_date

WAIT = 4.0
TRANSPORTS = ["udp", "tcp"]


@pytest.fixture(scope="module", params=["redis", "redis-cluster"])
def cs(request: pytest.FixtureRequest) -> Iterator[ClusterStack]:
    """The nodes on one Redis server, then on a Redis Cluster (3 masters, 3 replicas)."""
    global _STACK, _RCLUSTER, _PKI
    with ExitStack() as es:
        redis = _RCLUSTER = es.enter_context(redis_cluster()) if request.param == "redis-cluster" else None
        tls_dir = Path(tempfile.mkdtemp(prefix="pn-cluster-tls-"))
        es.callback(shutil.rmtree, tls_dir, True)
        pki = _PKI = SandboxPki.load_or_create(tls_dir / "pki")
        (tls_dir / "tls.cfg").write_text(TLS_CFG.format(cert=pki.server_cert_path, key=pki.server_key_path,
                                                        ca=pki.ca_path))
        defines: dict[str, str | None] = {"LOCAL_DOMAINS": f'"{DOMAIN}"', "WITH_TLS": None,
                                          "SIPS_PORT": str(free_port()), "TLS_CFG": f'"{tls_dir / "tls.cfg"}"'}
        c = es.enter_context(cluster_stack(2, wait_window=WAIT, awake_window=10, auth=True, redis=redis,
                                           extra_defines=defines))
        _STACK = c
        _PASSWORDS.clear()
        yield c
        _STACK = _RCLUSTER = None


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(autouse=True)
def keep_logs(cs: ClusterStack, tmp_path: Path) -> Iterator[None]:
    yield
    stop_all_sipp()
    for i, node in enumerate(cs.nodes):
        (tmp_path / f"node{i}.log").write_text(node.log())


def _user() -> str:
    return "c" + uuid.uuid4().hex[:10]


def _aor(user: str) -> str:
    return f"sip:{user}@{DOMAIN}"


_PASSWORDS: dict[str, str] = {}


def register(node: KamailioProc, user: str, contact: str, transport: str, *, expires: int = 300,
             password: str | None = None, extra_headers: tuple[str, ...] = (),
             call_id: str | None = None) -> SipResponse:
    """A REGISTER of `user` (a subscriber of the shared Redis) sent to `node` from 127.0.0.1 (a UDP
    client binds on the proxy's address unless told otherwise, and a node's address is trusted)."""
    if password is None:
        password = _PASSWORDS.get(user) or _PASSWORDS.setdefault(user, _add_user(user))
    with SipClient(node.port, transport, host=node.host, source="127.0.0.1") as c:
        return c.register(user, contact, expires=expires, password=password or None,
                          extra_headers=extra_headers, call_id=call_id)


def _add_user(user: str) -> str:
    assert _STACK is not None
    return _STACK.stack(0).add_user(user)


_STACK: ClusterStack | None = None
_PKI: SandboxPki | None = None
_RCLUSTER: RedisCluster | None = None


def call(tmp: Path, node: KamailioProc, user: str, transport: str, scenario: str = "caller-call.xml",
         args: tuple[str, ...] = ()) -> SippRun:
    """A SIPp caller sending to `node` an INVITE for `user`@DOMAIN."""
    return sipp_caller(tmp, node.port, user, transport, scenario=scenario,
                       args=["-rsa", f"{node.host}:{node.port}", *args])


@dataclass
class Parked:
    user: str
    tok: str
    contact: str
    dev: SippRun
    caller: SippRun


def parked_call(cs: ClusterStack, tmp: Path, park_on: KamailioProc, register_on: KamailioProc,
                transport: str = "udp", device: str = "device-answer.xml", caller: str = "caller-call.xml",
                caller_args: tuple[str, ...] = ()) -> Parked:
    """A sleeping iOS VoIP device (a SIPp UAS with its own +sip.instance) registered on `register_on`,
    and a call for it parked on `park_on` whose incomingCall push has arrived."""
    user, tok = _user(), apns_token()
    dev = sipp_device(tmp, transport, scenario=device)
    contact = rfc8599_apns_contact(dev.port, tok, transport, instance=str(uuid.uuid4()))
    assert register(register_on, user, contact, transport).status == 200
    asleep(cs, user)
    run = call(tmp, park_on, user, transport, scenario=caller, args=caller_args)
    assert [push_kind(p) for p in cs.stack(0).wait_pushes(tok, 1)] == ["incomingCall"]
    return Parked(user, tok, contact, dev, run)


def asleep(cs: ClusterStack, user: str) -> None:
    """Back-date the user's devices (in the one Redis every node reads)."""
    back_date(cs.stack(0), user)


def bindings(node: KamailioProc, aor: str) -> str:
    """The node's usrloc record of `aor` (kamcmd ul.lookup), "" when it has none."""
    out = subprocess.run(["kamcmd", "-s", f"unixs:{node.rundir / 'kamailio_ctl'}", "ul.lookup", "location",
                          aor.removeprefix("sip:")],
                         capture_output=True, text=True, timeout=10, check=False)
    return out.stdout if out.returncode == 0 and "Contacts" in out.stdout else ""


def wait_bindings(node: KamailioProc, aor: str, present: bool, timeout: float = 3.0) -> str:
    end = time.monotonic() + timeout
    while True:
        got = bindings(node, aor)
        if bool(got) == present or time.monotonic() > end:
            return got
        time.sleep(0.05)


# --------------------------------------------------------------------------- shared location


def test_a_binding_taken_by_one_node_is_on_every_node_with_a_path_back(cs: ClusterStack) -> None:
    a, b = cs.nodes
    user, tok = _user(), apns_token()
    assert register(b, user, rfc8599_apns_contact(5993, tok), "udp").status == 200
    on_a = wait_bindings(a, _aor(user), True)
    assert on_a, "the binding did not reach node A"
    assert f"sip:{b.host}:{b.port}" in on_a and ";lr" in on_a  # A reaches it through B
    on_b = bindings(b, _aor(user))
    assert "Path: [not set]" in on_b  # B reaches it directly
    assert len(cs.env.store.devices(_aor(user))) == 1


def test_unregistering_on_one_node_is_seen_by_all(cs: ClusterStack, tmp: Path) -> None:
    a, b = cs.nodes
    user, tok = _user(), apns_token()
    contact = rfc8599_apns_contact(5992, tok)
    assert register(b, user, contact, "udp").status == 200
    assert wait_bindings(a, _aor(user), True)
    assert register(b, user, contact, "udp", expires=0).status == 200
    assert not wait_bindings(a, _aor(user), False)
    assert not bindings(b, _aor(user))
    assert cs.env.store.devices(_aor(user)) == []
    caller = call(tmp, a, user, "udp")
    caller.wait(15)
    assert caller.final_codes() == [404], caller.logs()[-2000:]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_caller_on_one_node_reaches_an_awake_device_on_another(cs: ClusterStack, tmp: Path,
                                                                  transport: str) -> None:
    a, b = cs.nodes
    user, tok = _user(), apns_token()
    dev = sipp_device(tmp, transport)
    assert register(b, user, rfc8599_apns_contact(dev.port, tok, transport), transport).status == 200
    assert wait_bindings(a, _aor(user), True)
    caller = call(tmp, a, user, transport)
    assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]
    assert dev.wait(15) == 0, dev.logs()[-3000:]
    # the INVITE came through B (its Record-Route), not straight from A
    assert f"{b.host}:{b.port}" in dev.messages()
    assert cs.env.sandbox.control.pushes(tok) == []


# --------------------------------------------------------------------------- cross-node wake


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_parked_on_one_node_is_answered_when_the_device_wakes_on_another(
        cs: ClusterStack, tmp: Path, transport: str) -> None:
    a, b = cs.nodes
    p = parked_call(cs, tmp, a, b, transport)
    user, tok, dev, caller = p.user, p.tok, p.dev, p.caller
    assert register(b, user, p.contact, transport).status == 200  # the app wakes, on B
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]
    assert dev.wait(15) == 0, dev.logs()[-3000:]
    assert dev.received("INVITE") == 1
    assert f"{b.host}:{b.port}" in dev.messages()  # through B, where the device is connected
    wait_log(a, f"pusher: wake aor={_aor(user)}")
    time.sleep(0.3)
    assert len(cs.env.sandbox.control.pushes(tok)) == 1  # no cancel push: it answered


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_natted_device_that_wakes_on_another_node_gets_the_call_over_its_new_flow(
        cs: ClusterStack, tmp: Path, transport: str) -> None:
    """The device's Contact names a port nobody reads (its private address): only node B, where
    its REGISTER came from port X (UDP) or over its connection (TCP), can reach it. A's INVITE
    goes through B (the Path's received parameter) and the dialog's requests follow."""
    a, b = cs.nodes
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = _add_user(user)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as decoy:
        decoy.bind(("127.0.0.1", 0))
        via_port = int(decoy.getsockname()[1])
        contact = rfc8599_apns_contact(via_port, tok, transport, instance=instance)

        def nat_phone() -> SipPhone:
            proxy = (b.host, b.port)
            return SipPhone(open_sip_socket(proxy, transport, "127.0.0.1"), transport, proxy, via_port=via_port)

        with nat_phone() as first:
            assert first.register(user, contact, password=password).status == 200
        asleep(cs, user)
        caller = call(tmp, a, user, transport)
        assert [push_kind(p) for p in cs.stack(0).wait_pushes(tok, 1)] == ["incomingCall"]
        with nat_phone() as phone:  # woken: a new NAT mapping
            assert phone.register(user, contact, password=password).status == 200
            invite = phone.request("INVITE")
            assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{via_port};transport={transport}")
            assert f"Record-Route: <sip:{b.host}:{b.port};" in invite
            tag = uuid.uuid4().hex[:8]
            phone.answer(invite, 180, "Ringing", tag)
            phone.answer(invite, 200, "OK", tag, SDP)
            phone.request("ACK")
            bye = phone.request("BYE", timeout=10)
            phone.answer(bye, 200, "OK")
        assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]
        decoy.setblocking(False)
        with pytest.raises(BlockingIOError):
            decoy.recv(65535)  # nothing went to the address the phone claimed


SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def test_a_phone_that_wakes_on_another_node_under_a_new_instance_id_still_gets_its_call(
        cs: ClusterStack, tmp: Path) -> None:
    """liblinphone keeps its +sip.instance only across clean exits: woken, it may register under a
    new one with the same token. B's Redis save knows it is the same phone (evicted the old id);
    the replicated REGISTER tells A, whose call was parked for the old id. A device's own claim of
    old ids is not carried over."""
    a, b = cs.nodes
    p = parked_call(cs, tmp, a, b)
    user, tok, dev, caller = p.user, p.tok, p.dev, p.caller
    reborn = rfc8599_apns_contact(dev.port, tok, "udp", instance=str(uuid.uuid4()))
    forged = ("X-Pusher-Evicted: pn:not-mine",)
    assert register(b, user, reborn, "udp", extra_headers=forged).status == 200
    assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]
    assert dev.received("INVITE") == 1
    assert len(cs.env.store.devices(_aor(user))) == 1
    assert "pn:not-mine" not in dev.messages()


def test_a_wake_on_the_parking_node_is_replicated_too(cs: ClusterStack, tmp: Path) -> None:
    """The woken device's REGISTER resumes the call on its own node and still reaches the others
    (tsilo's append had left the request URI marked as used: nothing was replicated)."""
    a, b = cs.nodes
    p = parked_call(cs, tmp, a, a)
    user, contact, caller = p.user, p.contact, p.caller
    wake_id = uuid.uuid4().hex
    assert register(a, user, contact, "udp", call_id=wake_id).status == 200
    assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]
    end = time.monotonic() + 3
    while wake_id not in bindings(b, _aor(user)) and time.monotonic() < end:
        time.sleep(0.05)
    assert wake_id in bindings(b, _aor(user))
    assert "replicate-failed" not in a.log()


def _tls_phone(node: KamailioProc) -> SipPhone:
    """A phone on a new TLS connection to `node`'s SIPS port (the sandbox PKI's certificate is for
    127.0.0.1, the name the phone checks)."""
    assert _PKI is not None
    port = int(str(node.defines["SIPS_PORT"]))
    ctx = ssl.create_default_context(cafile=str(_PKI.ca_path))
    raw = socket.create_connection((node.host, port), timeout=5)
    return SipPhone(ctx.wrap_socket(raw, server_hostname="127.0.0.1"), "tls")


def test_a_tls_phone_that_wakes_on_another_node_gets_the_call_over_its_new_connection(
        cs: ClusterStack, tmp: Path) -> None:
    """Like an iOS app: it registers over TLS on B, drops its connection and sleeps; woken, it opens
    a new TLS connection to B and re-registers. The call parked on A reaches it over that very
    connection, through B, and so do the dialog's requests."""
    a, b = cs.nodes
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = _add_user(user)
    with _tls_phone(b) as first:
        contact = rfc8599_apns_contact(first.local_port, tok, "tls", instance)
        assert first.register(user, contact, password=password).status == 200
    asleep(cs, user)
    caller = call(tmp, a, user, "udp")
    assert [push_kind(p) for p in cs.stack(0).wait_pushes(tok, 1)] == ["incomingCall"]
    with _tls_phone(b) as phone:  # woken: a new connection from a new port
        contact = rfc8599_apns_contact(phone.local_port, tok, "tls", instance)
        assert phone.register(user, contact, password=password).status == 200
        invite = phone.request("INVITE")
        assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{phone.local_port};transport=tls")
        assert f"sip:{b.host}:{b.defines['SIPS_PORT']};transport=tls" in invite  # B's Record-Route
        tag = uuid.uuid4().hex[:8]
        phone.answer(invite, 180, "Ringing", tag)
        phone.answer(invite, 200, "OK", tag, SDP)
        assert phone.request("ACK").startswith(f"ACK sip:dev@127.0.0.1:{phone.local_port};transport=tls")
        bye = phone.request("BYE", timeout=10)
        phone.answer(bye, 200, "OK")
    assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-3000:]


def test_caller_cancel_reaches_a_device_that_woke_on_another_node(cs: ClusterStack, tmp: Path) -> None:
    a, b = cs.nodes
    p = parked_call(cs, tmp, a, b, device="device-ring.xml", caller="caller-cancel-ringing.xml",
                    caller_args=("-d", "300"))
    dev, caller = p.dev, p.caller
    assert register(b, p.user, p.contact, "udp").status == 200
    assert caller.wait(20) == 0, caller.logs()[-3000:]
    assert dev.wait(15) == 0, dev.logs()[-3000:]  # rang, got the CANCEL, answered 487
    assert dev.received("CANCEL") == 1


def test_the_window_ends_on_the_parking_node_while_the_device_registers_on_another(
        cs: ClusterStack, tmp: Path) -> None:
    a, b = cs.nodes
    user, tok = _user(), fcm_token()
    dev = sipp_device(tmp, "udp")
    contact = rfc8599_fcm_contact(dev.port, tok, "udp")
    assert register(b, user, contact, "udp").status == 200
    asleep(cs, user)
    caller = call(tmp, a, user, "udp")
    caller.wait(WAIT + 10)
    assert caller.final_codes() == [480], caller.logs()[-3000:]
    assert register(b, user, contact, "udp").status == 200  # too late: the call has ended
    time.sleep(1.0)
    assert dev.received("INVITE") == 0
    kinds = sorted(push_kind(p) for p in cs.stack(0).wait_pushes(tok, 3))
    assert kinds == ["cancelIncomingCall", "incomingCall", "missedCall"]


# --------------------------------------------------------------------------- dispatchers on every node


def test_each_device_is_pushed_once_with_a_dispatcher_on_every_node(cs: ClusterStack, tmp: Path) -> None:
    """Both nodes' in-process dispatchers read one consumer group: every call push goes out once
    per device, whichever node parked the call and whichever dispatcher took the job."""
    users = [(_user(), fcm_token()) for _ in range(6)]
    for i, (user, tok) in enumerate(users):
        assert register(cs.nodes[i % 2], user, rfc8599_fcm_contact(5970 + i, tok), "udp").status == 200
        asleep(cs, user)
    callers = [call(tmp, cs.nodes[(i + 1) % 2], user, "udp") for i, (user, _) in enumerate(users)]
    for c in callers:
        c.wait(WAIT + 15)
        assert c.final_codes() == [480], c.logs()[-2000:]
    for _, tok in users:
        got = cs.stack(0).wait_pushes(tok, 3)
        assert sorted(push_kind(p) for p in got) == ["cancelIncomingCall", "incomingCall", "missedCall"]


# --------------------------------------------------------------------------- a node dies


def test_a_dead_node_loses_only_its_parked_calls(cs: ClusterStack, tmp: Path) -> None:
    a, b = cs.nodes
    p = parked_call(cs, tmp, a, a)
    user, contact, dev, caller = p.user, p.contact, p.dev, p.caller
    assert wait_bindings(b, _aor(user), True)
    assert a.proc is not None
    os.killpg(a.proc.pid, signal.SIGKILL)  # the node and all its workers, at once
    a.proc.wait(10)
    try:
        # the parked transaction died with A: B answers its UDP caller once A's heartbeat is gone
        # (after ALIVE_TTL, about 3 s), and owes the call's end pushes as any call end does
        caller.wait(15)
        assert caller.final_codes() == [503], caller.logs()[-3000:]
        wait_log(b, "pusher: node-failed")
        wait_log(b, f"pusher: end aor={_aor(user)}")
        # the device, its binding on B and the push queue outlive A
        assert register(b, user, contact, "udp").status == 200
        assert len(cs.env.store.devices(_aor(user))) == 1
        second = call(tmp, b, user, "udp")
        assert second.wait(20) == 0 and second.final_codes() == [200], second.logs()[-3000:]
        assert dev.wait(15) == 0
    finally:
        a.stop()
        a.start()
        wait_cluster(cs.nodes, 2)


# --------------------------------------------------------------------------- what a stranger cannot do


def _send(node: KamailioProc, text: str, wait: float = 1.0) -> str:
    """Send one UDP request from 127.0.0.1 to `node`; the first response, or "" after `wait` s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(wait)
        s.sendto(text.replace("PORT", str(s.getsockname()[1])).encode(), (node.host, node.port))
        try:
            return s.recv(65535).decode(errors="replace")
        except TimeoutError:
            return ""


def _request(method: str, ruri: str, *extra: str) -> str:
    lines = [f"{method} {ruri} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK{uuid.uuid4().hex};rport",
             f"From: <sip:mallory@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}", f"To: <{ruri}>",
             f"Call-ID: {uuid.uuid4().hex}", f"CSeq: 1 {method}", "Max-Forwards: 70", *extra]
    return "\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n"


def test_a_stranger_cannot_join_the_cluster_over_dmq(cs: ClusterStack) -> None:
    a, b = cs.nodes
    notify = _request("KDMQ", f"sip:notification_peer@{a.host}:{a.port}", "Content-Type: text/plain")
    body = "sip:127.0.0.1:5999;status=active\r\n"
    notify = notify.replace("Content-Length: 0", f"Content-Length: {len(body)}") + body
    assert _send(a, notify) == ""  # dropped, unanswered
    assert dmq_active_nodes(a) == {b.host}
    wait_log(a, "pusher: dmq-not-from-node")


def test_a_device_cannot_register_a_path(cs: ClusterStack) -> None:
    """With use_path on, a Path the device wrote would make every node send its calls wherever it
    says: refused, and nothing stored."""
    b = cs.nodes[1]
    user, tok = _user(), apns_token()
    r = register(b, user, rfc8599_apns_contact(5991, tok), "udp",
                 extra_headers=("Path: <sip:203.0.113.9:5060;lr;received=sip:203.0.113.9:5060>",))
    assert (r.status, r.reason) == (403, "Path Not Allowed")
    assert cs.env.store.devices(_aor(user)) == []
    assert not bindings(b, _aor(user))


def test_a_stranger_gets_no_trust_a_node_has(cs: ClusterStack) -> None:
    """Only node addresses skip authentication (replicated REGISTERs) and may route a request to a
    device by a Route naming us: from anyone else, the same requests get the usual treatment."""
    a = cs.nodes[0]
    user, tok = _user(), apns_token()
    reply = _send(a, _request("REGISTER", f"sip:{DOMAIN}", f"Contact: {rfc8599_apns_contact(5990, tok)}"))
    assert reply.startswith("SIP/2.0 401"), reply  # challenged, not saved as a replica
    assert not bindings(a, _aor(user))
    routed = _request("INVITE", "sip:victim@203.0.113.7:5060",
                      f"Route: <sip:{a.host}:{a.port};lr;received=sip:203.0.113.7:5060>")
    reply = _send(a, routed)
    assert reply.startswith("SIP/2.0 403"), reply  # a foreign domain, not relayed


# --------------------------------------------------------------------------- Redis Cluster failover


def test_calls_go_on_through_a_redis_cluster_failover(cs: ClusterStack, tmp: Path) -> None:
    """A planned failover (CLUSTER FAILOVER on a replica) of the master holding the push queue,
    during a run of calls parked on A and woken on B: every call is answered (redis-py follows the
    slot to the new master, and reloads the scripts it lacks)."""
    if _RCLUSTER is None:
        pytest.skip("Redis Cluster only")
    a, b = cs.nodes
    master = _RCLUSTER.master_of_slot(key_slot(cs.env.settings.stream.encode()))
    replica = _RCLUSTER.replica_of(master)
    failover: threading.Thread | None = None
    outcomes: list[int] = []
    for i in range(6):
        user, tok = _user(), apns_token()
        dev = sipp_device(tmp, "udp")
        contact = rfc8599_apns_contact(dev.port, tok, "udp", instance=str(uuid.uuid4()))
        assert register(b, user, contact, "udp").status == 200
        asleep(cs, user)
        caller = call(tmp, a, user, "udp")
        if i == 2:  # while this call waits for its device
            failover = threading.Thread(target=_RCLUSTER.failover, args=(replica,))
            failover.start()
        cs.stack(0).wait_pushes(tok, 1, timeout=10)
        register(b, user, contact, "udp")
        caller.wait(20)
        outcomes += caller.final_codes()
    assert failover is not None
    failover.join(30)
    assert outcomes == [200] * 6
    assert _RCLUSTER.master_of_slot(key_slot(cs.env.settings.stream.encode())).address == replica.address
