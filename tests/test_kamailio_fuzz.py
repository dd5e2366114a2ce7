"""SIP fuzzing (security issue): a bounded subset of `bench/sip_fuzz.py` in the test command.

One stack per module (KEMI mode, auth on). After a legitimate call, 3,000 UDP and 2,000 TCP
requests of `harness.sipfuzz` (fixed seed; a share authenticates as subscriber "fuzz") go to the
proxy; then Kamailio must be alive and answering, its log free of CRITICAL/BUG/ALERT lines, and a
legitimate call must still complete over UDP and TCP. The fuzz itself is asserted too: every
request was sent, the proxy answered a good share of them, and every template and mutation ran.
The generator's own properties (determinism, loopback only, datagram size) need no stack.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness.localstack import push_stack
from harness.sipfuzz import (
    CallResult,
    Credentials,
    FuzzStats,
    LogReport,
    SipFuzzer,
    Target,
    legit_call,
    locate,
    options_ping,
    require_loopback,
    run,
    scan_log,
)

SEED = 8599
COUNTS = {"udp": 3000, "tcp": 2000}
RATE = 1000.0  # requests/s per transport
BUDGET = 40.0  # seconds of fuzzing at most (both transports)
HOST = "127.0.0.1"
TCP_CONNECTIONS = 4


@dataclass
class Fuzzed:
    stats: dict[str, FuzzStats]
    exit_code: int | None
    pings: dict[str, int | None]
    calls_after: dict[str, CallResult]
    log: LogReport
    generator: dict[str, SipFuzzer]


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    with push_stack(auth=True) as stack:
        before = legit_call(stack, "udp")
        assert before.ok, f"the stack cannot place a call even before the fuzz: {before.detail}"
        credentials = Credentials("fuzz", stack.add_user("fuzz"))
        deadline = time.monotonic() + BUDGET
        stats = {t: run(HOST, stack.kamailio.port, t, n, SEED, RATE, deadline, credentials=credentials,
                         tcp_connections=TCP_CONNECTIONS)
                 for t, n in COUNTS.items()}
        proc = stack.kamailio.proc
        exit_code = proc.poll() if proc is not None else -1
        pings = {t: options_ping(HOST, stack.kamailio.port, t) for t in ("udp", "tcp")}
        calls_after = {t: legit_call(stack, t) for t in ("udp", "tcp")} if exit_code is None else {}
        generator = {t: SipFuzzer(SEED, Target(HOST, stack.kamailio.port, t, 0), credentials,
                                 'Digest realm="127.0.0.1", nonce="x"')
                     for t in COUNTS}
        yield Fuzzed(stats, exit_code, pings, calls_after, scan_log(stack.kamailio.log()), generator)


def _repro(fuzzed: Fuzzed, lines: list[str]) -> str:
    """The log lines with the requests they name, rebuilt (for a failure message)."""
    out = list(lines[:5])
    for seed, transport, index in sorted({s for line in lines for s in locate(line)})[:5]:
        if seed == SEED:
            gen = fuzzed.generator[transport].message(index)
            out.append(f"{transport} #{index} {gen.kind} {gen.mutations}: {gen.data[:1500]!r}")
    return "\n".join(out)


# --------------------------------------------------------------------------- the fuzz ran


@pytest.mark.parametrize("transport", list(COUNTS))
def test_every_request_was_sent_within_the_budget(fuzzed: Fuzzed, transport: str) -> None:
    s = fuzzed.stats[transport]
    assert s.stopped_by == "count" and s.sent == COUNTS[transport], s.to_dict()
    assert s.send_errors == 0
    assert s.authenticated, "the proxy did not challenge the fuzz subscriber: no authenticated share was sent"


def test_udp_fuzz_exercised_the_proxy(fuzzed: Fuzzed) -> None:
    s = fuzzed.stats["udp"]
    # most well-formed and many mutated requests get an answer: auth challenges, 404s, 400s,
    # 200 keepalives and registrations; a proxy that stopped answering half way would miss this by far
    # (no 1xx: the fuzzer's in-dialog requests are forged, and refused since Record-Route is signed)
    assert s.total_replies >= 0.3 * s.sent, s.replies
    assert s.replies.get("4xx", 0) >= 0.2 * s.sent, s.replies
    assert s.replies.get("2xx", 0) > 0, s.replies


def test_tcp_fuzz_exercised_the_proxy_and_survived_closed_connections(fuzzed: Fuzzed) -> None:
    s = fuzzed.stats["tcp"]
    assert s.total_replies >= 0.1 * s.sent, s.replies
    assert s.replies.get("4xx", 0) > 0 and s.replies.get("2xx", 0) > 0, s.replies
    # oversized and badly framed requests make the proxy drop connections: the sender reconnected
    # (a connection is replaced when its turn comes, so the last few may stay closed)
    assert s.tcp_closed_by_proxy > 0 and s.tcp_reconnects >= s.tcp_closed_by_proxy - TCP_CONNECTIONS


def test_every_template_and_mutation_ran(fuzzed: Fuzzed) -> None:
    for transport, s in fuzzed.stats.items():
        gen = fuzzed.generator[transport]
        assert set(s.kinds) == set(gen.kind_names), s.kinds
        assert set(s.mutations) == set(gen.mutation_names), s.mutations


# --------------------------------------------------------------------------- the proxy survived


def test_kamailio_is_alive_and_answers_on_both_transports(fuzzed: Fuzzed) -> None:
    assert fuzzed.exit_code is None, "kamailio exited during the fuzz"
    assert fuzzed.pings == {"udp": 200, "tcp": 200}


def test_kamailio_log_has_no_critical_bug_or_alert_line(fuzzed: Fuzzed) -> None:
    assert fuzzed.log.lines > sum(COUNTS.values()) / 10  # the log was read, and the fuzz left a trace
    assert fuzzed.log.severe == [], _repro(fuzzed, fuzzed.log.severe)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_legitimate_call_completes_after_the_fuzz(fuzzed: Fuzzed, transport: str) -> None:
    call = fuzzed.calls_after[transport]
    assert call.ok, call.to_dict()


def test_router_raised_no_python_error(fuzzed: Fuzzed) -> None:
    assert fuzzed.log.python_errors == [], _repro(fuzzed, fuzzed.log.python_errors)


# --------------------------------------------------------------------------- the generator (no stack)


def _target(transport: str = "udp") -> Target:
    return Target(HOST, 5060, transport, 40000, 40000)


def test_generator_is_deterministic_per_seed_and_index() -> None:
    a, b = SipFuzzer(7, _target()), SipFuzzer(7, _target())
    assert [a.message(i).data for i in range(300)] == [b.message(i).data for i in reversed(range(300))][::-1]
    assert SipFuzzer(8, _target()).message(5).data != a.message(5).data
    assert locate(a.call_id(42)) == [(7, "udp", 42)]


def test_generator_stays_on_loopback_and_in_a_datagram() -> None:
    fuzzer = SipFuzzer(3, _target(), Credentials("fuzz", "pw"), 'Digest realm="127.0.0.1", nonce="n"')
    foreign_ip = re.compile(rb"(?<![\d.])(?!127\.)(?!0\.0\.0\.0)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\d.])")
    for i in range(3000):
        gen = fuzzer.message(i)
        assert len(gen.data) <= 65_507
        if gen.kind != "raw":
            assert not foreign_ip.search(gen.data), (i, gen.data[:500])
        assert b"CRITICAL" not in gen.data and b"BUG:" not in gen.data  # never fakes the log check


@pytest.mark.parametrize("host", ["192.0.2.1", "10.0.0.1", "8.8.8.8", "::ffff:192.0.2.1"])
def test_fuzzer_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(host)
    with pytest.raises(ValueError, match="loopback"):
        run(host, 5060, "udp", 1, 1, 0, time.monotonic() + 1)


def test_fuzzer_accepts_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        require_loopback(host)
