"""The sandbox stops at once on SIGTERM, also while a client keeps an HTTP/2 connection open: it
sends GOAWAY, closes the connection and exits within 2 s."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events
import pytest

from pushsandbox.process import sandbox_process

STOP_LIMIT = 2.0


def _h2_client(port: int, ca_pem: str) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    context = ssl.create_default_context(cadata=ca_pem)
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1")
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _events(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, until: type, limit: float) -> list[object]:
    """Read events until one of type `until` arrived, the peer closed, or `limit` seconds passed."""
    seen: list[object] = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            data = sock.recv(65535)
        except (TimeoutError, ssl.SSLError, OSError):
            break
        if not data:
            break
        seen += conn.receive_data(data)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if any(isinstance(e, until) for e in seen):
            break
    return seen


@pytest.mark.timeout(60)
def test_sigterm_with_an_open_h2_connection_sends_goaway_and_exits_at_once() -> None:
    with sandbox_process() as sb:
        sock, conn = _h2_client(sb.port, sb.ca_pem)
        try:
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "GET"), (":scheme", "https"), (":authority", sb.host),
                                       (":path", "/_sandbox/stats")], end_stream=True)
            sock.sendall(conn.data_to_send())
            answered = _events(sock, conn, h2.events.StreamEnded, 10)
            assert any(isinstance(e, h2.events.ResponseReceived) for e in answered)
            # The connection stays open and idle, as an APNs client keeps it; the client reads
            # nothing while the sandbox stops (it never answers the TLS close itself).
            started = time.monotonic()
            os.kill(sb.proc.pid, signal.SIGTERM)
            while sb.proc.poll() is None and time.monotonic() - started < 30:
                time.sleep(0.02)
            took = time.monotonic() - started
            print(f"sandbox exited {took:.2f} s after SIGTERM")
            assert sb.proc.returncode == 0
            assert took < STOP_LIMIT
            # What the sandbox wrote before it went: a GOAWAY.
            sock.settimeout(2)
            closing = _events(sock, conn, h2.events.ConnectionTerminated, 2)
            assert any(isinstance(e, h2.events.ConnectionTerminated) for e in closing), closing
        finally:
            sock.close()
