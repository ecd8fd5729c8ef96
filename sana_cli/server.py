"""`sana serve`: keep models warm and answer over HTTP (FastAPI on uvicorn) on a loopback port and on a
user-only Unix socket in sana-cli's cache directory (the one an attaching `sana generate` finds).

Endpoints:
  GET  /                        a small page: type a prompt, see the images as they finish
  GET  /v1/models               the presets and the loaded models (OpenAI's list form)
  POST /v1/images/generations   OpenAI's images API (b64_json or url), Sana's own parameters as extra fields;
                                "stream": true answers NDJSON events (steps, then each image) instead
  GET  /v1/images/files/ID      an image of a `url` response (only the server's own output directory)
  GET  /v1/sana/health          version and state (the attaching CLI's handshake)
  POST /v1/sana/load            load a model with load options; its description
  POST /v1/sana/jobs            planned jobs from an attached CLI; NDJSON events and encoded images

Every request is planned by the same code as the CLI before it queues; its errors are OpenAI error
objects with the CLI's message text. Nothing a client sends names a path on the server.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import fields
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, presets
from .client import (API_PREFIX, job_from_wire, load_from_wire, private_place_problem, remove_if_stale,
                     uses_input_files)
from .errors import EnvironmentProblem, GenerationError, SanaError, UsageError
from .plan import (IMAGE_SUFFIXES, KEY_SCHEMA, PIXEL_FIELDS, LoadOptions, Request, check_seed, job_key, model_for,
                   plan_generate, resolve_params)
from .safeio import MAX_IMAGE_BYTES, open_regular, read_bounded
from .scheduler import Draining, QueueFull, Scheduler, Work, log

MAX_BODY = 1 << 20  # an OpenAI request: a prompt and a few numbers
MAX_JOBS_BODY = 256 << 20  # an attached batch: as large as a batch file may be
MAX_PROMPT_CHARS = 10000
MAX_N = 10  # images per OpenAI request, as OpenAI's own limit
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}
# Request fields the server decides (paths, files, batching) or that the OpenAI form names otherwise.
SERVER_OWNED = {"prompt", "model", "width", "height", "num_images", "output", "overwrite", "force_size",
                "batch_size", "revision"}
# Fields that name files on the server's disk are never taken from a client.
PATH_FIELDS = {"image", "control_image", "mask_image", "lora", "loras", "controlnet"}
# OpenAI fields that do not apply to these models and are accepted without effect.
IGNORED_OPENAI = {"user", "quality", "style", "moderation", "background", "output_compression", "partial_images"}
_FILE_NAME = re.compile(r"[0-9a-f]{32}(-\d+)?\.(png|jpg|webp)")
# Images of `url` answers stay this long, and the directory holds at most this much (oldest go first).
URL_IMAGE_MAX_AGE = 3600.0
URL_IMAGE_MAX_BYTES = 1 << 30
# Slow clients: a request's head must arrive within HEAD_TIMEOUT, its body within BODY_TIMEOUT; an idle
# kept-alive connection closes after KEEP_ALIVE_TIMEOUT.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
KEEP_ALIVE_TIMEOUT = 5
# Every answer: never framed by another site, never sniffed as another type.
SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.exit_code = exit_code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.exit_code is not None:
            error["exit_code"] = self.exit_code
        return {"error": error}


def _from_sana(exc: SanaError, param: str | None = None) -> ApiError:
    if isinstance(exc, EnvironmentProblem):
        return ApiError(503, exc.line(), type_="server_error", code="unavailable", exit_code=exc.exit_code)
    if isinstance(exc, UsageError):
        return ApiError(400, exc.line(), param=param, exit_code=exc.exit_code)
    return ApiError(500, exc.line(), type_="server_error", exit_code=exc.exit_code)


class ServerConfig:
    def __init__(self, *, api_key: str | None, output_dir: Path, scratch_dir: Path, load: LoadOptions,
                 models: list[str], host: str = "127.0.0.1", allow_hosts: tuple = ()):
        self.api_key = api_key
        self.host = host
        self.allow_hosts = {name.lower().rstrip(".") for name in allow_hosts}
        self.output_dir = output_dir
        self.scratch_dir = scratch_dir
        self.load = load
        self.models = models
        self.draining = False


def create_app(scheduler: Scheduler, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="sana serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    def authorize(request: HttpRequest) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def accepting() -> None:
        if config.draining or not scheduler.accepting:
            raise ApiError(503, "the server is shutting down and takes no new work", type_="server_error",
                           code="shutting_down", exit_code=4)

    async def read_json(request: HttpRequest, limit: int) -> dict:
        # A web page may POST text/plain to a loopback server without asking first; application/json
        # needs a CORS preflight, which this server never grants, so other sites cannot make it render.
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, "the request body must be sent with Content-Type: application/json",
                           code="unsupported_media_type")
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
        try:  # a large body parses for a while: off the event loop
            body = await run_in_threadpool(json.loads, b"".join(chunks) or b"null")
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        loaded = set(scheduler.models.loaded_names())
        names = [p.name for p in presets.PRESETS.values()] if isinstance(presets.PRESETS, dict) else \
            [p.name for p in presets.PRESETS]
        names += [name for name in ("tiny", "tiny-sprint", "tiny-teacher") if name not in names]
        names += sorted(loaded - set(names))
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sana-cli",
                                            "loaded": name in loaded} for name in names]}

    @app.get(f"{API_PREFIX}/health")
    async def health(request: HttpRequest):
        authorize(request)
        return {"ok": True, "sana_cli": __version__, "key_schema": KEY_SCHEMA, "pid": os.getpid(),
                "loaded": scheduler.models.loaded_names(), "queued": scheduler.queued(),
                "draining": config.draining}

    @app.post(f"{API_PREFIX}/load")
    async def load(request: HttpRequest):
        authorize(request)
        accepting()
        body = await read_json(request, MAX_BODY)
        ref, options = await run_in_threadpool(_model_and_options, body)
        try:
            loaded = await asyncio.to_thread(scheduler.models.get, ref, options)
        except SanaError as exc:
            raise _from_sana(exc) from None
        return {"model": loaded.describe()}

    @app.post(f"{API_PREFIX}/jobs")
    async def jobs(request: HttpRequest):
        authorize(request)
        accepting()
        body = await read_json(request, MAX_JOBS_BODY)
        ref, options = await run_in_threadpool(_model_and_options, body)
        decode = body.get("decode", "auto")
        force_size = body.get("force_size") is True
        wire = body.get("jobs")
        if not isinstance(wire, list) or not wire:
            raise ApiError(400, "'jobs' must be a non-empty list", param="jobs")
        try:
            pixels = options.pixels(options.decode_for(decode if isinstance(decode, str) else "auto"))
            if not isinstance(decode, str):
                raise UsageError("'decode' must be text")
            planned = await run_in_threadpool(_checked_jobs, ref, wire, pixels, force_size, config.scratch_dir)
        except SanaError as exc:
            raise _from_sana(exc, "jobs") from None
        except (TypeError, ValueError, KeyError) as exc:
            raise ApiError(400, f"a job is malformed: {exc}", param="jobs") from None
        work = Work(ref=ref, options=options, decode=decode, jobs=planned, sink=None, force_size=force_size,
                    label=f"attached run of {len(planned)} image(s)")
        return await _stream(request, work, attached=True)

    @app.post("/v1/images/generations")
    async def generations(request: HttpRequest):
        authorize(request)
        accepting()
        body = await read_json(request, MAX_BODY)
        work, response_format = await run_in_threadpool(_openai_work, body, config)
        if body.get("stream") is True:
            return await _stream(request, work, attached=False, response_format=response_format)
        messages = await _collect(request, work)
        data = []
        for message in messages:
            if message["type"] == "error":
                status = message.get("status", 500)
                raise ApiError(status, message["message"],
                               type_="server_error" if status >= 500 else "invalid_request_error",
                               code="unavailable" if status == 503 else None, exit_code=message.get("exit_code"))
            if message["type"] == "failed":
                raise ApiError(500, message["error"], type_="server_error", exit_code=message.get("exit_code"))
            if message["type"] == "image":
                data.append(await _openai_item(message, response_format, request))
        return {"created": int(time.time()), "data": data}

    @app.get("/v1/images/files/{name}")
    async def files(name: str, request: HttpRequest):
        authorize(request)
        if not _FILE_NAME.fullmatch(name):
            raise ApiError(404, "no such image", code="not_found")
        try:  # the safe open (never blocks on a FIFO, regular files only, no links), off the event loop
            handle = await run_in_threadpool(open_regular, config.output_dir / name, MAX_IMAGE_BYTES,
                                             follow_links=False)
        except OSError:
            raise ApiError(404, "no such image", code="not_found") from None
        size = os.fstat(handle.fileno()).st_size
        return StreamingResponse(_chunks(handle, size), headers={"Content-Length": str(size)},
                                 media_type={"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[
                                     name.rsplit(".", 1)[1]])

    async def _collect(request: HttpRequest, work: Work) -> list[dict]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        work.sink = lambda message: loop.call_soon_threadsafe(inbox.put_nowait, message)
        _submit(work)
        messages = []
        while True:
            try:
                message = await asyncio.wait_for(inbox.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(work)
                    raise ApiError(499, "the client went away") from None
                if work.finished.is_set() and inbox.empty():
                    return messages
                continue
            messages.append(message)
            if message["type"] in ("done", "error"):
                return messages

    async def _stream(request: HttpRequest, work: Work, *, attached: bool, response_format: str = "b64_json"):
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        work.sink = lambda message: loop.call_soon_threadsafe(inbox.put_nowait, message)
        _submit(work)

        async def lines():
            try:
                while True:
                    try:
                        message = await asyncio.wait_for(inbox.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if work.finished.is_set() and inbox.empty():
                            return
                        if await request.is_disconnected():
                            return
                        continue
                    if message["type"] in ("image",):
                        message = (await run_in_threadpool(_attached_item, message) if attached
                                   else {"type": "image", **await _openai_item(message, response_format, request)})
                    elif message["type"] == "failed":
                        await run_in_threadpool(_unlink, message.pop("path", None))
                    yield (json.dumps(message) + "\n").encode()
                    if message["type"] in ("done", "error"):
                        return
            finally:
                if not work.finished.is_set():
                    scheduler.cancel(work)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def _submit(work: Work) -> None:
        try:
            scheduler.submit(work)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({scheduler.max_queue} requests wait); retry later",
                           type_="rate_limit_error", code="queue_full", exit_code=4) from None
        except Draining:
            raise ApiError(503, "the server is shutting down and takes no new work", type_="server_error",
                           code="shutting_down", exit_code=4) from None

    async def _openai_item(message: dict, response_format: str, request: HttpRequest) -> dict:
        path = message["path"]
        item = {"seed": message["seed"], "key": message["key"]}
        if response_format == "url":
            item["url"] = f"{_public_base(request)}/v1/images/files/{os.path.basename(path)}"
            await run_in_threadpool(sweep_images, config.output_dir, keep=os.path.basename(path))
        else:
            item["b64_json"] = base64.b64encode(await run_in_threadpool(_take, path)).decode()
        return item

    app.add_middleware(_Guard, config=config)
    return app


class _Guard:
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

        if not _host_allowed(scope, self.config):
            answer = ApiError(403, "the Host header names neither this server nor a loopback address (start the "
                                   "server with --allow-host NAME or --api-key to accept other names)",
                              code="host_not_allowed").response()
            return await answer(scope, receive, guarded)
        return await self.app(scope, receive, guarded)


def _host_allowed(scope, config: ServerConfig) -> bool:
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


def _public_base(request: HttpRequest) -> str:
    """The address a `url` answer points at: the one the client connected to, never its Host header."""
    address, port = request.scope.get("server") or ("127.0.0.1", None)
    host = f"[{address}]" if ":" in str(address) else address
    return f"http://{host}" + (f":{port}" if port else "")


def sweep_images(directory: Path, *, keep: str | None = None, max_age: float = URL_IMAGE_MAX_AGE,
                 max_bytes: int = URL_IMAGE_MAX_BYTES, now: float | None = None) -> list[str]:
    """Delete the server's `url` images older than max_age, then the oldest while the rest exceed
    max_bytes (never `keep`, the one just answered). Only regular files with the server's own names
    are looked at or removed. Blocking: call it off the event loop. Returns the names removed."""
    import stat

    now = time.time() if now is None else now
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not _FILE_NAME.fullmatch(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime, info.st_size, entry.name))
    except OSError:
        return []
    found.sort()
    total = sum(size for _, size, _ in found)
    removed = []
    for mtime, size, name in found:
        if name == keep or (now - mtime <= max_age and total <= max_bytes):
            continue
        try:
            os.unlink(directory / name)
        except OSError:
            continue
        total -= size
        removed.append(name)
    return removed


def _attached_item(message: dict) -> dict:
    data = _take(message.pop("path"))
    return {**message, "data": base64.b64encode(data).decode()}


def _take(path: str) -> bytes:
    """A rendered image's bytes, removing the server's copy (read like any file: bounded, regular only).
    Blocking: call it off the event loop."""
    try:
        return read_bounded(path, MAX_IMAGE_BYTES)
    finally:
        _unlink(path)


def _chunks(handle, size: int, chunk: int = 1 << 16):
    """A file's first size bytes in pieces (a plain iterator: Starlette reads it in its threadpool)."""
    with handle:
        left = size
        while left > 0:
            data = handle.read(min(chunk, left))
            if not data:
                return
            left -= len(data)
            yield data


