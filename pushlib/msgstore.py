"""The queue of MESSAGEs waiting for sleeping devices (sync, for the Kamailio SIP workers).

Keys and scripts: `pushlib.schema` (messages_key ... MESSAGE_LOCK_LUA). One stream per user holds
the messages in the order they came; each device has a cursor (the last entry it acknowledged
with a 2xx), so each device gets every message queued for it once, in order, and an entry goes
when its last device acknowledged it or it expired. Every method does one round trip and either
completes or raises `redisconn.StoreUnavailable` (shares the process's `SyncStore.client`).

A device's delivery is a chain: one MESSAGE in flight at a time, the next sent from the previous
one's 2xx. `lock` makes it one chain per device (a retransmitted REGISTER must not start a second
chain that would deliver the same messages twice).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pushlib import schema
from pushlib.messages import MessageLimits, StoredMessage
from pushlib.redisconn import unavailable_on_error

#: s a device's chain lock lives without a MESSAGE sent: well over tm's non-INVITE timeout (fr_timer,
#: 10 s), so a chain waiting for a reply keeps it, and a chain whose process died frees it soon
MESSAGE_LOCK_TTL = 30
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


class StoreOutcome(Enum):
    STORED = "stored"
    FULL_COUNT = "full-count"  # MESSAGE_QUEUE_MAX messages are queued for the user
    FULL_BYTES = "full-bytes"  # MESSAGE_QUEUE_BYTES would be exceeded


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    entry_id: str = ""
    queued: int = 0  # messages (FULL_COUNT) or bytes (FULL_BYTES) already queued


class MessageStore:
    """Queue, fetch and acknowledge messages; per-device chain locks (see module doc)."""

    def __init__(self, client: Any, limits: MessageLimits) -> None:
        self._r = client
        self.limits = limits
        self._store = client.register_script(schema.STORE_MESSAGE_LUA)
        self._next = client.register_script(schema.NEXT_MESSAGE_LUA)
        self._ack = client.register_script(schema.ACK_MESSAGE_LUA)
        self._lock = client.register_script(schema.MESSAGE_LOCK_LUA)
        self._claim = client.register_script(schema.CLAIM_MESSAGE_LOCK_LUA)

    @staticmethod
    def _keys(aor: str) -> list[str]:
        return [schema.messages_key(aor), schema.message_meta_key(aor), schema.message_cursor_key(aor)]

    def store(self, aor: str, device_ids: tuple[str, ...], message: StoredMessage) -> StoreResult:
        """Queue `message` for `device_ids` (ids never hold a comma: they are schema device ids),
        unless the user's queue is full (then nothing is written)."""
        fields = [x for kv in message.fields().items() for x in kv]
        with unavailable_on_error("store_message"):
            code, value = self._store(
                keys=self._keys(aor),
                args=[self.limits.ttl * 1000, self.limits.max_count, self.limits.max_bytes, message.size,
                      len(device_ids), ",".join(device_ids), *fields],
            )
        if int(code) == 1:
            return StoreResult(StoreOutcome.STORED, str(value))
        outcome = StoreOutcome.FULL_COUNT if int(code) == -1 else StoreOutcome.FULL_BYTES
        return StoreResult(outcome, queued=int(value))

    def next_for(self, aor: str, device_id: str) -> StoredMessage | None:
        """The oldest unexpired message queued for the device that it has not acknowledged."""
        keys = self._keys(aor)
        with unavailable_on_error("next_message"):
            found = self._next(keys=[keys[0], keys[2]], args=[device_id, self.limits.ttl * 1000])
        if not found:
            return None
        entry_id, flat = found
        return StoredMessage.decode(str(entry_id), schema.pairs_to_dict(flat))

    def ack(self, aor: str, device_id: str, entry_id: str) -> bool:
        """The device answered 2xx to `entry_id`: never delivered to it again. False when it was
        acknowledged already (a repeated 2xx)."""
        if not _ENTRY_ID.fullmatch(entry_id):
            raise ValueError(f"not a stream entry id: {entry_id[:40]!r}")
        with unavailable_on_error("ack_message"):
            return bool(self._ack(keys=self._keys(aor), args=[device_id, entry_id]))

    def queued(self, aor: str) -> tuple[int, int]:
        """(messages, body bytes) queued for the user (operators, tests)."""
        with unavailable_on_error("queued_messages"):
            pipe = self._r.pipeline(transaction=False)
            pipe.xlen(schema.messages_key(aor))
            pipe.hget(schema.message_meta_key(aor), "bytes")
            count, size = pipe.execute()
        return int(count), int(size or 0)

    # --- one delivery chain per device ------------------------------------------------------------

    @staticmethod
    def lock_value(token: str, target: str) -> str:
        return f"{token}\t{target}"

    def lock(self, aor: str, device_id: str, target: str) -> str | None:
        """A new chain's token towards `target` (the device's binding, tab-free text), or None when a
        chain towards that same binding is in flight. A chain towards another binding (an older
        connection of the phone) is taken over: it stops at its next step."""
        token = secrets.token_hex(8)
        with unavailable_on_error("message_lock"):
            taken = self._claim(keys=[schema.message_lock_key(aor, device_id)],
                                args=[self.lock_value(token, target), target, MESSAGE_LOCK_TTL * 1000])
        return token if taken else None

    def refresh(self, aor: str, device_id: str, token: str, target: str) -> bool:
        """Keep the chain's lock for another MESSAGE_LOCK_TTL; False when it is no longer this chain's."""
        with unavailable_on_error("message_lock"):
            return bool(self._lock(keys=[schema.message_lock_key(aor, device_id)],
                                   args=[self.lock_value(token, target), MESSAGE_LOCK_TTL * 1000]))

    def unlock(self, aor: str, device_id: str, token: str, target: str) -> None:
        with unavailable_on_error("message_lock"):
            self._lock(keys=[schema.message_lock_key(aor, device_id)], args=[self.lock_value(token, target), 0])

    def ask_again(self, aor: str, device_id: str, target: str) -> None:
        """A REGISTER found the device's chain busy: when that chain ends, it starts again towards
        `target` (the fresh binding), so nothing waits for the next REGISTER."""
        with unavailable_on_error("message_again"):
            self._r.set(schema.message_again_key(aor, device_id), target, ex=MESSAGE_LOCK_TTL)

    def take_again(self, aor: str, device_id: str) -> str | None:
        with unavailable_on_error("message_again"):
            value = self._r.getdel(schema.message_again_key(aor, device_id))
        return None if value is None else str(value)
