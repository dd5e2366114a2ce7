"""A private MariaDB server for the role-mode tests against Debian's stock kamailio.cfg
(tests/test_role_stock.py): its own data dir (mariadb-install-db), a unix socket in that dir and
a free loopback TCP port, stopped by PID and removed on exit. Kamailio's tables are created the
way the stock config's header says, with Kamailio's own tools (`kamdbctl create`, `kamctl add`),
pointed at this server through their environment variables instead of /etc/kamailio/kamctlrc."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.localrun import free_port, stop_process, wait_for_port

ROOT_PASSWORD = "pn-test-root"
# the stock config's DBURL credentials (kamdbctl's defaults)
RW_USER, RW_PASSWORD = "kamailio", "kamailiorw"
DB_NAME = "kamailio"


@dataclass
class MariaDb:
    port: int
    datadir: Path
    socket: Path
    proc: subprocess.Popen[bytes]

    @property
    def kamailio_url(self) -> str:
        """The stock config's DBURL for this server."""
        return f"mysql://{RW_USER}:{RW_PASSWORD}@127.0.0.1:{self.port}/{DB_NAME}"

    def env(self) -> dict[str, str]:
        """kamctl / kamdbctl settings for this server (what /etc/kamailio/kamctlrc would hold)."""
        return {
            **os.environ, "DBENGINE": "MYSQL", "DBHOST": "127.0.0.1", "DBPORT": str(self.port),
            "DBNAME": DB_NAME, "DBRWUSER": RW_USER, "DBRWPW": RW_PASSWORD,
            "DBROOTUSER": "root", "DBROOTPW": ROOT_PASSWORD, "CHARSET": "latin1",
            "INSTALL_EXTRA_TABLES": "no", "INSTALL_PRESENCE_TABLES": "no", "INSTALL_DBUID_TABLES": "no",
        }

    def tool(self, *argv: str, domain: str = "") -> str:
        """Run kamctl or kamdbctl against this server; returns stdout, raises on failure."""
        env = self.env()
        if domain:
            env["SIP_DOMAIN"] = domain
        done = subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, check=False)
        # (kamctl exits 0 on some errors: its message is the verdict)
        if done.returncode != 0 or "ERROR" in done.stdout + done.stderr:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done.stdout

    def sql(self, query: str, database: str = DB_NAME) -> list[list[str]]:
        """Rows of `query` (run as root over the socket), as strings (NULL as "NULL")."""
        done = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.socket), "-uroot", f"-p{ROOT_PASSWORD}", "-N", "-B",
             "-e", query, database],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return [line.split("\t") for line in done.stdout.splitlines()]


@contextmanager
def mariadb_server() -> Iterator[MariaDb]:
    """A started MariaDB with a root password and no Kamailio tables yet."""
    datadir = Path(tempfile.mkdtemp(prefix="pn-mariadb-"))
    user = getpass.getuser()  # mariadbd runs as whoever runs the tests (root in CI)
    try:
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--user={user}", f"--datadir={datadir / 'data'}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, timeout=120, check=True,
        )
        port, sock = free_port(), datadir / "mysqld.sock"
        proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--user={user}", f"--datadir={datadir / 'data'}", f"--socket={sock}",
             f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={datadir / 'mysqld.pid'}",
             f"--log-error={datadir / 'error.log'}", "--innodb-buffer-pool-size=16M", "--skip-log-bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        db = MariaDb(port, datadir, sock, proc)
        try:
            wait_for_port(port, timeout=30)
            end = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < end:
                time.sleep(0.05)
            subprocess.run(["mariadb", "--no-defaults", "-S", str(sock), "-uroot", "-e",
                            f"ALTER USER root@localhost IDENTIFIED BY '{ROOT_PASSWORD}'"],
                           capture_output=True, timeout=30, check=True)
            yield db
        finally:
            stop_process(proc, timeout=30)
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