def _unlink(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


NOT_A_PATH = "'model' must be a preset name or a hub id (org/name): the server never opens a client's path"


def _no_path(name) -> None:
    """A model a client names is a preset or a hub id, checked before anything looks at the disk, so no
    answer tells which paths exist on this machine."""
    from .modelref import looks_like_path

    if isinstance(name, str) and presets.find(name) is None and looks_like_path(name):
        raise ApiError(400, NOT_A_PATH, param="model")


def _model_and_options(body: dict):
    from .modelref import resolve

    name, revision = body.get("model"), body.get("revision")
    if not isinstance(name, str) or (revision is not None and not isinstance(revision, str)):
        raise ApiError(400, "'model' must be a model name and 'revision' text", param="model")
    _no_path(name)
    try:
        ref = resolve(name, revision=revision)
    except SanaError as exc:
        raise ApiError(404, exc.line(), param="model", code="model_not_found", exit_code=exc.exit_code) from None
    if ref.kind == "local":
        raise ApiError(400, NOT_A_PATH, param="model")
    load = body.get("load") or {}
    try:
        options = load_from_wire(load) if isinstance(load, dict) else None
        if options is None:
            raise UsageError("'load' must be an object")
        options.pixels()
    except SanaError as exc:
        raise _from_sana(exc, "load") from None
    except TypeError as exc:
        raise ApiError(400, f"bad load options: {exc}", param="load") from None
    return ref, options


def _checked_jobs(ref, wire: list, pixels, force_size: bool, scratch: Path) -> list:
    """Every job of an attached run checked (blocking: planning reads configs; run it off the event loop)."""
    return [_checked_job(ref, item, pixels, force_size, scratch) for item in wire]


def _checked_job(ref, item: dict, pixels, force_size: bool, scratch: Path):
    """A job from an attached CLI, checked by the same planning code: its fields must be what
    resolve_params makes of them, its seed valid, its key the hash of its fields."""
    if not isinstance(item, dict):
        raise UsageError("a job must be an object")
    item = dict(item)
    ext = item.pop("ext", ".png")
    if ext not in IMAGE_SUFFIXES:
        raise UsageError(f"unsupported image format {ext!r}")
    if len(str(item.get("prompt", ""))) > MAX_PROMPT_CHARS:
        raise UsageError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    job = job_from_wire(item, str(scratch / f"{secrets.token_hex(16)}{ext}"))
    if job.pixels != pixels:
        raise UsageError("a job's pixel options differ from its load options")
    check_seed(job.seed)
    if uses_input_files(job):
        raise UsageError("LoRA, ControlNet and input-image files are read only by an in-process run (a server "
                         "never opens a client's path); run it with --no-server")
    fields_ = [name for name in PIXEL_FIELDS if name != "seed"]
    resolved, _ = resolve_params(ref, **{name: getattr(job, name) for name in fields_ if name in _PLANNING_INPUTS},
                                 force_size=force_size, command_line=False)
    if any(_plain(resolved.get(name)) != _plain(getattr(job, name)) for name in fields_):
        raise UsageError("a job's fields are not the ones planning makes of them")
    if job_key(ref, job.pixels, **job.params()) != job.key:
        raise UsageError("a job's key does not match its fields")
    return job


_PLANNING_INPUTS = set(inspect.signature(resolve_params).parameters)  # the rest of PIXEL_FIELDS are its outputs


def _plain(value):
    """Lists and tuples alike, as JSON makes them."""
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _openai_fields() -> set:
    return {f.name for f in fields(Request)} - SERVER_OWNED - PATH_FIELDS


def _check_type(name: str, value, annotation: str):
    """The JSON value of an extra field against the Request field's declared type."""
    if value is None and "None" in annotation:
        return value
    if "bool" in annotation:
        ok = isinstance(value, bool)
    elif "float" in annotation:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif "int" in annotation:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "str" in annotation:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ApiError(400, f"'{name}' must be {annotation.replace(' | None', '')}", param=name)
    return value


def _openai_work(body: dict, config: ServerConfig) -> tuple[Work, str]:
    """An OpenAI images request as a planned Work (the CLI's planning and messages)."""
    extras = _openai_fields()
    known = {"prompt", "model", "n", "size", "response_format", "output_format", "stream"} | extras | IGNORED_OPENAI
    for name in body:
        if name not in known:
            raise ApiError(400, f"unknown field '{name}'", param=name, code="unknown_parameter")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be text", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be a whole number in 1..{MAX_N}", param="n")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise ApiError(400, "'response_format' must be b64_json or url", param="response_format")
    output_format = body.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise ApiError(400, "'output_format' must be png, jpeg or webp", param="output_format")
    width = height = None
    size = body.get("size")
    if size not in (None, "auto"):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size) if isinstance(size, str) else None
        if not match:
            raise ApiError(400, "'size' must be WIDTHxHEIGHT (for example 1024x1024) or auto", param="size")
        width, height = int(match.group(1)), int(match.group(2))
    model = body.get("model") or (config.models[0] if config.models else None)
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a model name", param="model")
    _no_path(model)
    types = {f.name: str(f.type) for f in fields(Request)}
    extra = {name: _check_type(name, body[name], types[name]) for name in extras if name in body}
    directory = config.output_dir if response_format == "url" else config.scratch_dir
    output = str(directory / f"{secrets.token_hex(16)}{OUTPUT_FORMATS[output_format]}")
    request = Request(prompt=prompt, model=model, width=width, height=height, num_images=n, output=output, **extra)
    try:
        ref = model_for(request)
    except SanaError as exc:
        raise ApiError(404, exc.line(), param="model", code="model_not_found") from None
    if ref.kind == "local":
        raise ApiError(400, NOT_A_PATH, param="model")
    try:
        plan = plan_generate(request, ref, config.load.pixels(config.load.decode_for("auto")))
    except SanaError as exc:
        raise _from_sana(exc) from None
    work = Work(ref=ref, options=config.load, decode="auto", jobs=plan.jobs, sink=None,
                label=f"images request of {n} image(s)")
    return work, response_format


