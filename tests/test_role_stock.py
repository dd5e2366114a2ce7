"""Role mode inside Debian's STOCK /etc/kamailio/kamailio.cfg, set up as the README's recipe says:
a copy of the stock file patched by kamailio/stock-host/kamailio.cfg.patch, the example
kamailio/stock-host/kamailio-local.cfg next to it (WITH_NAT, WITH_AUTH + WITH_USRLOCDB +
WITH_ACCDB on MySQL, the PUSHER_HOST_* chaining defines), pusher-role.cfg next to it, and a
private MariaDB whose tables and subscribers are made with Kamailio's own kamdbctl / kamctl.

One MariaDB, Redis, sandbox and Kamailio serve the whole module."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mariadb import MariaDb, mariadb_server
from harness.sipua import SipPhone, open_sip_socket
from pushlib import calls
from tests.support import (
    DOMAIN,
    ROOT,
    SipClient,
    SippRun,
    SipResponse,
    Stack,
    apns_token,
    asleep,
    check_config,
    fcm_token,
    free_port,
    push_kind,
    push_stack,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    wait_log,
)

STOCK_CFG = Path("/etc/kamailio/kamailio.cfg")  # what Debian's kamailio package installs
STOCK_HOST = ROOT / "kamailio" / "stock-host"
WAIT = 3.0
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def stock_host(directory: Path) -> Path:
    """Debian's stock kamailio.cfg set up in `directory` by the README's recipe; returns its path.
    The only addition of the test: listen lines on this run's port (SIP_PORT, given with -A)."""
    cfg = directory / "kamailio.cfg"
    shutil.copyfile(STOCK_CFG, cfg)
    subprocess.run(["patch", "--quiet", "--no-backup-if-mismatch", str(cfg), str(STOCK_HOST / "kamailio.cfg.patch")],
                   check=True, capture_output=True, timeout=30)
    (directory / "kamailio-local.cfg").write_text(
        "listen=udp:127.0.0.1:SIP_PORT\nlisten=tcp:127.0.0.1:SIP_PORT\n"
        + (STOCK_HOST / "kamailio-local.cfg").read_text()
    )
    (directory / "pusher-role.cfg").symlink_to(ROOT / "kamailio" / "pusher-role.cfg")
    return cfg


def acc_columns() -> str:
    """The ALTER TABLE statements WITH_ACCDB needs, as the stock file's own header lists them."""
    m = re.search(r"#!ifdef ACCDB_COMMENT\n(.*?)#!endif", STOCK_CFG.read_text(), re.S)
    assert m, "the stock kamailio.cfg no longer lists the acc columns"
    return m.group(1)


@pytest.fixture(scope="module")
def db() -> Iterator[MariaDb]:
    with mariadb_server() as server:
        server.tool("kamdbctl", "create")
        server.sql(acc_columns())
        yield server


