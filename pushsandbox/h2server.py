"""A lean HTTP/2 connection handler (the `h2` library on asyncio streams) for the sandbox.

Hypercorn serves HTTP/2 correctly but spends most of its per-request time in its priority
tree and per-stream tasks; APNs clients push thousands of streams per second over one
connection, so HTTP/2 connections (ALPN "h2") are served here instead, with the same
`dispatch` as the ASGI app. Requests are small: each is answered once its stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from pushsandbox.state import Reply

log = logging.getLogger("pushsandbox")

Dispatch = Callable[[dict[str, Any], bytes], Reply]

MAX_CONCURRENT_STREAMS = 1000
MAX_REQUEST_BODY = 64 * 1024
_READ_SIZE = 256 * 1024
# How long a closing connection waits for the client's side of the TLS close before dropping it:
# an idle HTTP/2 client (an APNs client between pushes) never answers it, and asyncio would wait
# 30 s (its SSL shutdown timeout).
CLOSE_TIMEOUT = 0.5


async def close_writer(writer: asyncio.StreamWriter, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close a connection, flushing what was written (GOAWAY); abort it when the peer does not
    complete the close within `timeout` seconds."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except TimeoutError:
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # a connection already reset: nothing left to close
        writer.transport.abort()


class H2ServerConnection:
    """Serves one HTTP/2 connection until the peer goes away or the task is cancelled."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dispatch: Dispatch,
                 client: tuple[str, int] | None) -> None:
        self.reader, self.writer, self.dispatch, self.client = reader, writer, dispatch, client
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2**16,
            },
        )
        self.requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.pending: dict[int, bytes] = {}  # response bodies waiting for flow-control window
        self.delayed: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        self.conn.initiate_connection()
        self._flush()
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.info("HTTP/2 protocol error from %s: %s", self.client, exc)
                    self._flush()
                    return
                for event in events:
                    if not self._on_event(event):
                        self._flush()
                        return
                self._flush()
                await self.writer.drain()
        finally:
            for task in self.delayed:
                task.cancel()
            with contextlib.suppress(Exception):
                self.conn.close_connection()  # GOAWAY: the client knows to reconnect elsewhere
                self._flush()
            await close_writer(self.writer)

    def _on_event(self, event: h2.events.Event) -> bool:
        """Handle one event; False when the connection is over."""
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = (list(event.headers), bytearray())
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            request = self.requests.get(event.stream_id)
            if request is not None:
                request[1].extend(event.data)
                if len(request[1]) > MAX_REQUEST_BODY:
                    del self.requests[event.stream_id]
                    self._respond(event.stream_id, Reply(413, body=b'{"reason":"PayloadTooLarge"}'))
        elif isinstance(event, h2.events.StreamEnded):
            request = self.requests.pop(event.stream_id, None)
            if request is not None:
                self._answer(event.stream_id, request[0], bytes(request[1]))
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            self.pending.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in [event.stream_id] if event.stream_id else list(self.pending):
                if stream_id in self.pending:
                    self._send_body(stream_id, self.pending.pop(stream_id))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream_id in list(self.pending):
                self._send_body(stream_id, self.pending.pop(stream_id))
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                regular.append((name, value))
        if b":authority" in pseudo and not any(name == b"host" for name, _ in regular):
            regular.append((b"host", pseudo[b":authority"]))  # as HTTP/1.1 servers see it (ASGI does this too)
        path, _, query = pseudo.get(b":path", b"/").decode("latin-1").partition("?")
        scope = {
            "type": "http",
            "method": pseudo.get(b":method", b"").decode("latin-1"),
            "path": path,
            "query_string": query.encode("latin-1"),
            "headers": regular,
            "client": self.client,
        }
        try:
            reply = self.dispatch(scope, body)
        except Exception:
            log.exception("sandbox handler failed")
            reply = Reply(500, body=b'{"reason":"InternalServerError"}')
        if reply.delay > 0:
            task = asyncio.get_running_loop().create_task(self._respond_later(stream_id, reply))
            self.delayed.add(task)
            task.add_done_callback(self.delayed.discard)
        else:
            self._respond(stream_id, reply)

    async def _respond_later(self, stream_id: int, reply: Reply) -> None:
        await asyncio.sleep(reply.delay)
        self._respond(stream_id, reply)
        self._flush()

    def _respond(self, stream_id: int, reply: Reply) -> None:
        headers = [(b":status", str(reply.status).encode())]
        headers += [(k.encode(), v.encode()) for k, v in reply.headers]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not reply.body)
            if reply.body:
                self._send_body(stream_id, reply.body)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the client reset the stream or left: nothing to answer

    def _send_body(self, stream_id: int, data: bytes) -> None:
        try:
            while data:
                window = min(self.conn.local_flow_control_window(stream_id),
                             self.conn.max_outbound_frame_size)
                if window <= 0:
                    self.pending[stream_id] = data
                    return
                chunk, data = data[:window], data[window:]
                self.conn.send_data(stream_id, chunk, end_stream=not data)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.pending.pop(stream_id, None)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
