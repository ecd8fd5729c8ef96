"""The HTTP edge of `sana serve`, before and after any route: the API key, bounded JSON bodies, the Host
guard and security headers, the x-request-id, and failures as OpenAI error objects."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EnvironmentProblem, SanaError, UsageError
from .openai_images import ApiError
from .state import ServerConfig, ServerState
from .wire import JSON, given_key
from .work_queue import log

MAX_BODY = 1 << 20  # an OpenAI request: a prompt and a few numbers
MAX_DEPTH = 32  # JSON nesting a request body may have (the deepest legitimate one has 4)
# Slow clients: a request's body must arrive within BODY_TIMEOUT (its head: running.HEAD_TIMEOUT).
BODY_TIMEOUT = 60.0
# Every answer: never framed by another site, never sniffed as another type.
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def server_state(request: HttpRequest) -> ServerState:
    """The state create_app gave this server (every route's dependency)."""
    return request.app.state.sana


def from_sana(exc: SanaError, param: str | None = None) -> ApiError:
    if isinstance(exc, EnvironmentProblem):
        return ApiError(503, exc.line(), type_="server_error", code="unavailable", exit_code=exc.exit_code)
    if isinstance(exc, UsageError):
        return ApiError(400, exc.line(), param=param, exit_code=exc.exit_code)
    return ApiError(500, exc.line(), type_="server_error", exit_code=exc.exit_code)


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def install_error_answers(app: FastAPI) -> None:
    """Every failure, ours or the framework's (404, 405, an exception), answered as an OpenAI error object."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed here; use {exc.headers.get('Allow', 'another method')}"
        return error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                       else "method_not_allowed" if exc.status_code == 405 else None,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log(f"internal error answering {request.method} {request.url.path} "
            f"({getattr(request.state, 'request_id', '?')}): {type(exc).__name__}: {exc}")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error",
                                       headers={"x-should-retry": "false"}))


def authorize(request: HttpRequest, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    given = given_key(request.headers.get("authorization", ""))
    if not hmac.compare_digest(given.encode(), config.api_key.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                       code="invalid_api_key")


def accepting(state: ServerState) -> None:
    if state.config.draining or not state.scheduler.accepting:
        raise ApiError(503, "the server is shutting down and takes no new work", type_="server_error",
                       code="shutting_down", exit_code=4)


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (else 413) and within BODY_TIMEOUT (else 408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
            chunks.append(chunk)

    try:  # a client that sends its body slowly holds a connection at most this long
        await asyncio.wait_for(receive(), timeout=BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s",
                       code="timeout") from None
    return b"".join(chunks)


async def read_json(request: HttpRequest, limit: int) -> dict:
    # A web page may POST text/plain to a loopback server without asking first; application/json
    # needs a CORS preflight, which this server never grants, so other sites cannot make it render.
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != JSON:
        raise ApiError(415, "the request body must be sent with Content-Type: application/json",
                       code="unsupported_media_type")
    raw = await read_body(request, limit)
    try:  # a large body parses for a while: off the event loop
        body = await run_in_threadpool(json.loads, raw or b"null")
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if not depth_ok(body, MAX_DEPTH):
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    return body


MULTIPART = "multipart/form-data"


async def read_form(request: HttpRequest, limit: int, *, max_files: int, max_fields: int) -> list:
    """A multipart/form-data body (OpenAI's image edits) as its parts in order: (name, text) for a field,
    (name, (file name, bytes)) for a file. Bounded as a whole (413), in files and fields (400). A form is
    what a page of any site may post to a loopback server without asking, so a request that a browser
    marks as coming from another site's page (an Origin other than this server's) is refused (403)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != MULTIPART:
        raise ApiError(415, f"the request body must be sent as {MULTIPART} (OpenAI's image edits form)",
                       code="unsupported_media_type")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1].rstrip("/").lower() != \
            request.headers.get("host", "").lower():
        raise ApiError(403, "a form posted by a page of another site is refused (its Origin is not this server)",
                       code="cross_origin")
    raw = await read_body(request, limit)
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield raw

    parser = MultiPartParser(request.headers, chunks(), max_files=max_files, max_fields=max_fields)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        message = str(exc)
        if "Too many files" in message:
            message = f"too many files in one request (at most {max_files})"
        raise ApiError(400, f"the request body is not a usable {MULTIPART} form: {message}",
                       code="invalid_form") from None
    parts = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append((name, (value.filename or "", await value.read())))
            else:
                parts.append((name, value))
    finally:
        await form.close()
    return parts


def depth_ok(value, limit: int) -> bool:
    """Whether parsed JSON nests at most `limit` deep (iterative: a deep body never reaches the recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


class RequestId:
    """Every answer carries an x-request-id (as OpenAI's do), logged with failures; plain ASGI so that
    streaming answers and disconnect detection pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req_{secrets.token_hex(12)}".encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class Guard:
    """Every HTTP answer gets SECURITY_HEADERS; on the TCP port of a server without an API key, a
    request whose Host is not a loopback name, --host or an --allow-host name is refused (403) before
    any route runs, so a page of another site that rebinds its DNS name to 127.0.0.1 gets nothing."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def guarded(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if not host_allowed(scope, self.config):
            answer = error_response(ApiError(
                403, "the Host header names neither this server nor a loopback address (start the server with "
                     "--allow-host NAME or --api-key to accept other names)", code="host_not_allowed"))
            return await answer(scope, receive, guarded)
        return await self.app(scope, receive, guarded)


def host_allowed(scope, config: ServerConfig) -> bool:
    server = scope.get("server")
    if server is None or server[1] is None or config.api_key is not None:
        return True  # the user-only Unix socket, or a server where every request needs the key
    host = next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"host"), None)
    if host is None:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host[1:host.find("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0] \
        if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    return (is_loopback(name) or name.endswith(".localhost") or name == config.host.lower().strip("[]")
            or name in config.allow_hosts)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_base(request: HttpRequest) -> str:
    """The address a `url` answer points at: the one the client connected to, never its Host header."""
    address, port = request.scope.get("server") or ("127.0.0.1", None)
    host = f"[{address}]" if ":" in str(address) else address
    return f"http://{host}" + (f":{port}" if port else "")
