"""`make demo-api`: one Wazo-shaped custom notification through the HTTP API, on loopback.

Starts redis-server, the sandbox providers (an APNs and an FCM app stored), a standalone
dispatcher and `pushlib-api` on free loopback ports; stores an iPhone and an Android phone of
alice@example.com, maps a user uuid to her, sends `POST /1.0/mobile/notifications` with an admin
key and prints what the sandbox received. Exit 0 when both phones got it; every process is stopped
by PID. Run: `.venv/bin/python -m harness.demo_api`.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import httpx

from harness.apistack import api_stack
from harness.sipua import BUNDLE, FCM_PROJECT, TEAM, apns_token, fcm_token
from pushlib.models import Device, Provider, PushParams

USER = "alice@example.com"


def main() -> int:
    with api_stack() as stack:
        now = time.time()
        aor = f"sip:{USER}"
        tokens = {"iphone": apns_token(), "android": fcm_token()}
        stack.store.save_device(Device(aor, "iphone", PushParams(Provider.APNS, BUNDLE, voip_token=apns_token(),
                                                                 alert_token=tokens["iphone"], team_id=TEAM),
                                       registered_at=now, expires_at=now + 3600))
        stack.store.save_device(Device(aor, "android", PushParams(Provider.FCM, FCM_PROJECT,
                                                                  alert_token=tokens["android"]),
                                       registered_at=now, expires_at=now + 3600))
        user_uuid = str(uuid.uuid4())
        body = {"notification_type": "planned_maintenance", "user_uuid": user_uuid, "title": "Maintenance",
                "body": "Service restarts at 02:00", "extra": {"ticket": "42"}}
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_token}"},
                          timeout=10) as api:
            mapped = api.put(f"/1.0/users/{user_uuid}", json={"aor": USER})
            print(f"demo-api: PUT /1.0/users/{user_uuid} -> {mapped.status_code} {mapped.text}")
            sent = api.post("/1.0/mobile/notifications", json=body)
            print(f"demo-api: POST /1.0/mobile/notifications {json.dumps(body)} -> {sent.status_code}")
        got = {name: stack.wait_pushes(token) for name, token in tokens.items()}
        for name, records in got.items():
            for r in records:
                shown = {k: r[k] for k in ("provider", "topic", "push_type", "priority", "project_id") if r.get(k)}
                payload = json.dumps(r["payload"])
                print(f"demo-api: sandbox received for the {name}: {json.dumps(shown)} payload={payload}")
        if sent.status_code != 204 or not all(got.values()):
            print("demo-api: FAILED: the notification did not reach both phones", file=sys.stderr)
            return 1
    print("demo-api: the notification reached the iPhone (APNs) and the Android phone (FCM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
