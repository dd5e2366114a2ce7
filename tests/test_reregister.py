"""Re-registration pushes (RFC 8599 +sip.pnsreg, `pushlib.reregister`).

- The due set on a real redis-server: only due devices are claimed, each by exactly one of several
  concurrent claimers (the claim is the ZREM), and a claimed device is not claimed again.
- End to end on real Kamailio + Redis + the sandbox, with short registrations (MIN_EXPIRES 4,
  Expires 6, REREGISTER_PUSH_BEFORE 3): a device that re-REGISTERs when the sandbox receives its
  background push stays registered across three expiry periods; one that does not answer gets one
  push, then its binding and record expire and it is never pushed again. The REGISTER 2xx carries
  `+sip.pnsreg="3"` only when the Contact asked for it.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from pushlib import reregister
from pushlib.redisconn import async_client, sync_client
from tests.support import (
    DOMAIN,
    Stack,
    fcm_token,
    payload_data,
    push_stack,
    redis_server,
    register,
    rfc8599_fcm_contact,
    stored_device,
)

EXPIRES = 6
BEFORE = 3
REFRESH = "registrationRefresh"


# --------------------------------------------------------------------------- the due set


def test_claims_are_exclusive_and_only_due_devices_are_claimed() -> None:
    with redis_server() as srv:
        client = sync_client(srv.url)
        try:
            now = time.time()
            for i in range(1000):
                reregister.schedule(client, f"sip:u{i}@{DOMAIN}", "dev", now - 1)
            reregister.schedule(client, f"sip:later@{DOMAIN}", "dev", now + 60)
            reregister.schedule(client, f"sip:gone@{DOMAIN}", "dev", now - 1)
            reregister.unschedule(client, f"sip:gone@{DOMAIN}", ["dev"])

            async def claim_all() -> list[list[tuple[str, str, float]]]:
                clients = [async_client(srv.url) for _ in range(4)]
                try:
                    claimers = [reregister.Claimer(c) for c in clients]

                    async def drain(c: reregister.Claimer) -> list[tuple[str, str, float]]:
                        got: list[tuple[str, str, float]] = []
                        while batch := await c.claim(time.time(), limit=50):
                            got += batch
                            await asyncio.sleep(0)
                        return got

                    return list(await asyncio.gather(*(drain(c) for c in claimers)))
                finally:
                    for c in clients:
                        await c.aclose()

            results = asyncio.run(claim_all())
            claimed = [aor for got in results for aor, _, _ in got]
            assert len(claimed) == len(set(claimed)) == 1000  # each due device once, by one claimer
            assert sum(1 for got in results if got) > 1  # (the claimers did run concurrently)
            assert f"sip:later@{DOMAIN}" not in claimed and f"sip:gone@{DOMAIN}" not in claimed
            assert client.zcard(reregister.DUE_KEY) == 1  # only the not-yet-due one is left
        finally:
            client.close()


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    defines = {"MIN_EXPIRES": "4", "REREGISTER_PUSH_BEFORE": str(BEFORE)}
    with push_stack(auth=True, extra_defines=defines) as s:
        yield s


def _ul_lookup(stack: Stack, user: str) -> subprocess.CompletedProcess[str]:
    sock = stack.kamailio.rundir / "kamailio_ctl"  # ctl's default socket, in the runtime dir (-Y)
    return subprocess.run(["kamcmd", "-s", f"unixs:{sock}", "ul.lookup", "location", f"{user}@{DOMAIN}"],
                          capture_output=True, text=True, timeout=10, check=False)


def test_answering_device_stays_registered_and_silent_one_is_dropped(stack: Stack) -> None:
    ans_user, ans_tok = "r" + uuid.uuid4().hex[:10], fcm_token()
    mute_user, mute_tok = "r" + uuid.uuid4().hex[:10], fcm_token()
    instance = str(uuid.uuid4())
    # the answering app says it can also refresh by itself (+sip.pnsreg): told the lead in the 2xx
    ans_contact = rfc8599_fcm_contact(5970, ans_tok, "udp", instance=instance) + ";+sip.pnsreg"
    mute_contact = rfc8599_fcm_contact(5971, mute_tok, "udp")
    r = register(stack, ans_user, ans_contact, "udp", expires=EXPIRES)
    assert r.status == 200 and r.header("Feature-Caps") == [f'*;+sip.pns="fcm";+sip.pnsreg="{BEFORE}"']
    r = register(stack, mute_user, mute_contact, "udp", expires=EXPIRES)
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="fcm"']  # the push is the mechanism
    started = time.monotonic()
    registers = 1
    answered = 0
    # three expiry periods: every refresh push is answered with a REGISTER, as a woken app does
    while time.monotonic() - started < 3 * EXPIRES + 1:
        got = stack.pushes(ans_tok)
        if len(got) > answered:
            answered = len(got)
            assert register(stack, ans_user, ans_contact, "udp", expires=EXPIRES).status == 200
            registers += 1
        time.sleep(0.1)
    refreshes = stack.pushes(ans_tok)
    assert len(refreshes) >= 3, refreshes  # pushed once per registration, before each expiry
    assert len(refreshes) <= registers  # never twice for one binding
    for p in refreshes:
        data = payload_data(p)
        assert data["type"] == REFRESH and data["aor"] == f"sip:{ans_user}@{DOMAIN}"
        assert p["priority"] == "normal" and "notification" not in p["payload"]  # data-only, normal priority
    times = [float(p["time"]) for p in refreshes]
    assert min(b - a for a, b in itertools.pairwise(times)) > 1.5  # one per period, not a loop
    device = stored_device(stack.store, f"sip:{ans_user}@{DOMAIN}", stack.store.devices(
        f"sip:{ans_user}@{DOMAIN}")[0].device_id)
    assert device is not None and device.expires_at > time.time()
    lookup = _ul_lookup(stack, ans_user)
    assert lookup.returncode == 0 and "pn-prid=" + ans_tok in lookup.stdout, lookup.stdout + lookup.stderr
    # the silent device: one push, then its binding and its record expired, and no push since
    mute = stack.pushes(mute_tok)
    assert [payload_data(p)["type"] for p in mute] == [REFRESH]
    assert stack.store.devices(f"sip:{mute_user}@{DOMAIN}") == []
    lookup = _ul_lookup(stack, mute_user)
    assert "pn-prid=" + mute_tok not in lookup.stdout
    assert not [m for m in stack.store.client.zrange(reregister.DUE_KEY, 0, -1) if mute_user in m]
