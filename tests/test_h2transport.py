"""H2Transport against real HTTP/2 servers on loopback: nginx, hypercorn, and a small h2-library
server whose misbehaviour (slow answers, dropped connections, GOAWAY, a low stream limit) we control."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from harness.nginx import Nginx, TlsFiles, nginx_h2, tls_files
from pushlib.h2transport import H2Transport, _PlainEncoder, client_ssl_context, header_tuple, send_request
from tests.support import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nginx() -> Iterator[Nginx]:
    with nginx_h2() as server:
        yield server


@pytest.fixture()
def tls() -> Iterator[TlsFiles]:
    workdir = Path(tempfile.mkdtemp(prefix="pn-h2test-"))
    try:
        yield tls_files(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _url(port: int, path: str) -> httpx.URL:
    return httpx.URL(f"https://127.0.0.1:{port}{path}")


# ---- HPACK: hpack's codec, configured ------------------------------------------------------------


def _recording_encoder(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every header block our connections' encoders produce, in order."""
    blocks: list[bytes] = []
    encode = _PlainEncoder.encode

    def recording(self: _PlainEncoder, headers: Any, huffman: bool = False) -> bytes:
        block = encode(self, headers, huffman)
        blocks.append(block)
        return block

    monkeypatch.setattr(_PlainEncoder, "encode", recording)
    return blocks


def test_header_tuple_types_per_request_values_as_never_indexed() -> None:
    for name in (b":path", b"apns-id", b"apns-expiration", b"apns-collapse-id", b"content-length"):
        assert isinstance(header_tuple(name, b"x"), hpack.NeverIndexedHeaderTuple), name
    for name in (b"authorization", b"apns-topic", b"apns-push-type", b"apns-priority", b"content-type"):
        typed = header_tuple(name, b"x")
        assert type(typed) is hpack.HeaderTuple and typed.indexable and typed == (name, b"x"), name


