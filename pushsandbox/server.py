"""The sandbox's HTTP server: TLS with ALPN, HTTP/2 and HTTP/1.1 on one port.

`SandboxApp.dispatch` routes a complete request to the APNs, FCM, OAuth2 or control handler
(plain functions returning a `Reply`). HTTP/2 connections are served by the lean
`h2server`; HTTP/1.1 ones (google-auth's token fetch through `requests`, curl) by hypercorn
through a small ASGI app. Hypercorn's ASGI scope does not carry the TLS client certificate,
so `serve` accepts connections itself and binds each one to its verified certificate
(APNs certificate auth needs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework

from pushsandbox import apns, fcm
from pushsandbox.certs import SandboxPki, bundle_id_of
from pushsandbox.h2server import H2ServerConnection
from pushsandbox.state import Behaviour, Reply, SandboxState

log = logging.getLogger("pushsandbox")

CONTROL_PREFIX = "/_sandbox/"
MAX_BODY = 64 * 1024
# At stop, how long open connections get to send GOAWAY and close before they are dropped.
STOP_GRACE = 1.0

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadRequest(ValueError):
    """A control-API request the sandbox cannot act on (answered 400 with the message)."""


def _json(status: int, value: Any) -> Reply:
    return Reply(status, (("content-type", "application/json"),), json.dumps(value).encode())


def _fields(body: bytes, required: dict[str, type]) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("body is not JSON") from exc
    if not isinstance(value, dict):
        raise BadRequest("body must be a JSON object")
    for name, kind in required.items():
        if not isinstance(value.get(name), kind):
            raise BadRequest(f"{name} ({kind.__name__}) is required")
    return value


@dataclass
class SandboxApp:
    """All request handling; one instance per sandbox process."""

    state: SandboxState
    pki: SandboxPki
    public_url: str
    open_control: bool = False

    async def handle(self, scope: Scope, receive: Receive, send: Send, cert_bundle: str | None) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                break
            if not message.get("more_body", False):
                break
        reply = self.dispatch(scope, bytes(body), cert_bundle)
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        headers = [(k.encode(), v.encode()) for k, v in reply.headers]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def dispatch(self, scope: Scope, body: bytes, cert_bundle: str | None) -> Reply:
        """Route one complete request to its handler."""
        method: str = scope["method"]
        path: str = scope["path"]
        headers: dict[str, str] = {}
        duplicated: set[str] = set()
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            if name in headers:
                duplicated.add(name)
            headers[name] = raw_value.decode("latin-1")
        if path.startswith(apns.PATH_PREFIX):
            return apns.handle_apns(
                self.state, method, path, headers, frozenset(duplicated), body, cert_bundle
            )
        if fcm.is_send_path(path):
            return fcm.handle_send(self.state, method, path, headers, body)
        if path == "/token":
            return fcm.handle_token(
                self.state, method, headers.get("content-type", ""), body, self.public_url + "/token"
            )
        if path == CONTROL_PREFIX.rstrip("/") or path.startswith(CONTROL_PREFIX):
            if not self.open_control and not _is_loopback(scope.get("client")):
                return _json(403, {"error": "the control API answers loopback clients only"})
            try:
                return self.control(method, path[len(CONTROL_PREFIX):], scope.get("query_string", b""), body)
            except BadRequest as exc:
                return _json(400, {"error": str(exc)})
        return _json(404, {"error": "not found"})

    def control(self, method: str, route: str, query: bytes, body: bytes) -> Reply:
        """The control API: registrations, recorded pushes, behaviours, stats, reset."""
        state = self.state
        match method, route.rstrip("/"):
            case "POST", "apns/keys":
                f = _fields(body, {"key_id": str, "team_id": str, "public_key_pem": str, "topics": list})
                try:
                    state.register_apns_key(f["key_id"], f["team_id"], f["public_key_pem"],
                                            [str(t) for t in f["topics"]])
                except ValueError as exc:
                    raise BadRequest(str(exc)) from exc
                return _json(201, {})
            case "POST", "apns/certs":
                f = _fields(body, {"bundle_id": str})
                cert_pem, key_pem = self.pki.issue_client_cert(f["bundle_id"])
                return _json(201, {"cert_pem": cert_pem, "key_pem": key_pem})
            case "POST", "fcm/accounts":
                f = _fields(body, {"client_email": str, "public_key_pem": str, "project_id": str})
                try:
                    state.register_account(f["client_email"], f["public_key_pem"], f["project_id"])
                except ValueError as exc:
                    raise BadRequest(str(exc)) from exc
                return _json(201, {})
            case "GET", "pushes":
                token = urllib.parse.parse_qs(query.decode()).get("token", [None])[0]
                return _json(200, state.pushes(token))
            case "DELETE", "pushes":
                state.records.clear()
                return _json(200, {})
            case "POST", "behaviour":
                state.behaviours[_fields(body, {"token": str})["token"]] = _behaviour(body)
                return _json(201, {})
            case "DELETE", "behaviour":
                state.behaviours.clear()
                return _json(200, {})
            case "GET", "stats":
                return _json(200, state.stats())
            case "POST", "clear":
                state.clear()
                return _json(200, {})
            case "DELETE", "":
                state.reset()
                return _json(200, {})
            case "GET", "ca.pem":
                return Reply(200, (("content-type", "application/x-pem-file"),), self.pki.ca_pem.encode())
        return _json(404, {"error": f"no control route {method} /_sandbox/{route}"})


def _behaviour(body: bytes) -> Behaviour:
    f = _fields(body, {"status": int})
    status, reason = f["status"], f.get("reason", "")
    retry_after, delay, times = f.get("retry_after"), f.get("delay", 0.0), f.get("times")
    if not 200 <= status <= 599:
        raise BadRequest("status must be an HTTP status")
    if not isinstance(reason, str):
        raise BadRequest("reason must be a string")
    if retry_after is not None and (not isinstance(retry_after, int | float) or retry_after < 0):
        raise BadRequest("retry_after must be a non-negative number")
    if not isinstance(delay, int | float) or delay < 0:
        raise BadRequest("delay must be a non-negative number")
    if times is not None and (not isinstance(times, int) or times < 1):
        raise BadRequest("times must be a positive integer or null")
    return Behaviour(status, reason, retry_after, float(delay), times)


def _is_loopback(client: Any) -> bool:
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


def server_ssl_context(pki: SandboxPki) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN h2/http1.1; client certificates optional (token-auth clients send
    none) but, when sent, verified against the sandbox CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["h2", "http/1.1"])
    context.load_cert_chain(pki.server_cert_path, pki.server_key_path)
    context.load_verify_locations(cafile=str(pki.ca_path))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def hypercorn_config() -> Config:
    config = Config()
    # APNs allows many concurrent streams and keeps idle connections open for long.
    config.h2_max_concurrent_streams = 1000
    config.keep_alive_timeout = 3600
    # Hypercorn closes an HTTP/2 connection after this many requests (default 1000); APNs
    # clients keep one connection for days, so the sandbox must too.
    config.keep_alive_max_requests = 2**62
    config.max_app_queue_size = 100
    return config


async def serve(app: SandboxApp, host: str, port: int, stop: asyncio.Event,
                on_ready: Callable[[int], None]) -> None:
    """Serve until `stop` is set; `on_ready(port)` is called once the socket listens."""
    config = hypercorn_config()
    context = WorkerContext(None)
    lifespan_state: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    connections: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            connections.add(task)
            task.add_done_callback(connections.discard)
        writers.add(writer)
        try:
            await serve_connection(reader, writer)
        finally:
            writers.discard(writer)

    async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert_bundle = None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            cert_bundle = bundle_id_of(der)
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            peer = writer.get_extra_info("peername")
            client = (str(peer[0]), int(peer[1])) if peer else None

            def dispatch(scope: Scope, body: bytes) -> Reply:
                return app.dispatch(scope, body, cert_bundle)

            await H2ServerConnection(reader, writer, dispatch, client).run()
            return

        async def connection_app(scope: Scope, receive: Receive, send: Send) -> None:
            await app.handle(scope, receive, send, cert_bundle)

        # Our app takes plain dicts; hypercorn's TypedDict-typed signature is the same protocol.
        wrapped = ASGIWrapper(cast(ASGIFramework, connection_app))
        await TCPServer(wrapped, loop, config, context, lifespan_state, reader, writer)

    server = await asyncio.start_server(
        on_connection, host, port, ssl=server_ssl_context(app.pki), backlog=1024, ssl_handshake_timeout=10
    )
    bound_port = int(server.sockets[0].getsockname()[1])
    on_ready(bound_port)
    try:
        await stop.wait()
    finally:
        # Stop at once, also with clients connected: each HTTP/2 connection sends GOAWAY and
        # closes (h2server.close_writer); whatever is still open after STOP_GRACE is dropped.
        server.close()
        for task in list(connections):
            task.cancel()
        if connections:
            await asyncio.wait(list(connections), timeout=STOP_GRACE)
        for writer in list(writers):
            writer.transport.abort()
        await asyncio.gather(*connections, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_GRACE)
