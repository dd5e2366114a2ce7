"""A lean HTTP/2 transport for httpx: one TLS connection, many concurrent streams.

httpx's own HTTP/2 path (httpcore) is general-purpose and slow for a push sender that
fires thousands of small requests down one connection. `H2Transport` keeps httpx as the
client API and does the connection glue itself on top of the `h2` state machine:

- one asyncio TLS connection per transport (ALPN "h2", the caller's SSL context), opened
  lazily and reopened by the next request after GOAWAY or connection loss;
- the asyncio Protocol callback feeds received bytes to h2 and resolves per-stream futures
  (no reader task hop per frame);
- outgoing frames are coalesced: whatever h2 has to send is written once per loop turn;
- flow control: a 16 MB receive window so responses never stall, and request bodies wait
  for the server's window when it is exhausted;
- the server's MAX_CONCURRENT_STREAMS is respected: requests wait for a free stream slot
  (bounded by the pool timeout);
- timeouts come from httpx's timeout extension (connect / pool / read);
- failures surface as httpx exceptions: ConnectError / ConnectTimeout when connecting,
  PoolTimeout waiting for a slot, ReadTimeout waiting for the response, RemoteProtocolError
  on GOAWAY, stream reset or connection loss.

A transport serves one origin (scheme https, host, port): the first request fixes it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import httpx
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE

from pushlib.logutil import get_logger

log = get_logger(__name__)

CONNECTION_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW = 1024 * 1024
DEFAULT_TIMEOUT = 10.0

# Per-request unique values: keep them out of the HPACK dynamic table so it keeps the
# repeated ones (authorization, apns-topic ...) instead of churning through ids and tokens.
_UNINDEXED_HEADERS = frozenset(
    {b":path", b"apns-id", b"apns-expiration", b"apns-collapse-id", b"content-length"}
)

# Connection-specific headers are forbidden in HTTP/2 (RFC 9113 §8.2.2); Host becomes :authority.
_DROPPED_HEADERS = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def client_ssl_context(ca_pem: str | None = None) -> ssl.SSLContext:
    """A verifying client context offering ALPN h2.

    With `ca_pem` the context trusts that CA only (a private test or sandbox provider);
    without it the system trust store. Verification is always on.
    """
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    return ctx


def split_host(host: str, default_port: int = 443) -> tuple[str, int]:
    """("host", port) from "host" or "host:port" (IPv6 literals in brackets)."""
    if host.startswith("["):
        end = host.index("]")
        rest = host[end + 1 :]
        return host[1:end], int(rest[1:]) if rest.startswith(":") else default_port
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return host, default_port


def origin_url(host: str) -> str:
    """"https://host:port" for "host" or "host:port" (port 443 by default)."""
    name, port = split_host(host)
    return f"https://[{name}]:{port}" if ":" in name else f"https://{name}:{port}"


async def send_request(
    transport: httpx.AsyncBaseTransport,
    url: httpx.URL,
    headers: dict[str, str],
    body: bytes,
    timeout: float,
) -> httpx.Response:
    """POST through `transport` directly, with `timeout` for each phase (connect, pool, read).

    The push clients use this instead of httpx.AsyncClient: the client's per-request
    machinery (cookie jar, auth and redirect flows, header merging) cost ~100 µs per push,
    about a quarter of the budget at the rates we target. Requests, responses and errors
    are still httpx's own types.
    """
    request = httpx.Request(
        "POST",
        url,
        headers=headers,
        content=body,
        extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
    )
    return await transport.handle_async_request(request)


# ---- HPACK: the hpack library, configured ---------------------------------------------------
#
# h2 compresses headers with hpack's Encoder and decodes responses with its Decoder (their
# subclasses below, which keep hpack's tables, limits and errors and remember what repeats).
# h2 hands our header tuples to `encoder.encode()` keeping their class, and hpack reads the
# indexing decision from that class:
# - HeaderTuple: values that repeat on every push (pseudo headers, the bearer JWT, apns-topic,
#   apns-push-type, apns-priority) enter the dynamic table once and then cost one byte each;
# - NeverIndexedHeaderTuple: per-request values (:path with the device token, apns-id,
#   expiration ...) stay out of the table, so they never evict the repeating ones (their
#   names are still referenced by index when the static table has them).
# Literals are sent without Huffman coding: hpack's Huffman encoder is pure Python and the
# CPU per push matters more to us than a few bytes on the wire.


def header_tuple(name: bytes, value: bytes) -> hpack.HeaderTuple:
    """(name, value) typed for hpack: never indexed if the value is per-request, else indexable."""
    if name in _UNINDEXED_HEADERS:
        return hpack.NeverIndexedHeaderTuple(name, value)
    return hpack.HeaderTuple(name, value)


# Memo bounds: the HPACK memos are meant for what repeats (header fields, names, response
# strings); flooded with ever-new values they start over.
_MEMO_MAX = 1024


class _PlainEncoder(hpack.Encoder):
    """hpack's Encoder with Huffman coding off (h2 calls `encode(headers)` with the default on),
    and memoised. After the first pushes every block is the same few indexed references plus a
    few never-indexed literals, yet hpack searches its tables for every field of every block
    (about a tenth of a push's CPU). While the dynamic table is unchanged a field's encoding is
    too, so this remembers each indexable field's bytes and each never-indexed name's prefix, and
    forgets them all whenever hpack changes the table (a field newly indexed, a size update).
    The blocks are what hpack itself would encode, except that a never-indexed value that happens
    to equal a table entry stays a literal (valid HPACK; our per-request values never do)."""

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[tuple[bytes, bytes], bytes] = {}  # indexable (name, value) -> its field
        self._names: dict[bytes, bytes] = {}  # never-indexed name -> its field before the value length
        self._state: tuple[int, object] = self._table_state()

    def _table_state(self) -> tuple[int, object]:
        entries = self.header_table.dynamic_entries
        # hpack inserts a new tuple at the left for every field it indexes: its identity (we hold
        # a reference, so no later tuple can reuse it) plus the length tell a changed table.
        return len(entries), entries[0] if entries else None

    def _table_changed(self) -> bool:
        length, newest = self._table_state()
        return length != self._state[0] or newest is not self._state[1]

    def _forget(self) -> None:
        self._fields = {}
        self._names = {}
        self._state = self._table_state()

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        if self.header_table.resized:  # a size update leads this block: hpack's own path
            block = super().encode(headers, huffman=False)
            self._forget()
            return block
        if self._table_changed():
            self._forget()
        if len(self._fields) + len(self._names) > _MEMO_MAX:
            self._forget()
        out: list[bytes] = []
        for header in headers:
            name, value = header[0], header[1]
            if not isinstance(name, bytes):
                name = bytes(name, "utf-8") if isinstance(name, str) else bytes(name)
            if not isinstance(value, bytes):
                value = bytes(value, "utf-8") if isinstance(value, str) else bytes(value)
            if isinstance(header, hpack.HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and bool(header[2])
            if not sensitive:
                field = self._fields.get((name, value))
                if field is None:
                    field = self.add((name, value), False, huffman=False)
                    if self._table_changed():  # newly indexed: every dynamic index moved
                        self._forget()
                    else:
                        self._fields[(name, value)] = field
            else:
                size = len(value)
                prefix = self._names.get(name) if size < 127 else None
                if prefix is not None:
                    field = prefix + bytes((size,)) + value
                else:
                    field = self.add((name, value), True, huffman=False)  # never changes the table
                    tail = bytes((size,)) + value if size < 127 else b""
                    # a never-indexed literal (0001xxxx), raw value with a one-byte length
                    if tail and field[0] & 0xF0 == 0x10 and field.endswith(tail):
                        self._names[name] = field[: len(field) - len(tail)]
            out.append(field)
        return b"".join(out)


# The HPACK Huffman code walked a byte at a time: (state << 8 | byte) -> (next state, bytes
# emitted, whether a string may end there), derived on first use from hpack's nibble table (the
# pairs real header values reach are a few hundred; all of them would be 65,536). Half the loop
# turns of hpack's own decoder, which walks nibbles.
_HUFFMAN_STEPS: dict[int, tuple[int, bytes, bool]] = {}
# An HPACK integer longer than this (prefix byte included) is an attack or garbage (as hpack).
_VARINT_MAX_BYTES = 5


def _huffman_step(state: int, byte: int) -> tuple[int, bytes, bool]:
    emitted = bytearray()
    flags = 0
    for nibble in (byte >> 4, byte & 0x0F):
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
        if flags & HUFFMAN_FAIL:
            raise hpack.HPACKDecodingError("Invalid Huffman string")
        if flags & HUFFMAN_EMIT_SYMBOL:
            emitted.append(symbol)
    return state, bytes(emitted), bool(flags & HUFFMAN_COMPLETE)


def huffman_decode(data: bytes) -> bytes:
    """An HPACK Huffman string decoded (what `hpack.huffman_table.decode_huffman` returns, and
    the same HPACKDecodingError for an invalid or incomplete one)."""
    steps = _HUFFMAN_STEPS
    state = 0
    complete = True
    out: list[bytes] = []
    for byte in data:
        key = state << 8 | byte
        step = steps.get(key)
        if step is None:
            step = steps[key] = _huffman_step(state, byte)
        state, emitted, complete = step
        if emitted:
            out.append(emitted)
    if not complete:
        raise hpack.HPACKDecodingError("Incomplete Huffman string")
    return b"".join(out)


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """The HPACK integer at `data[pos]` with a `prefix_bits` prefix: (value, bytes it took)."""
    limit = (1 << prefix_bits) - 1
    number = data[pos] & limit
    if number < limit:
        return number, 1
    shift = 0
    used = 1
    try:
        while True:
            byte = data[pos + used]
            used += 1
            number += (byte & 0x7F) << shift
            if byte < 0x80:
                return number, used
            shift += 7
            if used >= _VARINT_MAX_BYTES:
                raise hpack.HPACKDecodingError("HPACK integer representation too long")
    except IndexError:
        raise hpack.HPACKDecodingError("Truncated HPACK integer") from None


class _MemoDecoder(hpack.Decoder):
    """hpack's Decoder, with the block walked in one loop and Huffman-coded strings memoised.

    Decoding the provider's responses was a fifth of a push's CPU, half of it Huffman-decoding
    literals that repeat (header names sent as literals, nginx's `server`, `date`,
    `content-type`); the memo answers those from a dict, and `huffman_decode` halves the cost
    of the rest (the per-push `apns-id`). The table, its limits and the errors are hpack's
    (`HeaderTable`, `max_header_list_size`, `max_allowed_table_size`, HPACKDecodingError and
    its kin), so h2 sees the same decoder. `raw=False` (never used by h2 here) is hpack's path."""

    def __init__(self) -> None:
        super().__init__()
        self._strings: dict[bytes, bytes] = {}  # Huffman-coded literal -> its bytes

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """The string literal at `data[pos]`: (its bytes, the position after it)."""
        length, used = _integer(data, pos, 7)
        start = pos + used
        end = start + length
        if end > len(data):
            raise hpack.HPACKDecodingError("Truncated header block")
        coded = data[start:end]
        if not data[pos] & 0x80:
            return coded, end
        plain = self._strings.get(coded)
        if plain is None:
            plain = huffman_decode(coded)
            if len(self._strings) >= _MEMO_MAX:
                self._strings.clear()
            self._strings[coded] = plain
        return plain, end

    def decode(self, data: bytes, raw: bool = False) -> list[hpack.HeaderTuple]:
        if not raw:
            return list(super().decode(data, raw))
        if not isinstance(data, bytes):
            data = bytes(data)
        table = self.header_table
        headers: list[hpack.HeaderTuple] = []
        inflated = 0
        pos = 0
        end = len(data)
        try:
            while pos < end:
                first = data[pos]
                if first & 0x80:  # indexed field
                    index, used = _integer(data, pos, 7)
                    pos += used
                    name, value = table.get_by_index(index)
                    header = hpack.HeaderTuple(name, value)
                elif first & 0x20 and not first & 0x40:  # dynamic table size update
                    if headers:
                        raise hpack.HPACKDecodingError("Table size update not at the start of the block")
                    size, used = _integer(data, pos, 5)
                    pos += used
                    if size > self.max_allowed_table_size:
                        raise hpack.InvalidTableSizeError("Encoder exceeded max allowable table size")
                    self.header_table_size = size
                    continue
                else:  # literal: incremental indexing (01), without (0000) or never (0001)
                    indexing = bool(first & 0x40)
                    index, used = _integer(data, pos, 6 if indexing else 4)
                    if index:
                        name = table.get_by_index(index)[0]
                        pos += used
                    else:
                        name, pos = self._string(data, pos + 1)
                    value, pos = self._string(data, pos)
                    if indexing:
                        table.add(name, value)
                        header = hpack.HeaderTuple(name, value)
                    elif first & 0x10:
                        header = hpack.NeverIndexedHeaderTuple(name, value)
                    else:
                        header = hpack.HeaderTuple(name, value)
                headers.append(header)
                inflated += 32 + len(header[0]) + len(header[1])
                if inflated > self.max_header_list_size:
                    raise hpack.OversizedHeaderListError(
                        f"A header list larger than {self.max_header_list_size} has been received")
        except IndexError:
            raise hpack.HPACKDecodingError("Truncated header block") from None
        if self.header_table_size > self.max_allowed_table_size:
            raise hpack.InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers


class RawResponse:
    """One request/response exchange on the fast path: `status`, the response `headers`
    (pseudo headers dropped, names as the server sent them: lower case in HTTP/2) and the
    `body` chunks. `header()` looks one up without building an httpx.Headers."""

    __slots__ = ("body", "done", "headers", "status", "timer", "window_waiter")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.window_waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content(self) -> bytes:
        return b"".join(self.body)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: h2 state, the socket, and the open streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # We build headers ourselves (lower-case names, no connection headers):
            # skipping h2's per-request validation keeps the hot path short.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        # A fresh connection's encoder and decoder have empty tables: swapping them before any
        # frame is safe.
        self._h2.encoder = _PlainEncoder()
        decoder = _MemoDecoder()
        decoder.max_header_list_size = self._h2.decoder.max_header_list_size
        self._h2.decoder = decoder
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, RawResponse] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._max_streams = 100  # until the server's SETTINGS say otherwise
        self._flush_scheduled = False
        self._write_paused: asyncio.Future[None] | None = None
        self._settings_received: asyncio.Future[None] = loop.create_future()
        self.closed = False  # no new streams may start here (GOAWAY, loss, stream ids exhausted)
        self.error: Exception | None = None

    # ---- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(httpx.RemoteProtocolError(f"HTTP/2 protocol error: {exc}"))
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        streams = self._streams
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.body.append(event.data)
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._on_headers(stream, event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._finish(event.stream_id, stream, None)
            elif isinstance(event, h2.events.StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    reset = httpx.RemoteProtocolError(f"stream reset by server (code {event.error_code})")
                    self._finish(event.stream_id, stream, reset)
            elif isinstance(event, h2.events.WindowUpdated):
                self._wake_window_waiters()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._on_settings(event)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._on_goaway(event)
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = f"connection lost: {exc}" if exc else "connection closed by server"
        self._fail(httpx.RemoteProtocolError(reason))
        if not self._settings_received.done():
            self._settings_received.set_exception(httpx.ConnectError(reason))
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    def pause_writing(self) -> None:
        if self._write_paused is None or self._write_paused.done():
            self._write_paused = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    # ---- event handlers ------------------------------------------------------------------

    def _on_headers(self, stream: RawResponse, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b":status":
                stream.status = int(value)
            elif not name.startswith(b":"):
                stream.headers.append((name, value))

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
        if changed is not None:
            self._max_streams = max(1, min(int(changed.new_value), 2**31))
            self._wake_slot_waiters()
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._wake_window_waiters()
        if not self._settings_received.done():
            self._settings_received.set_result(None)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.closed = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        exc = httpx.RemoteProtocolError(f"server sent GOAWAY (error code {event.error_code})")
        # Streams above last_stream_id were never processed; the rest may still complete.
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last or event.error_code != 0:
                self._finish(stream_id, stream, exc)
        self._wake_slot_waiters()
        if not self._streams and self._transport is not None:
            self._transport.close()

    # ---- stream bookkeeping ---------------------------------------------------------------

    def _finish(self, stream_id: int, stream: RawResponse, exc: Exception | None) -> None:
        del self._streams[stream_id]
        if stream.timer is not None:
            stream.timer.cancel()
        if not stream.done.done():
            if exc is None:
                stream.done.set_result(None)
            else:
                stream.done.set_exception(exc)
        if stream.window_waiter is not None and not stream.window_waiter.done():
            stream.window_waiter.set_result(None)
        if self._slot_waiters:
            self._wake_slot_waiters()
        if self.closed and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        """The connection is unusable: fail every open stream and every waiter."""
        self.closed = True
        if self.error is None:
            self.error = exc
        for stream_id, stream in list(self._streams.items()):
            self._finish(stream_id, stream, exc)
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        free = len(self._slot_waiters) if self.closed else self._max_streams - len(self._streams)
        while free > 0 and self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _wake_window_waiters(self) -> None:
        for stream in self._streams.values():
            waiter = stream.window_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def _expire(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.timer = None
        self._reset(stream_id)
        self._finish(stream_id, stream, httpx.ReadTimeout("no response from the server in time"))

    def _reset(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.H2Error:
            return  # already closed on the h2 side
        self._schedule_flush()

    # ---- public API ----------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Wait for the server's first SETTINGS, so MAX_CONCURRENT_STREAMS is known before we send."""
        await self._settings_received

    def close(self) -> None:
        self._fail(httpx.RemoteProtocolError("connection closed by client"))
        if self._transport is not None:
            try:
                self._h2.close_connection()
                self._flush()
            except h2.exceptions.H2Error:
                pass
            self._transport.close()

    async def request(
        self,
        headers: list[hpack.HeaderTuple],
        body: bytes,
        read_timeout: float | None,
        pool_timeout: float | None,
    ) -> RawResponse:
        """Send one request and wait for its complete response; raises httpx exceptions."""
        if len(self._streams) >= self._max_streams:
            await self._wait_slot(pool_timeout)
        if self.closed:
            raise self.error or httpx.RemoteProtocolError("connection is closing")
        if self._write_paused is not None and not self._write_paused.done():
            await self._write_paused
        h2conn = self._h2
        try:
            stream_id = h2conn.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.closed = True
            raise httpx.RemoteProtocolError("stream ids exhausted on this connection") from None
        stream = RawResponse(self._loop.create_future())
        self._streams[stream_id] = stream
        if read_timeout is not None:
            stream.timer = self._loop.call_later(read_timeout, self._expire, stream_id)
        try:
            h2conn.send_headers(stream_id, headers, end_stream=not body)
            if body:
                size = len(body)
                if size <= h2conn.max_outbound_frame_size and size <= h2conn.local_flow_control_window(stream_id):
                    h2conn.send_data(stream_id, body, end_stream=True)  # the usual push: one frame
                else:
                    await self._send_body(stream_id, stream, body)
            if len(self._streams) == 1:
                self._flush()  # alone on the connection: nothing to coalesce with, so no loop turn of delay
            else:
                self._schedule_flush()
            await stream.done
        except asyncio.CancelledError:
            self._abandon(stream_id, stream)
            raise
        except h2.exceptions.H2Error as exc:
            self._abandon(stream_id, stream)
            raise httpx.RemoteProtocolError(f"HTTP/2 error while sending: {exc}") from exc
        return stream

    def _abandon(self, stream_id: int, stream: RawResponse) -> None:
        """Forget a stream its caller gave up on (cancelled, or h2 refused to send it)."""
        if stream_id in self._streams:
            stream.done.cancel()
            self._reset(stream_id)
            self._finish(stream_id, stream, None)

    async def _wait_slot(self, timeout: float | None) -> None:
        waiter = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await waiter
                    if self.closed or len(self._streams) < self._max_streams:
                        return
                    waiter = self._loop.create_future()
                    self._slot_waiters.appendleft(waiter)
        except TimeoutError:
            raise httpx.PoolTimeout("no free HTTP/2 stream slot in time") from None
        finally:
            if not waiter.done():
                waiter.cancel()
                self._slot_waiters.remove(waiter)
            elif not waiter.cancelled() and len(self._streams) < self._max_streams:
                # We were woken but are leaving (timeout/cancel): pass the slot on.
                self._wake_slot_waiters()

    async def _send_body(self, stream_id: int, stream: RawResponse, body: bytes) -> None:
        h2conn = self._h2
        view = memoryview(body)
        while view:
            window = h2conn.local_flow_control_window(stream_id)
            if window <= 0:
                stream.window_waiter = self._loop.create_future()
                self._schedule_flush()
                await stream.window_waiter
                stream.window_waiter = None
                if stream_id not in self._streams:
                    return  # finished (reset/timeout) while waiting; `done` carries the error
                continue
            size = min(window, h2conn.max_outbound_frame_size, len(view))
            chunk, view = view[:size], view[size:]
            h2conn.send_data(stream_id, chunk.tobytes(), end_stream=not view)


class H2Transport(httpx.AsyncBaseTransport):
    """An httpx transport over one persistent HTTP/2 connection to one origin.

    `ssl_context` is used as given (ALPN h2 is added); it decides trust and client certs.
    `server_hostname` overrides the SNI / certificate name (default: the URL host).
    """

    def __init__(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        ssl_context.set_alpn_protocols(["h2"])
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._origin: tuple[str, int] | None = None
        self._authority = b""
        self._origin_url: httpx.URL | None = None
        self._pseudo: dict[bytes, list[hpack.HeaderTuple]] = {}
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    def _check_origin(self, url: httpx.URL) -> None:
        if url.scheme != "https":
            raise httpx.UnsupportedProtocol("H2Transport speaks HTTP/2 over TLS only")
        port = url.port or 443
        if self._origin is None:
            self._origin = (url.host, port)
            self._authority = url.netloc
            self._pseudo = {}
        elif self._origin != (url.host, port):
            raise httpx.UnsupportedProtocol(f"this transport serves {self._origin[0]}:{self._origin[1]} only")

    def _pseudo_headers(self, method: bytes) -> list[hpack.HeaderTuple]:
        pseudo = self._pseudo.get(method)
        if pseudo is None:
            pseudo = self._pseudo[method] = [
                hpack.HeaderTuple(b":method", method),
                hpack.HeaderTuple(b":scheme", b"https"),
                hpack.HeaderTuple(b":authority", self._authority),
            ]
        return pseudo

    async def request_raw(
        self,
        method: bytes,
        origin: httpx.URL,
        path: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> RawResponse:
        """The push fast path: one request without httpx.Request/Response objects.

        `origin` is the https URL of the server (its path is ignored), `path` the raw request
        path, `headers` lower-case (name, value) pairs without connection-specific ones: an
        `hpack.HeaderTuple` / `NeverIndexedHeaderTuple` is sent as typed (a caller can build
        a repeating one once), a plain tuple is typed by `header_tuple`; `timeout` applies to
        each phase (connect, pool, read). Raises the same httpx
        exceptions as `handle_async_request`. Building httpx's Request, URL, Headers and
        Response cost about a third of a push's CPU time, hence this path.
        """
        if origin is not self._origin_url:
            self._check_origin(origin)
            self._origin_url = origin
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect(timeout)
        block = [*self._pseudo_headers(method), hpack.NeverIndexedHeaderTuple(b":path", path)]
        for header in headers:
            block.append(header if isinstance(header, hpack.HeaderTuple) else header_tuple(*header))
        return await conn.request(block, body, timeout, timeout)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        self._check_origin(url)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect(timeouts.get("connect", DEFAULT_TIMEOUT))
        headers = [
            *self._pseudo_headers(request.method.encode()), hpack.NeverIndexedHeaderTuple(b":path", url.raw_path)
        ]
        for name, value in request.headers.raw:
            name = name.lower()
            if name not in _DROPPED_HEADERS:
                headers.append(header_tuple(name, value))
        stream = await conn.request(
            headers, request.content, timeouts.get("read", DEFAULT_TIMEOUT), timeouts.get("pool")
        )
        return httpx.Response(
            stream.status,
            headers=stream.headers,
            content=stream.content,
            extensions={"http_version": b"HTTP/2"},
            request=request,
        )

    async def _connect(self, timeout: float | None) -> _Connection:
        """The live connection, opening one (shared by all concurrent callers) if needed."""
        if self._closed:
            raise httpx.ConnectError("transport is closed")
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            opening = self._connecting
            try:
                conn = await self._open(timeout)
            except BaseException as exc:
                self._connecting = None
                if isinstance(exc, asyncio.CancelledError):
                    opening.cancel()
                else:
                    opening.set_exception(exc)
                    opening.exception()  # mark retrieved: other waiters may not exist
                raise
            self._connecting = None
            old, self._conn = self._conn, conn
            if old is not None and not old.closed:
                old.close()
            opening.set_result(conn)
            return conn
        return await asyncio.shield(self._connecting)

    async def _open(self, timeout: float | None) -> _Connection:
        assert self._origin is not None
        host, port = self._origin
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None

        def factory() -> _Connection:
            nonlocal conn
            conn = _Connection(loop)
            return conn

        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    factory, host, port, ssl=self._ssl, server_hostname=self._server_hostname or host
                )
                ssl_object = transport.get_extra_info("ssl_object")
                alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
                if alpn != "h2":
                    transport.close()
                    raise httpx.ConnectError(f"{host}:{port} did not negotiate HTTP/2 (ALPN {alpn!r})")
                assert conn is not None
                # asyncio sets TCP_NODELAY already; say so explicitly: a push is one small write
                # and must not wait for the previous one's ACK (Nagle).
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await conn.wait_ready()
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        log.debug("h2 connection open to %s:%s", host, port)
        return conn

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