def test_jwt_indexed_once_per_request_values_never(nginx: Nginx, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _recording_encoder(monkeypatch)
    jwt = hpack.HeaderTuple(b"authorization", b"bearer " + b"j" * 300)
    repeated = [(b"apns-topic", b"com.example.app"), (b"apns-push-type", b"voip"), (b"apns-priority", b"10")]
    sent: list[list[tuple[bytes, bytes]]] = []

    async def main() -> tuple[list[int], list[tuple[bytes, bytes]]]:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        origin = httpx.URL(f"https://127.0.0.1:{nginx.port}")
        try:
            statuses = []
            for i in range(300):  # sequential: the blocks are encoded in request order
                path = b"/3/device/%064x" % i
                headers = [
                    (b"apns-expiration", b"%d" % (1_700_000_000 + i)), (b"apns-id", str(uuid.uuid4()).encode()),
                    jwt, *repeated,
                ]
                sent.append([(b":path", path), *headers])
                response = await transport.request_raw(b"POST", origin, path, headers, b"{}", 5.0)
                statuses.append(response.status)
            assert transport._conn is not None
            return statuses, list(transport._conn._h2.encoder.header_table.dynamic_entries)
        finally:
            await transport.aclose()

    statuses, table = asyncio.run(main())
    assert statuses == [200] * 300
    # The dynamic table holds the repeating headers, each once, and no per-request value.
    authority = (b":authority", b"127.0.0.1:%d" % nginx.port)
    assert sorted(table) == sorted([authority, tuple(jwt), *repeated])
    # The wire decodes (one hpack.Decoder, in order) to what we sent, and the never-indexed flag
    # (the decoder returns such fields as NeverIndexedHeaderTuple) is on the per-request values.
    decoder = hpack.Decoder()
    assert len(blocks) == 300
    for block, expected in zip(blocks, sent, strict=True):
        headers = decoder.decode(block, raw=True)
        assert [tuple(h) for h in headers] == [(b":method", b"POST"), (b":scheme", b"https"), authority, *expected]
        never = {h[0] for h in headers if isinstance(h, hpack.NeverIndexedHeaderTuple)}
        assert never == {b":path", b"apns-id", b"apns-expiration"}
    # From the second push on the JWT is a one-byte reference; literals are not Huffman-coded.
    assert jwt[1] in blocks[0] and all(jwt[1] not in block for block in blocks[1:])
    assert all(expected[0][1] in block for block, expected in zip(blocks, sent, strict=True))
    # 7 one-byte references (method and scheme static; authority, JWT, topic, push type and
    # priority dynamic) + :path (static name, literal value) + two literal-name fields.
    refs = 7
    path_field = 1 + 1 + len(sent[1][0][1])
    expiration_field = 1 + 1 + len(b"apns-expiration") + 1 + 10
    id_field = 1 + 1 + len(b"apns-id") + 1 + 36
    assert len(blocks[1]) == refs + path_field + expiration_field + id_field


def test_httpx_path_keeps_per_request_values_out_of_the_table(nginx: Nginx) -> None:
    async def main() -> list[tuple[bytes, bytes]]:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{nginx.port}") as client:
            for i in range(20):
                response = await client.post(f"/3/device/{i:064x}", headers={"apns-id": f"id-{i}"}, content=b"{}")
                assert response.status_code == 200 and response.headers["apns-id"] == f"id-{i}"
            assert transport._conn is not None
            return list(transport._conn._h2.encoder.header_table.dynamic_entries)

    table = asyncio.run(main())
    names = [name for name, _ in table]
    assert len(names) == len(set(names))  # every indexed header repeated: one entry each
    assert not {b":path", b"apns-id", b"content-length"} & set(names)


# ---- nginx ---------------------------------------------------------------------------------


def test_many_concurrent_requests_share_one_connection(nginx: Nginx) -> None:
    async def main() -> tuple[int, int]:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        semaphore = asyncio.Semaphore(200)
        mismatches = 0

        async def one(i: int) -> None:
            nonlocal mismatches
            async with semaphore:
                response = await send_request(
                    transport, _url(nginx.port, "/3/device/abcd"), {"apns-id": f"id-{i}"}, b"{}", 10.0
                )
                if response.status_code != 200 or response.headers["apns-id"] != f"id-{i}":
                    mismatches += 1

        await asyncio.gather(*(one(i) for i in range(2000)))
        conn = transport._conn
        await transport.aclose()
        assert conn is not None
        return mismatches, conn._h2.highest_outbound_stream_id

    mismatches, last_stream = asyncio.run(main())
    assert mismatches == 0
    assert last_stream == 2 * 2000 - 1  # every request was a stream of the same connection


def test_raw_fast_path_and_tcp_nodelay(nginx: Nginx) -> None:
    async def main() -> tuple[list[tuple[int, bytes | None]], int]:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        origin = httpx.URL(f"https://127.0.0.1:{nginx.port}")
        try:
            responses = await asyncio.gather(*(
                transport.request_raw(b"POST", origin, b"/3/device/ab", [(b"apns-id", b"id-%d" % i)], b"{}", 5.0)
                for i in range(50)
            ))
            assert transport._conn is not None and transport._conn._transport is not None
            sock = transport._conn._transport.get_extra_info("socket")
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            return [(r.status, r.header(b"apns-id")) for r in responses], nodelay
        finally:
            await transport.aclose()

    results, nodelay = asyncio.run(main())
    assert results == [(200, b"id-%d" % i) for i in range(50)]
    assert nodelay


def test_works_as_httpx_client_transport(nginx: Nginx) -> None:
    async def main() -> httpx.Response:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{nginx.port}") as client:
            return await client.post("/3/device/ab12", headers={"apns-id": "abc"}, content=b'{"aps": {}}')

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert response.headers["apns-id"] == "abc"


def test_request_bodies_larger_than_the_flow_control_window(nginx: Nginx) -> None:
    body = b"x" * 100_000  # 30 of these exceed the default 64 KB connection window many times over

    async def main() -> list[int]:
        transport = H2Transport(client_ssl_context(nginx.ca_pem))
        try:
            responses = await asyncio.gather(
                *(send_request(transport, _url(nginx.port, "/3/device/ab"), {}, body, 10.0) for _ in range(30))
            )
        finally:
            await transport.aclose()
        return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * 30


def test_untrusted_server_certificate_is_refused(nginx: Nginx) -> None:
    async def main() -> None:
        transport = H2Transport(client_ssl_context(None))  # system trust store: our test CA is unknown
        try:
            await send_request(transport, _url(nginx.port, "/3/device/ab"), {}, b"{}", 5.0)
        finally:
            await transport.aclose()

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(main())


def test_connection_refused_is_connect_error() -> None:
    port = free_port()

    async def main() -> None:
        transport = H2Transport(client_ssl_context(None))
        await send_request(transport, _url(port, "/"), {}, b"", 5.0)

    with pytest.raises(httpx.ConnectError):
        asyncio.run(main())


# ---- hypercorn: bodies both ways ------------------------------------------------------------


async def _asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/big":
        answer = b"y" * int(scope["query_string"].decode().split("=")[1])
    else:
        answer = json.dumps({"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def _hypercorn(tls: TlsFiles) -> AsyncIterator[int]:
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile = str(tls.cert_path)
    config.keyfile = str(tls.key_path)
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(_asgi_app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_request_and_response_bodies_arrive_intact(tls: TlsFiles) -> None:
    bodies = [bytes([i]) * (150_000 + i) for i in range(12)]

    async def main() -> tuple[list[dict[str, Any]], int]:
        async with _hypercorn(tls) as port:
            transport = H2Transport(client_ssl_context(tls.ca_pem))
            try:
                echoes = await asyncio.gather(
                    *(send_request(transport, _url(port, "/echo"), {}, b, 10.0) for b in bodies)
                )
                big = await send_request(transport, _url(port, "/big?n=3000000"), {}, b"", 10.0)
            finally:
                await transport.aclose()
        return [r.json() for r in echoes], len(big.content)

    echoes, big_len = asyncio.run(main())
    assert echoes == [{"len": len(b), "sha256": hashlib.sha256(b).hexdigest()} for b in bodies]
    assert big_len == 3_000_000


# ---- a controllable h2 server ---------------------------------------------------------------


class _Server:
    """HTTP/2 over TLS with the h2 library. Paths: /ok, /hold (answers after 50 ms),
    /slow (after 2 s), /close (drops the connection), /goaway (refuses this stream by GOAWAY)."""

    def __init__(self, tls: TlsFiles, max_streams: int = 100) -> None:
        self.tls = tls
        self.max_streams = max_streams
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert_path, self.tls.key_path)
        ctx.set_alpn_protocols(["h2"])
        self.port = free_port()
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _ServerProtocol(self), "127.0.0.1", self.port, ssl=ctx
        )


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams}
        )
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.server.refused += 1
            self.flush()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.paths[event.stream_id] = str(dict(event.headers)[":path"])  # type: ignore[index]
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.handle(event.stream_id, self.paths.pop(event.stream_id, ""))
            elif isinstance(event, h2.events.StreamReset):
                self.paths.pop(event.stream_id, None)
        self.flush()

    def handle(self, stream_id: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.server.active += 1
        self.server.max_active = max(self.server.max_active, self.server.active)
        if path == "/close":
            assert self.transport is not None
            self.transport.close()
        elif path == "/goaway":
            self.conn.close_connection(last_stream_id=stream_id - 2)
            self.flush()
        elif path == "/slow":
            loop.call_later(2.0, self.respond, stream_id)
        elif path == "/hold":
            loop.call_later(0.05, self.respond, stream_id)
        else:
            self.respond(stream_id)

    def respond(self, stream_id: int) -> None:
        self.server.active -= 1
        try:
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-stream", str(stream_id))], end_stream=True)
        except h2.exceptions.H2Error:
            return  # the client reset it (timeout) or the connection is gone
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


@asynccontextmanager
async def _server(tls: TlsFiles, max_streams: int = 100) -> AsyncIterator[_Server]:
    server = _Server(tls, max_streams)
    await server.start()
    try:
        yield server
    finally:
        assert server.server is not None
        server.server.close()
        await asyncio.wait_for(server.server.wait_closed(), 5)


def test_server_stream_limit_is_respected(tls: TlsFiles) -> None:
    async def main() -> tuple[list[int], _Server]:
        async with _server(tls, max_streams=3) as server:
            transport = H2Transport(client_ssl_context(tls.ca_pem))
            try:
                responses = await asyncio.gather(
                    *(send_request(transport, _url(server.port, "/hold"), {}, b"", 10.0) for _ in range(20))
                )
            finally:
                await transport.aclose()
            return [r.status_code for r in responses], server

    statuses, server = asyncio.run(main())
    assert statuses == [200] * 20
    assert server.max_active == 3
    assert server.refused == 0


def test_read_timeout_resets_the_stream_and_keeps_the_connection(tls: TlsFiles) -> None:
    async def main() -> tuple[type[BaseException], int, _Server]:
        async with _server(tls) as server:
            transport = H2Transport(client_ssl_context(tls.ca_pem))
            try:
                try:
                    await send_request(transport, _url(server.port, "/slow"), {}, b"", 0.2)
                except httpx.HTTPError as exc:
                    error: type[BaseException] = type(exc)
                after = await send_request(transport, _url(server.port, "/ok"), {}, b"", 5.0)
            finally:
                await transport.aclose()
            return error, after.status_code, server

    error, status, server = asyncio.run(main())
    assert error is httpx.ReadTimeout
    assert status == 200
    assert server.connections == 1


def test_dropped_connection_fails_pending_requests_and_next_request_reconnects(tls: TlsFiles) -> None:
    async def main() -> tuple[list[BaseException | httpx.Response], int, _Server]:
        async with _server(tls) as server:
            transport = H2Transport(client_ssl_context(tls.ca_pem))
            try:
                pending = [
                    asyncio.ensure_future(send_request(transport, _url(server.port, "/slow"), {}, b"", 10.0))
                    for _ in range(3)
                ]
                await asyncio.sleep(0.1)  # the slow ones are in flight when the server drops the connection
                dropped = await asyncio.gather(
                    send_request(transport, _url(server.port, "/close"), {}, b"", 10.0), *pending,
                    return_exceptions=True,
                )
                after = await send_request(transport, _url(server.port, "/ok"), {}, b"", 5.0)
            finally:
                await transport.aclose()
            return dropped, after.status_code, server

    dropped, status, server = asyncio.run(main())
    assert [type(r) for r in dropped] == [httpx.RemoteProtocolError] * 4
    assert status == 200
    assert server.connections == 2


def test_goaway_fails_unprocessed_stream_and_next_request_reconnects(tls: TlsFiles) -> None:
    async def main() -> tuple[BaseException | None, int, _Server]:
        async with _server(tls) as server:
            transport = H2Transport(client_ssl_context(tls.ca_pem))
            error = None
            try:
                await send_request(transport, _url(server.port, "/ok"), {}, b"", 5.0)
                try:
                    await send_request(transport, _url(server.port, "/goaway"), {}, b"", 5.0)
                except httpx.HTTPError as exc:
                    error = exc
                after = await send_request(transport, _url(server.port, "/ok"), {}, b"", 5.0)
            finally:
                await transport.aclose()
            return error, after.status_code, server

    error, status, server = asyncio.run(main())
    assert isinstance(error, httpx.RemoteProtocolError)
    assert "GOAWAY" in str(error)
    assert status == 200
    assert server.connections == 2