# ---- running the server --------------------------------------------------------------------------

def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                 hint="pick another --port") from None
    sock.listen(128)
    return sock


def bind_unix(path: Path) -> socket.socket:
    """The user-only socket: its directory 0700 and ours, the socket 0600. A live one means a server
    already runs for this user; a stale one (nobody listens) is removed."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = private_place_problem(directory, want_socket=False)
    if problem:
        raise EnvironmentProblem(f"the server socket directory is unsafe: {problem}",
                                 hint=f"remove {directory} or set SANA_CLI_CACHE elsewhere")
    if os.path.lexists(path):
        problem = private_place_problem(path, want_socket=True)
        if problem:
            raise EnvironmentProblem(f"the server socket is unsafe: {problem}", hint=f"remove {path}")
        if not remove_if_stale(path):
            raise EnvironmentProblem(f"a sana server already runs for this user on {path}",
                                     hint="stop it first, or set SANA_CLI_CACHE for a second one")
        log(f"removed the stale socket {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(*, host: str, port: int, models: list[str], keep_alive: float | None, max_memory_gib: float | None,
          api_key: str | None, window: float, max_queue: int, output_dir: Path, load: LoadOptions,
          ready=None, allow_hosts: tuple = ()) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; returns the exit code."""
    import tempfile

    import uvicorn

    from .client import socket_path
    from .scheduler import ModelCache

    cache = ModelCache(keep_alive=keep_alive, budget_bytes=None if max_memory_gib is None
                       else int(max_memory_gib * 2**30))
    scheduler = Scheduler(window=window, max_queue=max_queue, models=cache)
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sana-serve-"))
    config = ServerConfig(api_key=api_key, output_dir=output_dir, scratch_dir=scratch, load=load, models=models,
                          host=host, allow_hosts=allow_hosts)
    sweep_images(output_dir)
    tcp = bind_tcp(host, port)
    path = socket_path()
    unix = bind_unix(path)
    inode = os.stat(path).st_ino  # remove the socket at exit only if it is still ours
    for name in models:  # up front, before announcing the server
        ref, options = _model_and_options({"model": name, "load": {}})
        cache.get(ref, load)
    app = create_app(scheduler, config)
    uv_config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None,
                               lifespan="off", http=_slow_client_protocol(), timeout_keep_alive=KEEP_ALIVE_TIMEOUT)
    server = _Server(uv_config, scheduler, config)
    scheduler.on_death = lambda reason: setattr(server, "should_exit", True)
    if scheduler.dead:  # it stopped while the models loaded, before the callback was set
        server.should_exit = True
    actual = tcp.getsockname()[1]
    log(f"listening on http://{host}:{actual} and unix:{path} (pid {os.getpid()}); "
        f"keep-alive {'forever' if keep_alive is None else f'{keep_alive:.0f} s'}"
        + (f", memory budget {max_memory_gib} GiB" if max_memory_gib is not None else ""))
    if ready is not None:
        ready(actual)
    try:
        server.run(sockets=[tcp, unix])
    finally:
        try:
            if os.lstat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    if scheduler.dead is not None:
        raise GenerationError(f"the server's work queue stopped ({scheduler.dead}); the server exited, having "
                              "answered the requests that waited with 503")
    if server.forced is not None:
        return 128 + server.forced
    log("stopped")
    return 0


