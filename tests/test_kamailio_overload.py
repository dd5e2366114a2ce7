"""Overload: new calls above MAX_CPS get 503 with Retry-After at once (pipelimit), calls below it
are served, the proxy stays healthy. Real Kamailio (KEMI mode, and role mode in the native test
host), redis-server and the sandbox."""

from __future__ import annotations

import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from harness.sipua import SipPhone, open_sip_socket
from tests.support import DOMAIN, KAMAILIO_CFG, NATIVE_HOST_CFG, Stack, push_stack

MAX_CPS = 20
SOURCE = "127.0.0.5"


@pytest.fixture(scope="module", params=["kemi", "role"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    defines: dict[str, str | None] = {"MAX_CPS": str(MAX_CPS), "PIKE_DENSITY": "0"}
    cfg = NATIVE_HOST_CFG if request.param == "role" else KAMAILIO_CFG
    with push_stack(extra_defines=defines, cfg=cfg) as s:
        yield s


def _invite(phone: SipPhone, user: str) -> str:
    """An initial INVITE from a foreign caller (no digest needed) to `user`."""
    return "\r\n".join([
        f"INVITE sip:{user}@{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/UDP {SOURCE}:{phone.local_port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        f"From: <sip:caller@pstn.example>;tag={secrets.token_hex(4)}",
        f"To: <sip:{user}@{DOMAIN}>",
        f"Call-ID: {uuid.uuid4().hex}",
        "CSeq: 1 INVITE",
        "Max-Forwards: 70",
        "Content-Length: 0",
        "", "",
    ])


def test_new_calls_above_max_cps_are_shed_with_503_and_retry_after(stack: Stack) -> None:
    proxy = ("127.0.0.1", stack.kamailio.port)
    with SipPhone(open_sip_socket(proxy, "udp", SOURCE), "udp", proxy) as caller:
        # sent within a fraction of a second: three times what the node takes per second
        for _ in range(3 * MAX_CPS):
            caller.send(_invite(caller, "nobody" + uuid.uuid4().hex[:6]))
        answers = [caller.response(5) for _ in range(3 * MAX_CPS)]
        codes = Counter(r.status for r in answers)
        # (the calls taken are for nobody: 404 from the router, or whatever the role host answers)
        [served] = set(codes) - {503}
        assert codes[503] >= MAX_CPS and codes[served] >= 1, codes
        shed = next(r for r in answers if r.status == 503)
        assert shed.reason == "Overloaded" and shed.header("Retry-After") == ["5"]
        time.sleep(2.2)  # a new second: the node takes calls again
        caller.send(_invite(caller, "nobody"))
        assert caller.response(5).status == served
    log = stack.kamailio.log()
    assert "pusher: overload-shed" in log
    # at most one line per second and worker, not one per shed call
    assert log.count("pusher: overload-shed") <= 12
    assert "CRITICAL" not in log and " BUG" not in log
