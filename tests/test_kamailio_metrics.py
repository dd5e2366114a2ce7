"""The SIP side's operations surface: xhttp_prom metrics kept by the KEMI router, and kamcmd over
the ctl socket. One stack per module (WITH_METRICS on a free port, wait window 3 s), plus unit
tests of kemi/ksrmetrics.py with a recording stand-in for KSR."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    DOMAIN,
    ROOT,
    Stack,
    asleep,
    fcm_token,
    flagship_call,
    free_port,
    push_stack,
    register,
    rfc8599_fcm_contact,
    sipp_caller,
)

# kemi/ is not a package: Kamailio loads router.py as a script that puts kemi/ on sys.path
sys.path.insert(0, str(ROOT / "kemi"))
import ksrmetrics

WAIT = 3.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    defines: dict[str, str | None] = {"WITH_METRICS": None, "METRICS_PORT": str(free_port())}
    with push_stack(auth=True, wait_window=WAIT, awake_window=10, extra_defines=defines) as s:
        yield s


def metrics_url(stack: Stack, path: str = "/metrics") -> str:
    return f"http://127.0.0.1:{stack.kamailio.defines['METRICS_PORT']}{path}"


def scrape(stack: Stack) -> Samples:
    with urllib.request.urlopen(metrics_url(stack), timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def kamcmd(stack: Stack, *command: str) -> str:
    socket_path = stack.kamailio.rundir / "kamailio_ctl"  # ctl's default: in the runtime dir (-Y)
    done = subprocess.run(["kamcmd", "-s", f"unixs:{socket_path}", *command], capture_output=True, text=True,
                          timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _user() -> str:
    return "m" + uuid.uuid4().hex[:10]


# --- against the running Kamailio ----------------------------------------------------------------


def test_woken_and_timed_out_calls_and_registers_are_counted(stack: Stack, tmp: Path) -> None:
    before = scrape(stack)
    flagship_call(stack, "tcp")  # registers, sleeps, is called, pushed, wakes, answers
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5990, tok, "udp"), "udp").status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")  # nobody wakes: the window ends it
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [480], caller.logs()[-2000:]
    bad = {555: "<sip:d@127.0.0.1:5995;pn-provider=webpush;pn-param=x;pn-prid=abc>",
           400: "<sip:d@127.0.0.1:5995;pn-provider=apns;pn-param=TEAM000001.com.example.phone.voip;pn-prid=zz>"}
    for code, contact in bad.items():
        assert register(stack, _user(), contact, "tcp").status == code

    found = scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(found, name, **labels) - value(before, name, **labels)

    assert delta("kamailio_pusher_calls_total", event="parked") == 2
    assert delta("kamailio_pusher_calls_total", event="woken") == 1
    assert delta("kamailio_pusher_calls_total", event="answered") == 1
    assert delta("kamailio_pusher_calls_total", event="timeout") == 1
    assert delta("kamailio_pusher_calls_total", event="fallback") == 0
    # the flagship phone REGISTERs twice (asleep, then woken), the Android phone once
    assert delta("kamailio_pusher_push_registers_total", provider="apns") == 2
    assert delta("kamailio_pusher_push_registers_total", provider="fcm") == 1
    assert delta("kamailio_pusher_register_rejected_total", code="555") == 1
    assert delta("kamailio_pusher_register_rejected_total", code="400") == 1
    # one wake, well inside the window, in cumulative buckets
    assert delta("kamailio_pusher_wake_seconds_count") == 1
    assert delta("kamailio_pusher_wake_seconds_bucket", le="+Inf") == 1
    wake = delta("kamailio_pusher_wake_seconds_sum")
    assert 0 < wake < WAIT
    assert value(found, "kamailio_pusher_parked_calls") == 0  # both calls are over
    # Kamailio's own statistics come along (xhttp_prom_stats "all")
    assert any(name.startswith("kamailio_core_") for name, _ in found)
    assert any(name.startswith("kamailio_tmx_") or name.startswith("kamailio_tm_") for name, _ in found)


def test_parked_calls_gauge_counts_a_call_in_its_window(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5991, tok, "udp"), "udp").status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert stack.wait_pushes(tok, 1, kind="incomingCall")  # parked once pushed
    assert value(scrape(stack), "kamailio_pusher_parked_calls") == 1
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [480]
    assert value(scrape(stack), "kamailio_pusher_parked_calls") == 0


def test_other_paths_404_and_sip_on_the_metrics_port_403(stack: Stack) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(metrics_url(stack, "/RPC"), timeout=5)
    assert err.value.code == 404
    port = int(stack.kamailio.defines["METRICS_PORT"] or 0)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        branch = "z9hG4bK" + uuid.uuid4().hex
        s.sendall((f"OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch={branch}\r\n"
                   f"From: <sip:probe@{DOMAIN}>;tag=1\r\nTo: <sip:{DOMAIN}>\r\nCall-ID: {branch}\r\n"
                   f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode())
        assert s.recv(4096).decode().startswith("SIP/2.0 403 ")


def test_kamcmd_works_over_the_ctl_socket(stack: Stack) -> None:
    user = _user()
    assert register(stack, user, rfc8599_fcm_contact(5992, fcm_token(), "udp"), "udp").status == 200
    shm = kamcmd(stack, "core.shmmem")
    assert "total:" in shm and "free:" in shm
    tm = kamcmd(stack, "tm.stats")
    assert "current:" in tm and "total:" in tm
    assert f"AoR: {user}@{DOMAIN}" in kamcmd(stack, "ul.dump")
    # jsonrpcs listens on its FIFO in the runtime dir too (kamctl's transport)
    assert stat.S_ISFIFO((stack.kamailio.rundir / "kamailio_rpc.fifo").stat().st_mode)


# --- kemi/ksrmetrics.py with a recording KSR -----------------------------------------------------


class _Recorder:
    """Records every KSR.<module>.<function>(args) call; `answers` gives return values."""

    def __init__(self, calls: list[tuple[str, tuple[Any, ...]]], module: str, answers: dict[str, Any]) -> None:
        self._calls, self._module, self._answers = calls, module, answers

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self._calls.append((f"{self._module}.{name}", args))
            return self._answers.get(f"{self._module}.{name}", 1)
        return call


class FakeKsr:
    def __init__(self, answers: dict[str, Any] | None = None, with_prom: bool = True) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        modules = ["htable", "pv", "xhttp"] + (["xhttp_prom"] if with_prom else [])
        for module in modules:
            setattr(self, module, _Recorder(self.calls, module, answers or {}))


def test_metrics_off_makes_no_ksr_call() -> None:
    ksr = FakeKsr(with_prom=False)
    defs = {"WITH_METRICS": "", "METRICS_PORT": "9494"}
    m = ksrmetrics.KsrMetrics.from_defines(ksr, defs.get)  # defined, but xhttp_prom not loaded
    assert not m.enabled
    m.parked("k")
    m.woken(["k"])
    m.ended("k", "timeout")
    m.push_register("apns")
    m.register_rejected(555)
    assert ksr.calls == []
    assert not ksrmetrics.KsrMetrics.from_defines(FakeKsr(), {}.get).enabled  # WITH_METRICS undefined


def test_events_map_to_bounded_labels() -> None:
    ksr = FakeKsr({"htable.sht_get": "1000.0"})
    m = ksrmetrics.KsrMetrics.from_defines(ksr, {"WITH_METRICS": "", "METRICS_PORT": "9494"}.get)
    assert m.enabled and m.port == 9494
    m.ended("k", "rejected-486")
    m.ended("k", "push-unavailable")
    m.push_register("webpush")  # not a provider of ours: not counted
    m.register_rejected(555)
    m.register_rejected(200)  # not a rejection: not counted
    assert [c for c in ksr.calls if c[0].startswith("xhttp_prom")] == [
        ("xhttp_prom.counter_inc_l1", ("pusher_calls_total", 1, "rejected")),
        ("xhttp_prom.counter_inc_l1", ("pusher_calls_total", 1, "other")),
        ("xhttp_prom.counter_inc_l1", ("pusher_register_rejected_total", 1, "555")),
    ]
    assert ksrmetrics.end_event("answered") == "answered" and ksrmetrics.end_event("canceled") == "canceled"


def test_scrapes_only_from_allowed_networks_on_the_metrics_port() -> None:
    nets = ksrmetrics.allowed_networks("10.0.0.0/8, ::1")
    assert ksrmetrics.source_allowed("10.1.2.3", nets) and ksrmetrics.source_allowed("[::1]", nets)
    assert not ksrmetrics.source_allowed("127.0.0.1", nets) and not ksrmetrics.source_allowed("junk", nets)
    with pytest.raises(ValueError, match="METRICS_ALLOW"):
        ksrmetrics.allowed_networks("10.0.0.0/8,example.com")
    ksr = FakeKsr({"pv.geti": 2})
    m = ksrmetrics.KsrMetrics(ksr, True, 9494, nets)
    m.http_request("192.0.2.1", 9494)  # not allowed
    m.http_request("10.0.0.1", 5060)  # the SIP port
    assert [c for c in ksr.calls if c[0] == "xhttp.xhttp_reply"] == [
        ("xhttp.xhttp_reply", (403, "Forbidden", "text/plain", "forbidden\n"))] * 2
    ksr.calls.clear()
    m.http_request("10.0.0.1", 9494)
    assert ("xhttp_prom.gauge_set_l0", ("pusher_parked_calls", "2")) in ksr.calls
    assert ksr.calls[-1] == ("xhttp_prom.dispatch", ())
