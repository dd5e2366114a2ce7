"""Sandbox credentials as files, the way Apple and Google hand them out, for `pushlib-sandbox credentials`.

For each app it mints the credentials, registers their public half with a running sandbox (control
API) and writes the private half into a directory:

- APNs token auth: one `AuthKey_<KEYID>.p8` (EC P-256, PKCS#8 PEM) per call, serving every
  `--apns` bundle, like one key from Apple serves all the apps of a team;
- APNs certificate auth: `<bundle>-cert.pem` + `<bundle>-key.pem`, a client certificate from the
  sandbox CA bound to the bundle (subject UID, like Apple's);
- FCM: `<project>-firebase-adminsdk.json`, a service account whose `token_uri` is the sandbox's.

Each app comes with the `pushlib-admin app set-apns|set-apns-cert|set-fcm` command line that
stores it pointing at the sandbox (`--host`, `--ca-file`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pushsandbox.control import DEFAULT_TEAM_ID, SandboxControl

# Apple's key ids and team ids are 10 upper-case letters or digits.
APPLE_ID = re.compile(r"[A-Z0-9]{10}")
# Bundle ids and Firebase project ids become file names: letters, digits, dots, dashes, underscores.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SandboxApp:
    """One app's credentials written for the sandbox: the files and the pushlib-admin command."""

    provider: str  # "apns" or "fcm"
    app_id: str
    files: tuple[Path, ...]
    admin_argv: tuple[str, ...]


def _check_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r}: want letters, digits, '.', '-' or '_'")
    return value


def _write_public(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _write_private(path: Path, text: str) -> Path:
    """Write a file only its owner can read (it holds a private key)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)  # an existing file keeps its mode through O_TRUNC
    return path


def write_sandbox_credentials(
    control: SandboxControl,
    directory: Path,
    ca_file: str,
    *,
    apns: Sequence[str] = (),
    apns_cert: Sequence[str] = (),
    fcm: Sequence[str] = (),
    key_id: str | None = None,
    team_id: str = DEFAULT_TEAM_ID,
) -> list[SandboxApp]:
    """Mint, register and write the credentials of these apps (see the module doc); `ca_file` is
    the sandbox CA path the admin commands name. `directory` is created when the first file is
    written (after the sandbox accepted the first registration); files of the same name are replaced.
    Raises ValueError for a malformed id, SandboxControlError when the sandbox refuses."""
    for bundle in (*apns, *apns_cert):
        _check_name(bundle, "bundle id")
    for project in fcm:
        _check_name(project, "project id")
    if key_id is not None and not APPLE_ID.fullmatch(key_id):
        raise ValueError(f"key id {key_id!r}: Apple key ids are 10 upper-case letters or digits")
    if not APPLE_ID.fullmatch(team_id):
        raise ValueError(f"team id {team_id!r}: Apple team ids are 10 upper-case letters or digits")
    target = ("--host", control.host, "--ca-file", ca_file)
    apps: list[SandboxApp] = []
    if apns:
        key = control.apns_token_key(list(apns), key_id=key_id, team_id=team_id)
        key_path = _write_private(directory / f"AuthKey_{key.key_id}.p8", key.private_pem)
        for bundle in apns:
            argv: tuple[str, ...] = ("pushlib-admin", "app", "set-apns", bundle, "--key-file", str(key_path),
                    "--key-id", key.key_id, "--team-id", key.team_id, *target)
            apps.append(SandboxApp("apns", bundle, (key_path,), argv))
    for bundle in apns_cert:
        cert_pem, key_pem = control.apns_client_cert(bundle)
        cert_path = _write_public(directory / f"{bundle}-cert.pem", cert_pem)
        cert_key_path = _write_private(directory / f"{bundle}-key.pem", key_pem)
        argv = ("pushlib-admin", "app", "set-apns-cert", bundle, "--cert-file", str(cert_path),
                "--key-file", str(cert_key_path), *target)
        apps.append(SandboxApp("apns", bundle, (cert_path, cert_key_path), argv))
    for project in fcm:
        account = control.service_account(project)
        account_path = _write_private(
            directory / f"{project}-firebase-adminsdk.json", json.dumps(account, indent=2) + "\n"
        )
        argv = ("pushlib-admin", "app", "set-fcm", "--service-account", str(account_path), *target)
        apps.append(SandboxApp("fcm", project, (account_path,), argv))
    return apps
