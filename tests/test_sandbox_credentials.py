"""`pushlib-sandbox credentials`: sandbox credentials for APNs (token key, client certificate) and FCM
(service account) in one line, registered with a running sandbox, plus the pushlib-admin lines that
store them; those lines run as printed and the stored apps push through the sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pushlib.apns import ApnsClient
from pushlib.fcm import FcmClient
from pushlib.models import ApnsRequest, AppCredentials, FcmMessage, Outcome, Provider
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle
from tests.support import free_port

VENV_BIN = Path(sys.executable).parent
TOKEN = "cd" * 32


def credentials(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pushsandbox", "credentials", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def run_printed(line: str, redis_url: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PUSHLIB_REDIS_URL": redis_url}
    done = subprocess.run(shlex.split(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, (line, done.stderr)


async def push(app: AppCredentials) -> Outcome:
    assert app.custom_host
    if app.provider is Provider.APNS:
        apns = ApnsClient(app, app.custom_host)
        try:
            body = json.dumps({"aps": {"alert": {"title": "hello"}}}).encode()
            request = ApnsRequest(TOKEN, {"apns-topic": app.app_id, "apns-push-type": "alert"}, body)
            return (await apns.send(request, 10)).outcome
        finally:
            await apns.aclose()
    fcm = FcmClient(app, app.custom_host)
    try:
        body = json.dumps({"message": {"token": TOKEN, "data": {"hello": "1"}}}).encode()
        return (await fcm.send(FcmMessage(TOKEN, body), 10)).outcome
    finally:
        await fcm.aclose()


def test_one_line_makes_registers_and_prints_the_admin_lines(
    sbx: SandboxHandle, redis_url: str, tmp_path: Path
) -> None:
    sandbox = sbx
    done = credentials(
        "--url", sandbox.url, "--ca", str(sandbox.ca_path), "--dir", "creds",
        "--apns", "com.example.phone", "--apns", "com.example.tablet", "--key-id", "ABC123DEFG",
        "--team-id", "TEAM123456", "--apns-cert", "com.example.legacy", "--fcm", "example-project",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    host, ca = f"127.0.0.1:{sandbox.port}", str(sandbox.ca_path)
    target = ["--host", host, "--ca-file", ca]
    assert [shlex.split(line) for line in lines] == [
        ["pushlib-admin", "app", "set-apns", "com.example.phone", "--key-file", "creds/AuthKey_ABC123DEFG.p8",
         "--key-id", "ABC123DEFG", "--team-id", "TEAM123456", *target],
        ["pushlib-admin", "app", "set-apns", "com.example.tablet", "--key-file", "creds/AuthKey_ABC123DEFG.p8",
         "--key-id", "ABC123DEFG", "--team-id", "TEAM123456", *target],
        ["pushlib-admin", "app", "set-apns-cert", "com.example.legacy", "--cert-file",
         "creds/com.example.legacy-cert.pem", "--key-file", "creds/com.example.legacy-key.pem", *target],
        ["pushlib-admin", "app", "set-fcm", "--service-account", "creds/example-project-firebase-adminsdk.json",
         *target],
    ]
    creds = tmp_path / "creds"
    assert sorted(p.name for p in creds.iterdir()) == [
        "AuthKey_ABC123DEFG.p8", "com.example.legacy-cert.pem", "com.example.legacy-key.pem",
        "example-project-firebase-adminsdk.json"]
    for private in ("AuthKey_ABC123DEFG.p8", "com.example.legacy-key.pem", "example-project-firebase-adminsdk.json"):
        assert stat.S_IMODE((creds / private).stat().st_mode) == 0o600, private
    key = serialization.load_pem_private_key((creds / "AuthKey_ABC123DEFG.p8").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    account = json.loads((creds / "example-project-firebase-adminsdk.json").read_text())
    assert account["project_id"] == "example-project" and account["token_uri"] == sandbox.url + "/token"

    for line in lines:
        run_printed(line, redis_url, tmp_path)
    store = SyncStore(redis_url, Settings.from_env())
    try:
        apps = [store.app("apns", "com.example.phone"), store.app("apns", "com.example.tablet"),
                store.app("apns", "com.example.legacy"), store.app("fcm", "example-project")]
    finally:
        store.close()
    assert all(a is not None and a.custom_host == host and a.ca_pem == sandbox.ca_pem for a in apps), apps

    async def push_all() -> list[Outcome]:
        return [await push(app) for app in apps if app is not None]

    assert asyncio.run(push_all()) == [Outcome.DELIVERED] * 4
    records = sandbox.control.pushes(TOKEN)
    assert [(r["provider"], r["auth"], r["topic"] or r["project_id"]) for r in records] == [
        ("apns", "token", "com.example.phone"), ("apns", "token", "com.example.tablet"),
        ("apns", "cert", "com.example.legacy"), ("fcm", "oauth", "example-project")]


def test_refusals_write_nothing(sbx: SandboxHandle, tmp_path: Path) -> None:
    sandbox = sbx
    base = ["--url", sandbox.url, "--ca", str(sandbox.ca_path), "--dir", "out"]
    done = credentials(*base, cwd=tmp_path)
    assert done.returncode == 2 and "--apns, --apns-cert or --fcm" in done.stderr
    done = credentials(*base, "--apns", "com.example.phone", "--key-id", "short", cwd=tmp_path)
    assert done.returncode == 2 and "key id 'short'" in done.stderr
    done = credentials(*base, "--apns-cert", "../escape", cwd=tmp_path)
    assert done.returncode == 2 and "bundle id '../escape'" in done.stderr
    assert not (tmp_path / "out").exists()
    done = credentials("--url", sandbox.url, "--ca", "missing.pem", "--dir", "out", "--fcm", "p", cwd=tmp_path)
    assert done.returncode == 2 and "missing.pem" in done.stderr
    nobody = f"https://127.0.0.1:{free_port()}"
    done = credentials("--url", nobody, "--ca", str(sandbox.ca_path), "--dir", "out", "--fcm", "p", cwd=tmp_path)
    assert done.returncode == 1 and f"the sandbox at {nobody} did not register them" in done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    done = credentials("--url", sandbox.url, "--ca", "junk.pem", "--dir", "out", "--fcm", "p", cwd=tmp_path)
    assert done.returncode == 2 and "junk.pem is not a PEM CA certificate" in done.stderr