@pytest.fixture(scope="module")
def stack(db: MariaDb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stock_host(tmp_path_factory.mktemp("stock-host"))
    # WITH_VOICEMAIL: inactive until a test sets voicemail.srv_ip (stock: empty, no voicemail)
    with push_stack(auth=True, wait_window=WAIT, awake_window=10, cfg=cfg,
                    extra_defines={"DBURL": f'"{db.kamailio_url}"', "WITH_VOICEMAIL": None}) as s:
        yield s


def kamcmd(stack: Stack, *command: str) -> str:
    """An RPC command to the stack's Kamailio (the stock config's ctl socket, in its run dir)."""
    done = subprocess.run(["kamcmd", "-s", f"unixs:{stack.kamailio.rundir / 'kamailio_ctl'}", *command],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def subscriber(db: MariaDb) -> tuple[str, str]:
    """A new subscriber of the host's database (kamctl add): (user, password)."""
    user, password = "s" + uuid.uuid4().hex[:10], secrets.token_hex(6)
    db.tool("kamctl", "add", user, password, domain=DOMAIN)
    return user, password


def host_register(stack: Stack, phone: SipPhone, user: str, password: str, contact: str) -> SipResponse:
    """A REGISTER as a phone configured with the proxy's address sends it: the request URI names
    the proxy's port (the stock config serves `uri==myself` only, and a URI without a port means 5060)."""
    return phone.register(user, contact, password=password, domain=f"{DOMAIN}:{stack.kamailio.port}")


def register(stack: Stack, user: str, password: str, contact: str, transport: str) -> SipResponse:
    with SipClient(stack.kamailio.port, transport) as c:
        return host_register(stack, c, user, password, contact)


def call_id(run: SippRun) -> str:
    m = re.search(r"(?im)^Call-ID:\s*(\S+)", run.messages())
    assert m, "no Call-ID in the SIPp trace"
    return m.group(1)


def acc_rows(db: MariaDb, table: str, cid: str, timeout: float = 5.0) -> list[tuple[str, str]]:
    """(method, sip_code) of the accounting rows of a call, once there are any (or after `timeout`)."""
    end = time.monotonic() + timeout
    while True:
        rows = [(r[0], r[1]) for r in db.sql(f"SELECT method, sip_code FROM {table} WHERE callid='{cid}' ORDER BY id")]
        if rows or time.monotonic() > end:
            return rows
        time.sleep(0.1)


# --------------------------------------------------------------------------- the recipe itself


def test_host_call_flags_are_parsed_strictly() -> None:
    assert calls.host_call_flags(None) == ()
    assert calls.host_call_flags("1,2") == (1, 2)
    assert calls.host_call_flags(" 1 2, 1 ") == (1, 2)
    for bad in ("FLT_ACC", "32", "-1", "1;2"):
        with pytest.raises(ValueError, match="PUSHER_HOST_CALL_FLAGS"):
            calls.host_call_flags(bad)


@pytest.mark.parametrize(
    ("dropped", "defines"),
    [
        ((), {}),  # the recipe as shipped: NAT, auth, location and accounting in MySQL
        # the stock defaults (no NAT, no database): the role needs neither nathelper nor a database
        (("WITH_MYSQL", "WITH_AUTH", "WITH_USRLOCDB", "WITH_ACCDB", "WITH_NAT"), {}),
        ((), {"WITH_VOICEMAIL": None, "WITH_ANTIFLOOD": None, "WITH_BLOCK3XX": None}),
    ],
    ids=["recipe", "stock-defaults", "voicemail-antiflood"],
)
def test_patched_stock_config_passes_check(tmp_path: Path, dropped: tuple[str, ...],
                                           defines: dict[str, str | None]) -> None:
    cfg = stock_host(tmp_path)
    local = tmp_path / "kamailio-local.cfg"  # (its #!trydef lines are what an operator edits)
    local.write_text("".join(line for line in local.read_text().splitlines(keepends=True)
                             if not any(line.startswith(f"#!trydef {name}") for name in dropped)))
    result = check_config(cfg, {"SIP_PORT": "5999", "KEMI_ROUTER": f'"{ROOT / "kemi" / "router.py"}"', **defines})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


# --------------------------------------------------------------------------- auth and location: the host's database


def test_host_database_authenticates_registers(stack: Stack, db: MariaDb) -> None:
    """WITH_AUTH: the subscriber table of the host's database (kamctl add), not pushlib-admin's."""
    user, password = subscriber(db)
    contact = rfc8599_apns_contact(free_port(), apns_token())
    assert register(stack, user, "", contact, "udp").status == 401
    assert register(stack, user, password + "x", contact, "udp").status == 401
    stack.add_user(user, "redis-password")  # the KEMI-mode subscriber store is not consulted here
    assert register(stack, user, "redis-password", contact, "udp").status == 401
    r = register(stack, user, password, contact, "udp")
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="apns"']


def test_bindings_are_saved_in_the_host_location_database(stack: Stack, db: MariaDb) -> None:
    """WITH_USRLOCDB: PUSHER_REGISTER saves through the host's usrloc, so the binding (with the
    NAT source the stock NATDETECT found, and its NAT branch flag) reaches the location table
    (db_mode 2 writes it back on its timer, or at shutdown: a restart here) and comes back from
    it at start; the push record is in Redis."""
    user, password = subscriber(db)
    tok, behind_nat = apns_token(), free_port()
    proxy = ("127.0.0.1", stack.kamailio.port)
    with SipPhone(open_sip_socket(proxy, "udp"), "udp", proxy, via_port=behind_nat) as phone:
        assert host_register(stack, phone, user, password, rfc8599_apns_contact(behind_nat, tok)).status == 200
        source = f"sip:127.0.0.1:{phone.local_port}"
    stack.kamailio.restart()
    rows = db.sql(f"SELECT contact, received, cflags FROM location WHERE username='{user}' AND domain='{DOMAIN}'")
    assert len(rows) == 1 and f"pn-prid={tok}" in rows[0][0], rows
    assert rows[0][1] == source
    assert int(rows[0][2]) & (1 << 6), "the stock FLB_NATB branch flag was not saved with the binding"
    assert f"pn-prid={tok}" in kamcmd(stack, "ul.lookup", "location", f"{user}@{DOMAIN}")
    assert [d.params.voip_token for d in stack.store.devices(f"sip:{user}@{DOMAIN}")] == [tok]


# --------------------------------------------------------------------------- calls


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_push_phone_is_woken_answers_and_is_accounted(stack: Stack, db: MariaDb, tmp: Path, transport: str) -> None:
    """Wake through the host's DB auth; the answered call owes no missed call (the role sees the 200
    in the stock reply_route) and gets the host's accounting record (PUSHER_HOST_CALL_FLAGS)."""
    user, password = subscriber(db)
    tok = apns_token()
    dev = sipp_device(tmp, transport)
    contact = rfc8599_apns_contact(dev.port, tok, transport, instance=str(uuid.uuid4()))
    assert register(stack, user, password, contact, transport).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1)] == ["incomingCall"]
    assert register(stack, user, password, contact, transport).status == 200
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert dev.wait(15) == 0 and dev.received("INVITE") == 1
    cid = call_id(caller)
    assert ("INVITE", "200") in acc_rows(db, "acc", cid)
    time.sleep(WAIT + 2)  # past the window: an answered call is not ended as a timeout
    assert [push_kind(p) for p in stack.pushes(tok)] == ["incomingCall"]
    assert acc_rows(db, "missed_calls", cid, timeout=0) == []
    assert "reply-not-seen" not in stack.kamailio.log()


