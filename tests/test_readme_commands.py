"""The README's commands run as written: Kamailio in KEMI and role mode, the standalone dispatcher,
the sandbox (server, credentials, pushes), the `pushlib-admin` block and the HTTP API's blocks
(`pushlib-api`, its `pushlib-admin` lines, the `curl` examples).

How:
- `readme_blocks()` reads README.md at test time and finds every code block (fenced, or indented by
  four spaces) whose first command (after `export NAME=value` lines) is `kamailio`, `pushlib-*`,
  `python -m push…`, `P=…pushlib-admin` or `curl`.
  A block of those programs that this module does not know how to run fails the test: a command added
  to the README gets run here too.
- Each block runs through `bash` exactly as the README shows it, with one documented change: the
  README's example values (`EXAMPLES`: SIP port 5060, sandbox port 8443, API port 8088, the Redis URL
  file /etc/pushproxy/redis-url, the Redis URL redis://10.0.0.5:6379/0 and Kamailio's runtime directory
  /var/lib/pushproxy) become the test's own (free ports, a private redis-server, a temp dir created
  as the README says). Every example value must occur, and no other text changes.
- Kamailio's processes must have the runtime directory as their working directory (where core
  files land), never the checkout.
- The environment is an operator's: the venv's `bin` first on PATH (as after `. .venv/bin/activate`)
  and PUSHLIB_REDIS_URL_FILE naming the private Redis (what the admin block's comment says it reads).
  Kamailio runs from the repository root, as the README says, with no $PWD inherited (bash sets it).
  The other commands run in a fresh temp dir, so their files (sandbox-pki/, the stand-in
  credentials) never land in the checkout.
- The sandbox's `# prints:` line must be what it prints; printed `pushlib-admin` lines are run too.
- The API's `pushlib-admin` block and its `curl` block run in one shell (the curl lines use the `$KEY`
  the admin block's `keys create` sets), against the README's `pushlib-api` command, a dispatcher and
  the sandbox (apps and alice's two phones stored as `make demo-api` stores them). Each curl line's
  `# ` comment is checked against what it printed and what the sandbox received (`...`: any value).
- Long-running commands start in their own session and are stopped by PID, within fixed timeouts;
  nothing of them may be left running, and the temp dirs are removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from harness.apistack import dispatcher_process, wait_healthy
from harness.localrun import group_members
from harness.sipua import BUNDLE, FCM_PROJECT, TEAM, apns_token, fcm_token
from pushlib.apns import ApnsClient
from pushlib.models import ApnsRequest, Device, Outcome, Provider, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle, sandbox_process
from tests.support import ROOT, RedisServer, free_port, redis_server, stop_process, wait_for_port

README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
TOKEN = "ef" * 32

# The README's example values. Each is replaced, wherever it stands alone, by the test's own value of
# the same name (see `Run.substitute`); nothing else in a command is changed.
EXAMPLES = {
    "sip_port": "5060",
    "sandbox_port": "8443",
    "api_port": "8088",
    "redis_url_file": "/etc/pushproxy/redis-url",
    "redis_url": "redis://10.0.0.5:6379/0",
    "run_dir": "/var/lib/pushproxy",
}

_PROGRAMS = ("kamailio", "pushlib-dispatcher", "pushlib-sandbox", "pushlib-admin", "pushlib-api", "python -m push",
             "P=", "curl")
_EXPORT = re.compile(r"^export [A-Za-z_][A-Za-z0-9_]*=\S*\s*(?:#.*)?$")
_ASSIGNMENTS = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")
KINDS = {
    "kamailio": re.compile(r"^kamailio -f kamailio/kamailio\.cfg\b"),
    "role": re.compile(r"^kamailio -f tests/native-host\.cfg\b"),
    "dispatcher": re.compile(r"^pushlib-dispatcher\b"),
    "sandbox": re.compile(r"^python -m pushsandbox\b"),
    "credentials": re.compile(r"^pushlib-sandbox credentials\b"),
    "pushes": re.compile(r"^pushlib-sandbox pushes\b"),
    "admin": re.compile(r"^P=pushlib-admin\b"),
    "api": re.compile(r"^pushlib-api\b"),
    "api-admin": re.compile(r"^pushlib-admin tenants create\b"),
    "api-curl": re.compile(r"^curl\b"),
}


@dataclass(frozen=True)
class Block:
    kind: str  # a KINDS key, or "unknown"
    text: str  # as the README shows it (an indented block without its indent)
    line: int  # where it starts in README.md


def _code_blocks(text: str) -> Iterator[tuple[int, str]]:
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield i + 2, "\n".join(lines[i + 1 : j])
            i = j + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            yield i + 1, "\n".join(line[4:] for line in lines[i:j]).strip("\n")
            i = j
        else:
            i += 1


def first_command(block: str) -> str:
    """The block's first command, continuation lines joined, leading VAR=value assignments dropped
    (`P=pushlib-admin` alone on its line stays: it is the command), `export NAME=value` lines skipped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not _EXPORT.match(line):
            command = _ASSIGNMENTS.sub("", line)
            return command if command and not command.startswith("#") else line
    return ""