def _slow_client_protocol():
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive within
    HEAD_TIMEOUT of the connection or of the previous answer (uvicorn itself waits forever for it)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientProtocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            waiting_after = self.cycle  # a new request head makes a new cycle
            self._head_deadline = self.loop.call_later(HEAD_TIMEOUT, self._too_slow, waiting_after)

        def _too_slow(self, waiting_after) -> None:
            idle = self.cycle is None or self.cycle.response_complete  # no request is being answered
            if self.cycle is waiting_after and idle and not self.transport.is_closing():
                self.transport.close()

    return SlowClientProtocol


class _Server:
    """uvicorn's server with sana-cli's shutdown: the first SIGTERM/SIGINT refuses new work (503),
    lets queued and running work finish, then stops; a second one stops at once."""

    def __new__(cls, uv_config, scheduler, config):
        import uvicorn

        class Server(uvicorn.Server):
            forced: int | None = None
            _draining = False

            def handle_exit(self, sig, frame):
                if self._draining:
                    self.forced = sig
                    self.force_exit = True
                    self.should_exit = True
                    return
                self._draining = True
                config.draining = True
                scheduler.stop_accepting()
                log(f"{signal.Signals(sig).name} received: finishing the work in flight, refusing new work "
                    "(send it again to stop at once)")
                threading.Thread(target=self._drain, daemon=True).start()

            def _drain(self):
                while not scheduler.idle():
                    time.sleep(0.1)
                time.sleep(0.3)  # let the handlers send their last lines
                self.should_exit = True

        return Server(uv_config)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sana serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