def test_awake_phone_rings_in_parallel_with_the_push(stack: Stack, db: MariaDb, tmp: Path) -> None:
    user, password = subscriber(db)
    tok = fcm_token()
    desk = sipp_device(tmp, "udp")
    assert register(stack, user, password, rfc8599_fcm_contact(free_port(), tok), "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, password, f"<sip:desk@127.0.0.1:{desk.port}>", "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert desk.wait(15) == 0 and desk.received("INVITE") == 1
    kinds = [push_kind(p) for p in stack.wait_pushes(tok, 2)]
    assert kinds == ["incomingCall", "cancelIncomingCall"]
    assert ("INVITE", "200") in acc_rows(db, "acc", call_id(caller))


def test_unanswered_push_call_reaches_the_host_failure_route(stack: Stack, db: MariaDb, tmp: Path) -> None:
    """The window's end is the host's "no answer": MANAGE_FAILURE runs (route(PUSHER_FAILURE) did
    not stop it), tm answers the parking branch's 408, and the call is logged as missed."""
    user, password = subscriber(db)
    tok = fcm_token()
    assert register(stack, user, password, rfc8599_fcm_contact(free_port(), tok), "udp").status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [408], caller.logs()[-2000:]
    assert sorted(push_kind(p) for p in stack.wait_pushes(tok, 3)) == [
        "cancelIncomingCall", "incomingCall", "missedCall"]
    cid = call_id(caller)
    assert [code for _, code in acc_rows(db, "missed_calls", cid)] == ["408"]


def test_caller_cancel_sends_cancel_and_missed_pushes(stack: Stack, db: MariaDb, tmp: Path) -> None:
    user, password = subscriber(db)
    tok = fcm_token()
    assert register(stack, user, password, rfc8599_fcm_contact(free_port(), tok, "tcp"), "tcp").status == 200
    asleep(stack, user)
    canceller = sipp_caller(tmp, stack.kamailio.port, user, "tcp", scenario="caller-cancel.xml", args=["-d", "500"])
    assert canceller.wait(20) == 0, canceller.logs()[-2000:]
    assert sorted(push_kind(p) for p in stack.wait_pushes(tok, 3)) == [
        "cancelIncomingCall", "incomingCall", "missedCall"]
    assert [code for _, code in acc_rows(db, "missed_calls", call_id(canceller))] == ["487"]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_nated_push_phone_gets_ack_and_bye(stack: Stack, db: MariaDb, tmp: Path, transport: str) -> None:
    """WITH_NAT: the phone's Via and Contact name a port nothing listens on (its side of a NAT);
    only the host's NAT handling of the push call (fix_nated_register on the REGISTER, the
    branch flag saved by PUSHER_REGISTER, set_contact_alias in MANAGE_REPLY, handle_ruri_alias
    for the dialog) gets the caller's ACK and BYE to where the phone really is."""
    user, password = subscriber(db)
    tok, instance = apns_token(), str(uuid.uuid4())
    behind_nat = free_port()
    contact = rfc8599_apns_contact(behind_nat, tok, transport, instance)
    proxy = ("127.0.0.1", stack.kamailio.port)
    with SipPhone(open_sip_socket(proxy, transport), transport, proxy, via_port=behind_nat) as phone:
        assert host_register(stack, phone, user, password, contact).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport, args=["-d", "300"])
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1)] == ["incomingCall"]
    with SipPhone(open_sip_socket(proxy, transport), transport, proxy, via_port=behind_nat) as woken:
        assert host_register(stack, woken, user, password, contact).status == 200
        invite = woken.request("INVITE", timeout=10)
        woken.answer(invite, 200, "OK", "t1", SDP)
        woken.request("ACK", timeout=5)
        woken.answer(woken.request("BYE", timeout=10), 200, "OK")
    assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert [m for m, _ in acc_rows(db, "acc", call_id(caller))][:2] == ["INVITE", "BYE"]