def readme_blocks() -> list[Block]:
    blocks = []
    for line, text in _code_blocks(README.read_text()):
        command = first_command(text)
        if not command.startswith(_PROGRAMS):
            continue
        kind = next((k for k, pattern in KINDS.items() if pattern.match(command)), "unknown")
        blocks.append(Block(kind, text, line))
    return blocks


@dataclass
class Run:
    """The test's values for the README's examples, and how README text becomes what runs."""

    values: dict[str, str]
    env: dict[str, str]
    workdir: Path
    used: set[str]

    def substitute(self, text: str) -> str:
        for name, example in EXAMPLES.items():
            pattern = re.compile(rf"(?<![\w.]){re.escape(example)}(?![\w])")
            text, count = pattern.subn(self.values[name].replace("\\", "\\\\"), text)
            if count:
                self.used.add(name)
        return text


def blocks_of(kind: str) -> list[Block]:
    found = [b for b in readme_blocks() if b.kind == kind]
    assert found, f"README.md shows no {kind} command any more: update tests/test_readme_commands.py"
    return found


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture()
def run(redis: RedisServer) -> Iterator[Run]:
    client = redis_lib.Redis.from_url(redis.url)
    client.flushall()  # each test starts from an empty store
    client.close()
    with tempfile.TemporaryDirectory(prefix="pn-readme-") as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        url_file = Path(tmp) / "redis-url"
        url_file.write_text(redis.url + "\n")
        run_dir = Path(tmp) / "run"  # the README's runtime directory, created as it says
        run_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHLIB_") and k != "PWD"}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["PUSHLIB_REDIS_URL_FILE"] = str(url_file)
        values = {"sip_port": str(free_port()), "sandbox_port": str(free_port()), "api_port": str(free_port()),
                  "redis_url_file": str(url_file), "redis_url": redis.url, "run_dir": str(run_dir)}
        yield Run(values, env, workdir, set())


def shell(run: Run, block: Block, cwd: Path, stdin: str = "", timeout: float = 60) -> str:
    """Run a block to its end with `bash -e` (any failing line fails it); its stdout."""
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", run.substitute(block.text)], cwd=cwd, env=run.env,
                          input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"README.md:{block.line} failed ({done.returncode}):\n{block.text}\n{done.stderr}"
    return done.stdout


@dataclass
class Background:
    proc: subprocess.Popen[bytes]
    log: Path
    block: Block

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first output line holding `needle`; fails when the command exits or time runs out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.output().splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"README.md:{self.block.line}: no {needle!r} in {timeout}s "
                    f"(exit {self.proc.poll()}):\n{self.block.text}\n{self.output()[-3000:]}")


@contextmanager
def background(run: Run, block: Block, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Background]:
    """A long-running block in its own session (`env`: instead of the operator's); stopped by PID (its
    process group), nothing left."""
    log = run.workdir.parent / f"{block.kind}-{block.line}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", run.substitute(block.text)], cwd=cwd,
                                env=run.env if env is None else env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Background(proc, log, block)
    finally:
        stop_process(proc, timeout=15)
        end = time.monotonic() + 5
        while group_members({proc.pid}) and time.monotonic() < end:
            time.sleep(0.05)
        assert not group_members({proc.pid}), f"README.md:{block.line} left processes running"


