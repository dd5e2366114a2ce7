"""MESSAGE-to-sleeping-phone benchmark (issue 13) over real Kamailio + Redis + the sandbox providers.

Starts the stack (KEMI mode, auth on) on loopback and measures:
- store -> push: a MESSAGE sent to a user whose only (Android) phone sleeps -> the sandbox records
  its messageReceived push (wall clock of this host for both ends; the 202 comes in between).
  Messages go one at a time (the next once the previous push is in), per-device push limit off.
- REGISTER -> all delivered: 100 MESSAGEs queued for a sleeping phone; the phone registers over TCP
  and answers every MESSAGE 200 at once; from its REGISTER sent to the 100th MESSAGE received
  (the proxy sends one at a time, each after the previous one's 200: the figure is the chain's
  round trips, per message too).

Prints a summary and writes it to bench/results/message_bench-<UTC stamp>.json.
Usage: .venv/bin/python bench/message_bench.py [--messages 200] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.localstack import DOMAIN, Stack, push_stack  # noqa: E402
from harness.sipua import SipPhone, fcm_token, message_request, open_sip_socket, rfc8599_fcm_contact  # noqa: E402
from pushlib.models import Device  # noqa: E402

QUEUED = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "p50_ms": round(statistics.median(values) * 1000, 2),
            "p99_ms": round(percentile(values, 0.99) * 1000, 2), "max_ms": round(max(values) * 1000, 2)}


def sleeping_phone(stack: Stack, user: str) -> tuple[str, str, str]:
    """(password, token, instance) of an Android phone that registered over TCP and slept."""
    password = stack.add_user(user)
    tok, instance = fcm_token(), str(uuid.uuid4())
    with SipPhone(open_sip_socket(("127.0.0.1", stack.kamailio.port), "tcp"), "tcp") as phone:
        contact = rfc8599_fcm_contact(phone.local_port, tok, "tcp", instance)
        if phone.register(user, contact, password=password).status != 200:
            raise RuntimeError("REGISTER failed")
    aor = f"sip:{user}@{DOMAIN}"
    for d in stack.store.devices(aor):  # registered long ago: asleep
        stack.store.save_device(Device(**{**d.__dict__, "registered_at": time.time() - 3600}))
    return password, tok, instance


def store_to_push(stack: Stack, count: int) -> list[float]:
    user = "mb" + uuid.uuid4().hex[:8]
    _, tok, _ = sleeping_phone(stack, user)
    proxy = ("127.0.0.1", stack.kamailio.port)
    out: list[float] = []
    with SipPhone(open_sip_socket(proxy, "udp"), "udp", proxy) as sender:
        call_id = uuid.uuid4().hex
        for i in range(count):
            sent = time.time()
            sender.send(message_request(user, f"bench {i}", sender.local_port, call_id, i + 1))
            if sender.response(5).status != 202:
                raise RuntimeError("MESSAGE not accepted")
            pushes = stack.wait_pushes(tok, i + 1, timeout=10, poll=0.01)
            if len(pushes) <= i:
                raise RuntimeError("push missing")
            out.append(float(pushes[i]["time"]) - sent)
    return out


def register_to_delivered(stack: Stack) -> float:
    user = "mr" + uuid.uuid4().hex[:8]
    password, tok, instance = sleeping_phone(stack, user)
    proxy = ("127.0.0.1", stack.kamailio.port)
    with SipPhone(open_sip_socket(proxy, "udp"), "udp", proxy) as sender:
        call_id = uuid.uuid4().hex
        for i in range(QUEUED):
            sender.send(message_request(user, f"queued {i}", sender.local_port, call_id, i + 1))
            if sender.response(5).status != 202:
                raise RuntimeError("MESSAGE not accepted")
    with SipPhone(open_sip_socket(proxy, "tcp"), "tcp") as phone:
        started = time.monotonic()
        r = phone.register(user, rfc8599_fcm_contact(phone.local_port, tok, "tcp", instance), password=password)
        if r.status != 200:
            raise RuntimeError("wake REGISTER failed")
        for i in range(QUEUED):
            req = phone.request("MESSAGE", timeout=10)
            phone.answer(req, 200, "OK", "b1")
            if not req.endswith(f"queued {i}"):
                raise RuntimeError(f"message {i} out of order")
        return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200, help="MESSAGEs timed store -> push")
    ap.add_argument("--rounds", type=int, default=5, help=f"REGISTER -> {QUEUED} delivered rounds")
    ap.add_argument("--quick", action="store_true", help="30 messages, 2 rounds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    messages, rounds = (30, 2) if args.quick else (args.messages, args.rounds)
    extra: dict[str, str | None] = {"MESSAGE_PUSHES_PER_MINUTE": "1000000"}
    with push_stack(auth=True, awake_window=10, extra_defines=extra) as stack:
        push = store_to_push(stack, messages)
        delivered = [register_to_delivered(stack) for _ in range(rounds)]
    result = {
        "what": "MESSAGE to a sleeping phone: stored -> push at the sandbox; REGISTER -> 100 queued delivered",
        "store_to_push": summary(push),
        "register_to_100_delivered": {**summary(delivered),
                                      "per_message_ms": round(statistics.median(delivered) * 1000 / QUEUED, 3)},
        "quick": args.quick,
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "bench" / "results" / f"message_bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sp, rd = result["store_to_push"], result["register_to_100_delivered"]
    print(f"MESSAGE stored -> push at the sandbox: p50 {sp['p50_ms']} ms, p99 {sp['p99_ms']} ms "
          f"({sp['count']} messages)")
    print(f"REGISTER -> {QUEUED} queued MESSAGEs delivered: p50 {rd['p50_ms']} ms, p99 {rd['p99_ms']} ms "
          f"({rd['count']} rounds, {rd['per_message_ms']} ms per message)")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