def test_a_reply_route_that_never_runs_is_reported(db: MariaDb, tmp_path: Path) -> None:
    """The old advice: a separate `onreply_route { route(PUSHER_REPLY); }` next to the stock
    `reply_route` is the same route, appended after its `return;`: it never runs. The role then
    finds at the window's end that the call was answered without it: it says so in the log (once
    per call) and owes no missed-call push for it."""
    cfg = stock_host(tmp_path)
    text = cfg.read_text().replace("\troute(PUSHER_REPLY);\n", "", 1)
    cfg.write_text(text + "\nonreply_route {\n\troute(PUSHER_REPLY);\n}\n")
    with push_stack(auth=True, wait_window=WAIT, cfg=cfg, extra_defines={"DBURL": f'"{db.kamailio_url}"'}) as s:
        user, password = subscriber(db)
        tok = fcm_token()
        dev = sipp_device(tmp_path, "udp")
        contact = rfc8599_fcm_contact(dev.port, tok, instance=str(uuid.uuid4()))
        assert register(s, user, password, contact, "udp").status == 200
        asleep(s, user)
        caller = sipp_caller(tmp_path, s.kamailio.port, user, "udp")
        assert [push_kind(p) for p in s.wait_pushes(tok, 1)] == ["incomingCall"]
        assert register(s, user, password, contact, "udp").status == 200
        assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
        line = wait_log(s.kamailio, "pusher: reply-not-seen", timeout=WAIT + 5)
        assert "route(PUSHER_REPLY)" in line
        time.sleep(1)
        assert [push_kind(p) for p in s.pushes(tok)] == ["incomingCall"]


def test_unanswered_push_call_goes_to_the_host_voicemail(stack: Stack, db: MariaDb, tmp: Path) -> None:
    """Stock WITH_VOICEMAIL: the host's MANAGE_FAILURE sends a push call nobody answered to its
    voicemail server (its "no answer" 408), as it does for its own calls."""
    user, password = subscriber(db)
    tok = fcm_token()
    voicemail = sipp_device(tmp, "udp")
    assert register(stack, user, password, rfc8599_fcm_contact(free_port(), tok), "udp").status == 200
    asleep(stack, user)
    kamcmd(stack, "cfg.set_now_string", "voicemail", "srv_ip", "127.0.0.1")
    kamcmd(stack, "cfg.set_now_string", "voicemail", "srv_port", f"s:{voicemail.port}")  # (s: a string)
    try:
        caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
        assert caller.wait(WAIT + 15) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    finally:
        kamcmd(stack, "cfg.set_now_string", "voicemail", "srv_ip", "")
    assert voicemail.wait(15) == 0 and re.search(rf"(?m)^INVITE sip:{user}@127.0.0.1:{voicemail.port} ",
                                                 voicemail.messages())
    assert sorted(push_kind(p) for p in stack.wait_pushes(tok, 3)) == [
        "cancelIncomingCall", "incomingCall", "missedCall"]
