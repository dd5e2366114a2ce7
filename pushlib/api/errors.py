"""How the HTTP API fails: one JSON error shape, a body limit enforced before parsing, one log line.

- `ApiError(status, code, message)`: raised by routes; answered as `ErrorOut` JSON.
- Validation errors: invalid JSON is 400 `invalid_json`, anything else pydantic refuses is 422
  `invalid_request` with per-field details (location, message, type; never the input, which may
  be a secret).
- Unknown routes and methods: 404 / 405 in the same shape. Redis unavailable: 503
  `store_unavailable`. Anything unexpected: 500 `internal`, logged with its traceback.
- `BodyLimit`: an ASGI middleware that reads at most `limit` bytes of a request body (413
  `body_too_large` as soon as Content-Length or the bytes read exceed it) before any route or
  parser sees it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pushlib.redisconn import StoreUnavailable

log = logging.getLogger("pushlib.api")

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"error": code, "message": message, "details": details}


def _respond(request: Request, status: int, code: str, message: str,
             details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    request.state.error_code = code
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def safe_details(errors: Any) -> list[dict[str, Any]]:
    """pydantic's errors without `input`/`ctx` (the input may be a secret, ctx may not serialise)."""
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def install(app: FastAPI) -> None:
    """Register the handlers above on `app`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _respond(request, exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = safe_details(exc.errors())
        if any(d["type"] == "json_invalid" for d in details):
            return _respond(request, 400, "invalid_json", "the body is not valid JSON", details)
        return _respond(request, 422, "invalid_request", "the request does not match the schema", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ERROR_CODES.get(exc.status_code, "error")
        return _respond(request, exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}) or None)

    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("api: %s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        return _respond(request, 503, "store_unavailable", "Redis is unavailable; try again", None,
                        {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("api: %s %s failed: %s", request.method, request.url.path, exc.__class__.__name__)
        return _respond(request, 500, "internal", "internal error")


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = json.dumps(error_body("body_too_large", f"the body exceeds {self.limit} bytes")).encode()
        log.info("api: %s %s -> 413 body_too_large", scope.get("method"), scope.get("path"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
