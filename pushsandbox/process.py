"""`sandbox_process()`: the sandbox as a subprocess for tests and the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.localrun import stop_process
from pushsandbox.certs import CA_FILE
from pushsandbox.control import SandboxControl

READY_PREFIX = "sandbox: listening on "
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SandboxHandle:
    url: str
    port: int
    ca_pem: str
    control: SandboxControl
    proc: subprocess.Popen[bytes]
    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    @property
    def host(self) -> str:
        """"127.0.0.1:<port>", the form AppCredentials.custom_host takes."""
        return self.control.host

    def restart(self, log_level: str = "WARNING", timeout: float = 20.0) -> None:
        """Stop the sandbox by PID and start it again on the same port and directory (same CA and
        server certificate). Registrations, recorded pushes and issued OAuth tokens are gone: like
        a provider that restarted, the caller registers its credentials again."""
        stop_process(self.proc)
        self.proc = _spawn(self.port, self.directory, log_level)
        _wait_ready(self.proc, self.directory / "sandbox.log", timeout)


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].split()[0]
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox exited with {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"sandbox not ready after {timeout}s")


@contextmanager
def sandbox_process(port: int | None = None, log_level: str = "WARNING",
                    timeout: float = 20.0) -> Iterator[SandboxHandle]:
    """Run the sandbox on 127.0.0.1 (`port` None: any free port, no race) in a temp dir;
    stop it by PID and remove the dir afterwards, even on failure."""
    directory = Path(tempfile.mkdtemp(prefix="pushlib-sandbox-"))
    proc: subprocess.Popen[bytes] | None = None
    control: SandboxControl | None = None
    handle: SandboxHandle | None = None
    try:
        proc = _spawn(port or 0, directory, log_level)
        url = _wait_ready(proc, directory / "sandbox.log", timeout)
        ca_pem = (directory / CA_FILE).read_text()
        control = SandboxControl(url, ca_pem)
        handle = SandboxHandle(url, int(url.rsplit(":", 1)[1]), ca_pem, control, proc, directory)
        yield handle
    finally:
        if control is not None:
            control.close()
        if handle is not None:
            proc = handle.proc  # (restarted: another PID)
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)


def _spawn(port: int, directory: Path, log_level: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    with (directory / "sandbox.log").open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "pushsandbox", "--host", "127.0.0.1", "--port", str(port),
             "--dir", str(directory), "--log-level", log_level],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
