"""SIP MESSAGE to users whose devices sleep: the KSR side (decisions: pushlib/messages.py, queue:
pushlib/msgstore.py).

- `route()` (request route, after authentication): a MESSAGE for a user with sleeping push devices
  is queued for them in Redis, answered 202 and pushed (`messageReceived`); the user's awake
  bindings get a copy at once. Nobody asleep: routed as before (the router's lookup + relay).
- `deliver()` (a push device's REGISTER, after its 200 OK): the device's queued messages go to
  its fresh binding as MESSAGEs sent by the uac module, one at a time: each is acknowledged in
  Redis only on the device's 2xx (`on_reply`, uac's `uac:reply` event), and the next is sent from
  there. A failure (error reply, timeout, connection gone) ends the chain; what is left waits for
  the next REGISTER.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import KSR

from pushlib import access, calls, messages
from pushlib.models import Device, PushJob
from pushlib.msgstore import MessageStore, StoreOutcome
from pushlib.redisconn import StoreUnavailable

STOP = True
NEXT = False
#: token (uac's `$uac_req(evparam)`) -> messages.DeliveryStep of each MESSAGE in flight
MSG_TABLE = "pnmsg"
#: the router's per-device push counters (htable pnrate): message pushes count under their own keys
RATE_TABLE = "pnrate"
_STEP_TTL = 60  # s: longer than tm's non-INVITE timeout (fr_timer 10 s), the latest a reply comes
_RETRY_AFTER = 5

Log = Callable[..., None]


class MessageRoutes:
    """MESSAGE handling for the router (one per process, like the router itself)."""

    def __init__(self, cfg: calls.ProxyConfig, limits: messages.MessageLimits, client: Callable[[], Any],
                 devices: Callable[[str], list[Device]], enqueue: Callable[[PushJob], str],
                 bindings: Callable[[str], list[calls.Binding]],
                 disconnected: Callable[[list[calls.Binding]], frozenset[str]],
                 pv: Callable[[str], str], log: Log) -> None:
        self.cfg = cfg
        self.limits = limits
        self._client = client
        self._devices = devices
        self._enqueue = enqueue
        self._bindings = bindings
        self._disconnected = disconnected
        self._pv = pv
        self._log = log
        self._store: MessageStore | None = None
        self._pid = 0

    @property
    def store(self) -> MessageStore:
        if self._store is None or self._pid != os.getpid():  # (per process: after the fork)
            self._store = MessageStore(self._client(), self.limits)
            self._pid = os.getpid()
        return self._store

    # ------------------------------------------------------------------ an incoming MESSAGE

    def route(self, role: bool = False) -> bool:
        """STOP when the MESSAGE was answered or relayed here, NEXT to route it as before. In role
        mode (`role`) a user unknown here is the host's too (it may route it elsewhere)."""
        aor = calls.aor_of(self._pv("$rU"), self._pv("$rd"))
        content_type = self._pv("$cT")
        kind = messages.classify(content_type)
        body, body_ok = self._body()
        size = max(KSR.pv.geti("$cl") or 0, len(body.encode("utf-8", "surrogateescape")))
        body_ok = body_ok and messages.valid_content_type(content_type)
        bindings = self._bindings(aor)
        devices: list[Device] | None
        try:
            devices = self._devices(aor)
        except StoreUnavailable as exc:
            self._log(KSR.err, "device-store-unavailable", aor=aor, method="MESSAGE", error=exc)
            devices = None
        plan = messages.plan_message(kind, size, body_ok, bindings, devices, time.time(), self.cfg.awake_window,
                                     self.limits, self._disconnected(bindings))
        if plan.action is messages.Action.RELAY or (role and plan.code == 404):
            return NEXT
        if plan.action is messages.Action.REPLY:
            self._log(KSR.notice, "message-rejected", aor=aor, code=plan.code, reason=plan.log_reason,
                      type=content_type, bytes=size, src=self._pv("$si"))
            if plan.code == 503:
                KSR.hdr.append_to_reply(f"Retry-After: {_RETRY_AFTER}\r\n")
            KSR.sl.sl_send_reply(plan.code, plan.reason)
            return STOP
        if plan.action is messages.Action.RELAY_AWAKE:
            self._relay_to(plan.ring)
            return STOP
        self._queue(aor, kind, body, content_type, plan)
        return STOP

    def _body(self) -> tuple[str, bool]:
        """The body, and whether it can be stored as it came (UTF-8, no NUL: KSR strings are C strings)."""
        try:
            raw = KSR.pv.get("$rb")
        except UnicodeDecodeError:
            return "", False
        text = "" if raw is None else str(raw)
        return text, "\x00" not in text

    @staticmethod
    def _relay_to(ring: tuple[calls.Binding, ...]) -> None:
        """Relay the request to these bindings only (the last one set is the first branch)."""
        for i, b in enumerate((*ring[1:], ring[0])):
            KSR.pv.sets("$ru", b.uri)
            if b.received:
                KSR.pv.sets("$du", b.received)
            else:
                KSR.pv.unset("$du")
            if i < len(ring) - 1:
                KSR.corex.append_branch()
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()

    def _queue(self, aor: str, kind: messages.BodyKind, body: str, content_type: str,
               plan: messages.MessagePlan) -> None:
        # statefully: a retransmission of the MESSAGE is absorbed by its transaction, never queued twice
        if KSR.tm.t_newtran() < 0:
            KSR.sl.sl_reply_error()
            return
        name, sender = messages.sender_identity(self._pv("$hdr(From)"), self._pv("$fU"))
        now = time.time()
        message = messages.StoredMessage(messages.new_message_id(), sender, content_type.strip(), body, now)
        ids = tuple(d.device_id for d in plan.store_for)
        try:
            result = self.store.store(aor, ids, message)
        except StoreUnavailable as exc:
            self._log(KSR.err, "message-store-unavailable", aor=aor, error=exc)
            KSR.hdr.append_to_reply(f"Retry-After: {_RETRY_AFTER}\r\n")
            KSR.tm.t_reply(503, "Message Store Unavailable")
            return
        if result.outcome is not StoreOutcome.STORED:
            limit = self.limits.max_count if result.outcome is StoreOutcome.FULL_COUNT else self.limits.max_bytes
            self._log(KSR.notice, "message-queue-full", aor=aor, limit=result.outcome.value, queued=result.queued,
                      max=limit, src=self._pv("$si"))
            KSR.tm.t_reply(messages.QUEUE_FULL_CODE, messages.QUEUE_FULL_REASON)
            return
        for b in plan.ring:  # awake bindings: a copy now (their own 2xx is not waited for)
            self._send(b.uri, b.received, aor, message, "")
        KSR.tm.t_reply(202, "Accepted")
        pushed = self._push(aor, message, kind, name, plan.store_for, now)
        self._log(KSR.info, "message-stored", aor=aor, message=message.message_id, entry=result.entry_id,
                  devices=",".join(ids), pushed=",".join(pushed), bytes=message.size, copies=len(plan.ring))

    def _push(self, aor: str, message: messages.StoredMessage, kind: messages.BodyKind, name: str,
              devices: tuple[Device, ...], now: float) -> list[str]:
        """Queue the messageReceived push to the devices under their per-minute limit (a sender
        flooding a user fills the queue, bounded, not the user's notification screen)."""
        allowed = [d.device_id for d in devices
                   if (KSR.htable.sht_inc(RATE_TABLE, "m|" + access.push_bucket(aor, d.device_id, now)) or 0)
                   <= self.limits.pushes_per_minute]
        if not allowed:
            return []
        shown = "" if self.cfg.settings.hide_caller else name
        job = messages.message_job(aor, message.message_id, shown, messages.preview(kind, message.body), allowed,
                                   now, float(self.cfg.settings.message_ttl))
        try:
            self._enqueue(job)
        except StoreUnavailable as exc:
            # the message is queued: the device gets it at its next REGISTER, unannounced
            self._log(KSR.err, "message-push-unavailable", aor=aor, message=message.message_id, error=exc)
            return []
        return allowed

    # ------------------------------------------------------------------ delivery to a woken device

    def deliver(self, aor: str, device_id: str, contact: str) -> None:
        """A push device registered (its 200 OK is sent): start its delivery chain if it has
        messages waiting. One Redis round trip when it has none. Never raises: the REGISTER is
        answered already, the request route must not answer it again."""
        try:
            self._deliver(aor, device_id, contact)
        except Exception as exc:
            self._log(KSR.err, "message-delivery-error", aor=aor, device=device_id,
                      error=f"{type(exc).__name__}: {str(exc)[:120]}")

    def _deliver(self, aor: str, device_id: str, contact: str) -> None:
        try:
            if self.store.next_for(aor, device_id) is None:
                return
            ruri, dst = self._target(aor, contact)
            token = self.store.lock(aor, device_id, f"{ruri}\t{dst}")
            if token is None:  # a chain to this binding is in flight: if it just ended, it starts again
                self.store.ask_again(aor, device_id, f"{ruri}\t{dst}")
                return
        except StoreUnavailable as exc:
            self._log(KSR.err, "message-delivery-unavailable", aor=aor, device=device_id, error=exc)
            return
        self._next(messages.DeliveryStep(aor, device_id, ruri, dst, "", token))

    def _target(self, aor: str, contact: str) -> tuple[str, str]:
        """The device's binding and where to send to it (its received address behind NAT)."""
        for b in self._bindings(aor):
            if b.uri == contact:
                return b.uri, b.received
        return contact, ""

    def _next(self, step: messages.DeliveryStep) -> None:
        """Send the device's next queued message, or end the chain when none is left."""
        try:
            message = self.store.next_for(step.aor, step.device_id)
            if message is None:
                self._finish(step, "done")
                return
            if not self.store.refresh(step.aor, step.device_id, step.lock, f"{step.ruri}\t{step.dst}"):
                self._log(KSR.warn, "message-chain-lost", aor=step.aor, device=step.device_id, sent=step.sent)
                return  # the phone came back over another connection and a new chain took over
        except StoreUnavailable as exc:
            self._log(KSR.err, "message-delivery-unavailable", aor=step.aor, device=step.device_id, error=exc)
            return  # (the lock expires by itself; the messages wait for the next REGISTER)
        token = secrets.token_hex(8)
        KSR.htable.sht_setxs(MSG_TABLE, token, replace(step, entry_id=message.entry_id).encode(), _STEP_TTL)
        if not self._send(step.ruri, step.dst, step.aor, message, token):
            KSR.htable.sht_rm(MSG_TABLE, token)
            self._finish(step, "send-failed")

    def _send(self, ruri: str, dst: str, aor: str, message: messages.StoredMessage, token: str) -> bool:
        """One MESSAGE through the uac module (a new transaction of ours); with a `token`, its final
        reply comes back to `on_reply`."""
        KSR.pv.unset("$uac_req(all)")
        KSR.pv.sets("$uac_req(method)", "MESSAGE")
        KSR.pv.sets("$uac_req(ruri)", ruri)
        KSR.pv.sets("$uac_req(turi)", aor)
        KSR.pv.sets("$uac_req(furi)", message.sender)
        if dst:
            KSR.pv.sets("$uac_req(ouri)", dst)
        KSR.pv.sets("$uac_req(hdrs)", messages.delivery_headers(message))
        if message.body:
            KSR.pv.sets("$uac_req(body)", message.body)
        if token:
            KSR.pv.seti("$uac_req(evroute)", 1)
            KSR.pv.sets("$uac_req(evparam)", token)
        if KSR.uac.uac_req_send() < 0:
            self._log(KSR.err, "message-send-failed", aor=aor, message=message.message_id)
            return False
        return True

    def on_reply(self) -> None:
        """uac's `uac:reply` event: the final reply to one MESSAGE of a chain."""
        token = self._pv("$uac_req(evparam)")
        code = KSR.pv.geti("$uac_req(evcode)") or 0
        step = messages.DeliveryStep.decode(KSR.htable.sht_get(MSG_TABLE, token)) if token else None
        if step is None:
            return  # not a chain's MESSAGE (or its entry expired: the chain's lock expires too)
        KSR.htable.sht_rm(MSG_TABLE, token)
        if not 200 <= code < 300:
            self._log(KSR.notice, "message-delivery-failed", aor=step.aor, device=step.device_id, code=code,
                      sent=step.sent, left="queued")
            self._finish(step, f"failed-{code}")
            return
        try:
            self.store.ack(step.aor, step.device_id, step.entry_id)
        except StoreUnavailable as exc:
            # delivered but not recorded: sent again at the next REGISTER (at least once, never lost)
            self._log(KSR.err, "message-ack-unavailable", aor=step.aor, device=step.device_id, error=exc)
            return
        self._next(replace(step, sent=step.sent + 1))

    def _finish(self, step: messages.DeliveryStep, reason: str) -> None:
        self._log(KSR.info, "messages-delivered", aor=step.aor, device=step.device_id, sent=step.sent, end=reason)
        try:
            self.store.unlock(step.aor, step.device_id, step.lock, f"{step.ruri}\t{step.dst}")
            again = self.store.take_again(step.aor, step.device_id)
        except StoreUnavailable as exc:
            self._log(KSR.err, "message-delivery-unavailable", aor=step.aor, device=step.device_id, error=exc)
            return
        if again:  # the device registered again meanwhile: on towards that binding
            ruri, _, dst = again.partition("\t")
            try:
                token = self.store.lock(step.aor, step.device_id, again)
            except StoreUnavailable:
                return
            if token is not None:
                self._next(messages.DeliveryStep(step.aor, step.device_id, ruri, dst, "", token))