form{display:flex;gap:.5rem;flex-wrap:wrap}#prompt{flex:1 1 20rem}
#images{display:flex;flex-wrap:wrap;gap:.5rem;margin-top:1rem}#images img{max-width:16rem}
#status{color:#555;margin-top:.5rem}
</style></head><body>
<h1>sana serve</h1>
<form id="form">
<input id="prompt" name="prompt" placeholder="a cyberpunk cat with a neon sign" required>
<select id="model" name="model"></select>
<input id="n" name="n" type="number" min="1" max="10" value="1" style="width:4rem">
<input id="key" name="key" type="password" placeholder="API key (if the server has one)">
<button id="go" type="submit">Generate</button>
</form>
<div id="status"></div>
<div id="images"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadModels() {
  try {
    const answer = await fetch("/v1/models", {headers: headers()});
    const list = await answer.json();
    for (const m of list.data || []) {
      const option = document.createElement("option");
      option.value = m.id; option.textContent = m.id + (m.loaded ? " (loaded)" : "");
      $("model").appendChild(option);
    }
    const loaded = (list.data || []).find((m) => m.loaded);
    if (loaded) $("model").value = loaded.id;
  } catch (e) { $("status").textContent = "cannot list models: " + e; }
}
async function one(prompt, model) {
  const answer = await fetch("/v1/images/generations", {method: "POST", headers: headers(),
    body: JSON.stringify({prompt, model, n: 1, response_format: "b64_json"})});
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error((body.error || {}).message || String(answer.status));
  const item = body.data[0];
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.alt = prompt; img.title = "seed " + item.seed; img.dataset.seed = item.seed;
  $("images").appendChild(img);
}
async function generate(prompt, model, n) {
  // One request per image, all at once: the server batches them, and each shows as soon as it is done.
  let done = 0, failed = "";
  $("status").textContent = "0 of " + n + " done";
  await Promise.all(Array.from({length: n}, () => one(prompt, model).then(
    () => { done += 1; $("status").textContent = done + " of " + n + " done"; },
    (e) => { failed = String(e.message || e); })));
  $("status").textContent = failed ? "error: " + failed : "done";
}
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const n = Math.min(Math.max(parseInt($("n").value, 10) || 1, 1), 10);
  generate($("prompt").value, $("model").value, n);
});
// A link may fill the form (?prompt=...&model=...&n=...), never send it: only the person at the page
// does, by pressing Generate, so another site that opens or frames this page cannot make it render.
loadModels().then(() => {
  const query = new URLSearchParams(location.search);
  if (query.get("prompt")) $("prompt").value = query.get("prompt");
  if (query.get("model")) $("model").value = query.get("model");
  const n = parseInt(query.get("n") || "1", 10);
  $("n").value = String(Math.min(Math.max(Number.isFinite(n) ? n : 1, 1), 10));
});
</script>
</body></html>
"""
