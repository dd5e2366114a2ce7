"""Integration: a real SIP client, not a simulation, through the whole push flow.

The client is `linphone-daemon` from Debian 12's `linphone-cli` package (liblinphone 5.1), run
headless: its own SIP stack (belle-sip) over TCP to 127.0.0.1, digest auth, auto-answer, no audio
device (PulseAudio and ALSA see nothing: the call runs with no card, media is not checked). Its
account puts the RFC 8599 params on its Contact URI (`contact_uri_parameters`) and pins its
`+sip.instance` (`[misc] uuid`), as an installed app keeps it.

The phone sleeps the way an iOS VoIP app does: its process is killed with SIGKILL, so it neither
un-REGISTERs nor answers, and the kernel drops its TCP connection; its last REGISTER is then
back-dated past the awake window (`asleep`, as the other tests do), so the proxy must push. The
push "wakes" it: the same client starts again from the same config and home dir, re-REGISTERs with
the same push params and instance, gets the parked INVITE and answers it; the caller (SIPp) hangs up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from pushlib.models import Device, Provider
from tests.support import (
    BUNDLE,
    DOMAIN,
    TEAM,
    Stack,
    apns_token,
    asleep,
    push_kind,
    push_stack,
    sipp_caller,
    stop_process,
    wait_log,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
USER_AGENT = "linphone-daemon"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with push_stack(auth=True, wait_window=WAIT, awake_window=10) as s:
        yield s


@dataclass
class LinphonePhone:
    """One `linphone-daemon` phone: its home dir (config, databases, logs) and, while it runs, its
    process (own session, stopped by PID). Each start logs to `linphone-<n>.log` in `home`."""

    home: Path
    proxy_port: int
    user: str
    password: str
    token: str
    instance: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config(self) -> Path:
        return self.home / "linphonerc"

    @property
    def device_id(self) -> str:
        return f"urn:uuid:{self.instance}"

    def write_config(self) -> None:
        """The linphonerc of an iPhone-like VoIP app of the stack's APNs app. Port -1: random,
        0: transport off; RTP ports random so that parallel runs never collide."""
        push = f"pn-provider=apns;pn-param={TEAM}.{BUNDLE}.voip;pn-prid={self.token}"
        self.config.write_text(
            "[sip]\n"
            "sip_port=0\nsip_tcp_port=-1\nsip_tls_port=0\n"
            "bind_address=127.0.0.1\nuse_ipv6=0\n"
            f"user_agent={USER_AGENT}\n"
            "default_proxy=0\n"
            "[rtp]\n"
            "audio_rtp_port=-1\nvideo_rtp_port=-1\ntext_rtp_port=-1\n"
            "[video]\n"
            "capture=0\ndisplay=0\n"
            "[proxy_0]\n"
            f"reg_proxy=<sip:{DOMAIN}:{self.proxy_port};transport=tcp>\n"
            f"reg_identity=<sip:{self.user}@{DOMAIN}>\n"
            "reg_expires=300\nreg_sendregister=1\n"
            "push_notification_allowed=0\n"
            f"contact_uri_parameters={push}\n"
            "[auth_info_0]\n"
            f"username={self.user}\npasswd={self.password}\nrealm={DOMAIN}\ndomain={DOMAIN}\n"
            "[misc]\n"
            f"uuid={self.instance}\n"
        )

    def start(self) -> None:
        self.starts += 1
        # liblinphone 5.1 keeps its databases here and, when it cannot open them, never opens its
        # SIP sockets (the REGISTER then fails with "No listening point")
        (self.home / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)
        (self.home / "no-alsa.conf").touch()
        env = {
            **os.environ,
            "HOME": str(self.home),
            # null audio: no PulseAudio server (and no autospawn), no ALSA device
            "PULSE_SERVER": f"unix:{self.home / 'no-pulse'}",
            "ALSA_CONFIG_PATH": str(self.home / "no-alsa.conf"),
        }
        argv = ["linphone-daemon", "--config", str(self.config), "--auto-answer",
                "--log", str(self.home / f"linphone-{self.starts}.log")]
        with open(self.home / f"stdout-{self.starts}.txt", "wb") as out:
            # stdin stays an open pipe: the daemon reads commands from it and ends on "quit"
            self.proc = subprocess.Popen(argv, cwd=self.home, env=env, stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """The app is suspended/killed by the OS: SIGKILL, no un-REGISTER, connection dropped."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._close_stdin(proc)

    def stop(self) -> None:
        """Quit cleanly (the daemon un-REGISTERs), else stop it by PID."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None and proc.stdin is not None:
            with suppress(OSError):
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        stop_process(proc, timeout=2)  # by PID when "quit" did not end it (at once when it did)
        self._close_stdin(proc)

    @staticmethod
    def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
        if proc.stdin is not None:
            with suppress(OSError):
                proc.stdin.close()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.home.glob("linphone-*.log")))

    def log_tail(self, chars: int = 4000) -> str:
        return "\n--- linphone log tail ---\n" + self.log()[-chars:]

    def wait_log(self, needle: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.log():
                return True
            time.sleep(0.05)
        return False


@pytest.fixture()
def phone(stack: Stack, tmp: Path) -> Iterator[LinphonePhone]:
    """A configured, not yet started phone for a new subscriber; stopped by PID and its home dir
    removed afterwards (its log tail is printed: pytest shows it when the test failed)."""
    user = "lp" + uuid.uuid4().hex[:10]
    home = Path(tempfile.mkdtemp(prefix="linphone-", dir=tmp))
    p = LinphonePhone(home, stack.kamailio.port, user, stack.add_user(user), apns_token(), str(uuid.uuid4()))
    p.write_config()
    try:
        yield p
    finally:
        p.stop()
        print(p.log_tail(8000))
        shutil.rmtree(home, ignore_errors=True)


def _wait_device(stack: Stack, aor: str, device_id: str, timeout: float = 10.0) -> Device | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in stack.store.devices(aor):
            if d.device_id == device_id:
                return d
        time.sleep(0.05)
    return None


def test_linphone_sleeps_is_pushed_wakes_and_answers(stack: Stack, tmp: Path, phone: LinphonePhone) -> None:
    aor = f"sip:{phone.user}@{DOMAIN}"

    # the app registers with RFC 8599 params (digest auth, TCP)
    phone.start()
    device = _wait_device(stack, aor, phone.device_id)
    assert device is not None, "linphone did not register" + phone.log_tail()
    assert device.params.provider is Provider.APNS and device.params.voip_token == phone.token
    assert (device.params.team_id, device.params.app_id) == (TEAM, BUNDLE)
    assert f"pn-prid={phone.token}" in device.contact and "transport=tcp" in device.contact

    # it goes to sleep: killed (no un-REGISTER, TCP connection gone), its last REGISTER long ago
    phone.kill()
    asleep(stack, phone.user)

    caller = sipp_caller(tmp, stack.kamailio.port, phone.user, "tcp", args=["-d", "500"])
    pushes = stack.wait_pushes(phone.token, 1)
    assert len(pushes) == 1, "no push reached the sandbox\n" + stack.kamailio.log()[-3000:]
    push = pushes[0]
    assert push["provider"] == "apns" and push["push_type"] == "voip"
    assert push["topic"] == f"{BUNDLE}.voip" and push_kind(push) == "incomingCall"
    park = wait_log(stack.kamailio, f"pusher: park aor={aor} ")
    assert f"pushed={phone.device_id}" in park and "ring=0" in park.split(), park

    # the push wakes the app: the same client starts again and re-REGISTERs with the same params
    phone.start()
    assert caller.wait(WAIT + 10) == 0, caller.logs()[-2000:] + caller.messages()[-3000:] + phone.log_tail()
    assert caller.final_codes() == [200]
    wait_log(stack.kamailio, f"pusher: wake aor={aor} device={phone.device_id} ")
    # the real client answered (its 200 OK) and the caller's BYE ended the call on its side too
    assert f"User-Agent: {USER_AGENT}" in caller.messages()
    assert phone.wait_log("to LinphoneCallEnd"), "the call did not end in linphone" + phone.log_tail()
    assert len(stack.pushes(phone.token)) == 1  # no cancel push: the pushed device itself answered