def sip_options(port: int) -> str:
    """The first line of the answer to an OPTIONS sent over UDP to 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        local = s.getsockname()[1]
        branch, tag = "z9hG4bK" + uuid.uuid4().hex[:12], uuid.uuid4().hex[:8]
        s.sendto((
            f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};rport;branch={branch}\r\n"
            f"From: <sip:readme@127.0.0.1>;tag={tag}\r\nTo: <sip:127.0.0.1:{port}>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode(), ("127.0.0.1", port))
        return s.recv(65535).decode(errors="replace").split("\r\n", 1)[0]


def wait_group(redis_url: str, *, job_consumed: bool, timeout: float = 30) -> None:
    """Until the dispatchers' consumer group exists (a dispatcher is up) and, with `job_consumed`,
    has read a job and none is left in the stream (acked jobs are deleted: README, "At-least-once")."""
    settings = Settings.from_env()
    client = redis_lib.Redis.from_url(redis_url)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                groups = {g["name"].decode(): g for g in client.xinfo_groups(settings.stream)}
            except redis_lib.ResponseError:  # no stream yet
                groups = {}
            group = groups.get(settings.group)
            if group and (not job_consumed or (
                    (group.get("entries-read") or 0) >= 1 and client.xlen(settings.stream) == 0)):
                return
            time.sleep(0.1)
    finally:
        client.close()
    pytest.fail(f"dispatcher group not {'done with a job' if job_consumed else 'created'} in {timeout}s")


# --------------------------------------------------------------------------- the tests


def test_readme_commands_are_all_known(run: Run) -> None:
    blocks = readme_blocks()
    unknown = [f"README.md:{b.line}: {first_command(b.text)}" for b in blocks if b.kind == "unknown"]
    assert not unknown, "README commands this test does not run:\n" + "\n".join(unknown)
    assert {b.kind for b in blocks} == set(KINDS)
    for block in blocks:
        run.substitute(block.text)
    assert run.used == set(EXAMPLES), f"example values the README no longer shows: {set(EXAMPLES) - run.used}"


def kamailio_dirs(pgid: int) -> set[str]:
    """The working directories of the Kamailio processes in process group `pgid` (core files land there)."""
    dirs = set()
    for pid in group_members({pgid}):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "kamailio":
                dirs.add(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue  # gone meanwhile
    return dirs


@pytest.mark.timeout(120)
def test_kemi_mode_command_runs_from_the_repository_root(run: Run) -> None:
    [block] = blocks_of("kamailio")
    with background(run, block, ROOT) as kamailio:
        kamailio.wait_for("pusher: ready", timeout=30)
        assert sip_options(int(run.values["sip_port"])).startswith("SIP/2.0 ")
        # Cores and runtime files go to the README's runtime directory, never into the checkout.
        assert kamailio_dirs(kamailio.proc.pid) == {run.values["run_dir"]}
    assert run.used >= {"sip_port", "redis_url_file", "run_dir"}


@pytest.mark.timeout(120)
def test_role_mode_command_runs_from_the_repository_root(run: Run) -> None:
    [block] = blocks_of("role")
    with background(run, block, ROOT) as kamailio:
        kamailio.wait_for("pusher: ready", timeout=30)
        assert sip_options(int(run.values["sip_port"])).startswith("SIP/2.0 ")
        assert kamailio_dirs(kamailio.proc.pid) == {run.values["run_dir"]}
    assert run.used >= {"sip_port", "redis_url_file", "run_dir"}


@pytest.mark.timeout(120)
def test_kemi_mode_with_an_absolute_router_path_runs_from_anywhere(run: Run) -> None:
    """The README's other way: -A 'KEMI_ROUTER="/abs/path"' (here with the absolute cfg path too),
    from a directory that is not the checkout."""
    port = run.values["sip_port"]
    text = (f"kamailio -f {ROOT}/kamailio/kamailio.cfg -DD -E -A WITH_PUSHER -A SIP_PORT={port} "
            f"-A 'KEMI_ROUTER=\"{ROOT}/kemi/router.py\"'")
    with background(run, Block("kamailio", text, 0), run.workdir) as kamailio:
        kamailio.wait_for("pusher: ready", timeout=30)
        assert sip_options(int(port)).startswith("SIP/2.0 ")


@pytest.mark.timeout(180)
def test_dispatcher_sandbox_and_admin_commands(run: Run, redis: RedisServer) -> None:
    [sandbox_block] = blocks_of("sandbox")
    [dispatcher_block] = blocks_of("dispatcher")
    [admin_block] = blocks_of("admin")
    [pushes_block] = blocks_of("pushes")
    credentials_blocks = blocks_of("credentials")
    work = run.workdir
    with background(run, sandbox_block, work) as sandbox, background(run, dispatcher_block, work):
        ready = sandbox.wait_for("sandbox: listening on ", timeout=30)
        promised = re.search(r"^# prints: (.*)$", run.substitute(sandbox_block.text), re.M)
        assert promised and ready == promised.group(1), (ready, sandbox_block.text)
        wait_group(redis.url, job_consumed=False)

        # The credentials lines (the admin section's stand-ins, the sandbox section's example), then
        # the pushlib-admin lines each printed, then the admin block: all as written.
        printed = [shell(run, block, work) for block in credentials_blocks]
        for lines in printed:
            assert lines and all(line.startswith("pushlib-admin app set-") for line in lines.splitlines()), lines
        shell(run, admin_block, work, stdin="a-long-sip-password\n")
        wait_group(redis.url, job_consumed=True)  # the block's `push` job, taken by the README's dispatcher
        for lines in printed:
            shell(run, Block("printed", lines, 0), work)

        # The apps now point at the sandbox; one push through it, then the README's `pushes` line.
        store = SyncStore(redis.url, Settings.from_env())
        try:
            app = store.app("apns", "com.example.phone")
        finally:
            store.close()
        sandbox_host = f"127.0.0.1:{run.values['sandbox_port']}"
        assert app is not None and app.custom_host == sandbox_host

        async def push_once() -> Outcome:
            assert app is not None
            client = ApnsClient(app, sandbox_host)
            try:
                request = ApnsRequest(TOKEN, {"apns-topic": app.app_id, "apns-push-type": "alert"},
                                      json.dumps({"aps": {"alert": {"title": "README"}}}).encode())
                return (await client.send(request, 10)).outcome
            finally:
                await client.aclose()

        assert asyncio.run(push_once()) is Outcome.DELIVERED
        records = [json.loads(line) for line in shell(run, pushes_block, work).splitlines()]
        assert [(r["provider"], r["token"], r["environment"]) for r in records] == [("apns", TOKEN, None)]
    assert run.used >= {"sandbox_port", "redis_url"}


# --------------------------------------------------------------------------- the HTTP API's blocks


@dataclass
class Shown:
    """A command of a README block and the `# ` comment lines after it (without the `#`)."""

    command: str
    comment: list[str]

    def printed(self) -> str:
        """The output the comment shows: a long line is split over comment lines, continuations indented."""
        return "".join(line.strip() for line in self.comment)


def shown_commands(block: str) -> list[Shown]:
    found: list[Shown] = []
    for line in block.splitlines():
        if line.startswith("#"):
            found[-1].comment.append(line[1:])
        elif found and not found[-1].comment:  # a continuation of the command
            found[-1].command += "\n" + line
        else:
            found.append(Shown(line, []))
    return found


def described_pushes(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """`<provider> name=value ...` descriptions of pushes (a value plain or JSON, `...` any value; a name is
    a field of the sandbox's record or of its payload), each continued on indented comment lines."""
    texts: list[str] = []
    for line in lines:
        if line.startswith("   ") and texts:
            texts[-1] += " " + line.strip()
        elif line.strip().split(" ")[0] in ("apns", "fcm"):
            texts.append(line.strip())
    decoder = json.JSONDecoder()
    found = []
    for text in texts:
        provider, _, rest = text.replace("...", "null").partition(" ")
        fields: dict[str, Any] = {}
        while rest.strip():
            name, _, rest = rest.strip().partition("=")
            if rest.startswith("{"):
                fields[name], end = decoder.raw_decode(rest)
                rest = rest[end:]
            else:
                raw, _, rest = rest.partition(" ")
                try:
                    fields[name] = json.loads(raw)
                except ValueError:
                    fields[name] = raw
        found.append((provider, fields))
    return found


def matches(shown: Any, got: Any) -> bool:
    """`got` is what `shown` shows: the same keys, the same values, None (`...`) any value."""
    if shown is None:
        return True
    if isinstance(shown, dict):
        return (isinstance(got, dict) and shown.keys() == got.keys()
                and all(matches(v, got[k]) for k, v in shown.items()))
    return bool(shown == got)


def sandbox_pushes(sandbox: SandboxHandle, token: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while not (got := sandbox.control.pushes(token)) and time.monotonic() < end:
        time.sleep(0.05)
    return got


def admin_json(run: Run, *argv: str) -> dict[str, Any]:
    done = subprocess.run(["pushlib-admin", "--json", *argv], env=run.env, cwd=run.workdir, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@pytest.mark.timeout(90)
def test_api_server_admin_and_curl_commands(run: Run, redis: RedisServer) -> None:
    [api_block] = blocks_of("api")
    [admin_block] = blocks_of("api-admin")
    [curl_block] = blocks_of("api-curl")
    # The API block exports PUSHLIB_REDIS_URL_FILE itself: it runs without the operator's.
    api_env = {k: v for k, v in run.env.items() if k != "PUSHLIB_REDIS_URL_FILE"}
    with sandbox_process() as sandbox, dispatcher_process(redis.url, run.workdir.parent):
        # What `make demo-api` stores: the sandbox's apps (and the app `app check` names), alice's two phones.
        store = SyncStore(redis.url, Settings(redis_url=redis.url))
        now = time.time()
        tokens = {"apns": apns_token(), "fcm": fcm_token()}
        try:
            for app in (sandbox.control.apns_token_app(BUNDLE, TEAM), sandbox.control.fcm_app(FCM_PROJECT),
                        sandbox.control.apns_token_app("com.acme.phone", TEAM)):
                store.save_app(app)
            store.save_device(Device("sip:alice@example.com", "iphone", PushParams(
                Provider.APNS, BUNDLE, voip_token=apns_token(), alert_token=tokens["apns"], team_id=TEAM),
                registered_at=now, expires_at=now + 3600))
            store.save_device(Device("sip:alice@example.com", "android", PushParams(
                Provider.FCM, FCM_PROJECT, alert_token=tokens["fcm"]), registered_at=now, expires_at=now + 3600))
        finally:
            store.close()
        with background(run, api_block, run.workdir, env=api_env) as api:
            try:
                wait_for_port(int(run.values["api_port"]), timeout=20)
                wait_healthy(f"http://127.0.0.1:{run.values['api_port']}")
            except (TimeoutError, RuntimeError) as exc:
                pytest.fail(f"README.md:{api_block.line}: {exc}\n{api.output()[-3000:]}")
            # The admin lines, then the curl lines in the same shell (they use its $KEY).
            both = Block("api-admin", admin_block.text + "\n" + curl_block.text, admin_block.line)
            lines = shell(run, both, run.workdir).splitlines()
        received = {provider: sandbox_pushes(sandbox, token) for provider, token in tokens.items()}

    commands = shown_commands(curl_block.text)
    admin_lines, printed = lines[:-len(commands)], lines[-len(commands):]
    assert json.loads(admin_lines[-1])["check"]["ok"] is True, admin_lines  # `app check`: exit 0, and says so
    assert "pnk_" not in "\n".join(admin_lines)  # the tokens went into $CRM and $KEY; `keys list` shows none
    assert [k["name"] for k in admin_json(run, "keys", "list")["keys"]] == ["ops"]  # crm revoked
    user_uuid, aor = re.findall(r"^pushlib-admin users map (\S+) (\S+)$", admin_block.text, re.M)[0]
    assert admin_json(run, "users", "show", user_uuid)["aor"] == f"sip:{aor}"
    assert admin_json(run, "tenants", "show", "acme")["tenant"]["domains"] == ["acme.example"]

    kinds = set()
    for shown, got in zip(commands, printed, strict=True):
        where = f"README.md:{curl_block.line}: {shown.command}"
        if "/1.0/mobile/notifications" in shown.command:
            kinds.add("notification")
            assert got == shown.comment[0].strip().split(",")[0] == "204", (where, got)
            described = described_pushes(shown.comment[1:])
            assert sorted(p for p, _ in described) == ["apns", "fcm"], shown.comment
            for provider, fields in described:
                [record] = received[provider]
                for name, value in fields.items():
                    actual = record[name] if name in record else record["payload"][name]
                    assert matches(value, actual), (where, provider, name, value, actual)
        elif shown.command.endswith("/health"):
            kinds.add("health")
            expected, actual = json.loads(shown.printed()), json.loads(got)
            volatile = {"stream_length", "pending", "lag"}  # the notification's job may still be in flight
            assert expected.keys() == actual.keys(), (where, got)
            assert {k: v for k, v in expected.items() if k not in volatile} == {
                k: v for k, v in actual.items() if k not in volatile}, (where, got)
            assert all(isinstance(actual[k], int) for k in volatile), got
        else:
            kinds.add("422" if got.endswith(" 422") else got)
            assert got == shown.printed(), (where, got)
    assert kinds == {"notification", "health", "422"}
    assert run.used >= {"api_port", "redis_url_file"}
