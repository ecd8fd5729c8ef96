"""How queued work of `sana serve` becomes an answer: its messages read from one inbox, as NDJSON lines
for an attached CLI, as OpenAI's Server-Sent Events, or collected into one OpenAI JSON answer (with the
Idempotency-Key store); and the `url` images the server keeps for a while (served, swept)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..safeio import MAX_IMAGE_BYTES, read_bounded
from . import openai_images as openai_api
from .http_io import public_base
from .openai_images import OUTPUT_FORMATS, ApiError
from .state import ServerState
from .wire import NDJSON, attached_line
from .work_queue import Draining, QueueFull, Work

FILE_NAME = re.compile(r"[0-9a-f]{32}(-\d+)?\.(png|jpg|webp)")
# Images of `url` answers stay this long, and the directory holds at most this much (oldest go first).
URL_IMAGE_MAX_AGE = 3600.0
URL_IMAGE_MAX_BYTES = 1 << 30
RETRY_AFTER_S = 5  # what a 429 asks a client to wait
IDEMPOTENCY_TTL_S = 600  # how long an Idempotency-Key's answer is kept for retries
IDEMPOTENCY_MAX = 64  # keys kept at once (oldest answered ones go first)
IDEMPOTENCY_MAX_BYTES = 256 << 20  # base64 images kept for retries, all keys together
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,256}")


class _ClientGone(Exception):
    """The client of a watched answer disconnected."""


class Inbox:
    """One Work's messages: queued on creation (429 when the queue is full, 503 while draining), then read
    with `next` until it gives None, then closed. Every kind of answer reads its work through here."""

    def __init__(self, state: ServerState, work: Work):
        self.scheduler, self.work = state.scheduler, work
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        work.sink = lambda message: loop.call_soon_threadsafe(self._queue.put_nowait, message)
        try:
            self._submit(work)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({self.scheduler.max_queue} requests wait); retry later",
                           type_="rate_limit_error", code="queue_full", exit_code=4,
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining:
            raise ApiError(503, "the server is shutting down and takes no new work", type_="server_error",
                           code="shutting_down", exit_code=4) from None

    def _submit(self, work: Work) -> None:
        try:
            self.scheduler.submit(work)
        except (QueueFull, Draining):
            work.finish()  # never queued: its input files may go
            raise

    async def next(self, request: HttpRequest, *, watch: bool = True) -> dict | None:
        """The work's next message as it comes; None after its "done" or "error", or once it finished with
        nothing left to read. Watched, a client that went away raises _ClientGone. Read it in a
        try/finally that calls close(). (A plain coroutine, as the request's disconnect check needs.)"""
        work = self.work
        if self._ended:
            return None
        while True:
            try:
                message = await asyncio.wait_for(self._queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if work.finished.is_set() and self._queue.empty():
                    return None
                if watch and await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            self._ended = message["type"] in ("done", "error")
            return message

    def close(self) -> None:
        """Reading ends: work that has not answered its "done" or "error" and is not finished is cancelled, as
        nobody will read it."""
        if not self._ended and not self.work.finished.is_set():
            self.scheduler.cancel(self.work)


# ---- an attached CLI: NDJSON events with each image's encoded bytes ---------------------------------

def attached_stream(state: ServerState, request: HttpRequest, work: Work) -> StreamingResponse:
    inbox = Inbox(state, work)

    async def lines():
        try:
            while (message := await inbox.next(request)) is not None:
                if message["type"] == "image":
                    yield await run_in_threadpool(_attached_line, message)
                    continue
                if message["type"] == "failed":
                    await run_in_threadpool(_unlink, message.pop("path", None))
                elif message["type"] == "partial":
                    continue
                yield attached_line(message)
        except _ClientGone:
            return
        finally:
            inbox.close()

    return StreamingResponse(lines(), media_type=NDJSON)


def _attached_line(message: dict) -> bytes:
    """An image message as its NDJSON line, the server's copy read (bounded) and removed. Blocking."""
    return attached_line(message, _take(message.pop("path")))


# ---- OpenAI: Server-Sent Events -----------------------------------------------------------------------

def openai_events(state: ServerState, request: HttpRequest, work: Work, answer: dict) -> StreamingResponse:
    """OpenAI's image stream: image_generation.partial_image events (previews) and one
    image_generation.completed event per image; a failure is an `error` event and ends the stream."""
    inbox = Inbox(state, work)
    created = int(time.time())
    counts: dict[int, int] = {}

    def event(name: str, payload: dict) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n".encode()

    async def events():
        try:
            while (message := await inbox.next(request)) is not None:
                kind = message["type"]
                if kind == "partial":
                    number = counts.get(message["index"], 0)
                    counts[message["index"]] = number + 1
                    data = _preview_bytes(message["image"], answer["output_format"])
                    yield event("image_generation.partial_image", {
                        "b64_json": base64.b64encode(data).decode(), "created_at": created,
                        "partial_image_index": number, "index": message["index"] - 1,
                        "step": message["step"], **answer["fields"]})
                elif kind == "image":
                    item = await run_in_threadpool(_openai_item, state, message, answer, request)
                    yield event("image_generation.completed", {
                        "created_at": created, "index": message["index"] - 1, **item, **answer["fields"]})
                elif kind in ("failed", "error"):
                    _unlink(message.pop("path", None))
                    status = message.get("status", 500)
                    text = message.get("error") or message.get("message")
                    yield event("error", {"error": {
                        "message": text, "type": "server_error" if status >= 500 else "invalid_request_error",
                        "param": openai_api.param_of(text) if status == 400 else None, "code": None}})
                    return
        except _ClientGone:
            return
        finally:
            inbox.close()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- OpenAI: one JSON answer --------------------------------------------------------------------------

async def openai_answer(state: ServerState, request: HttpRequest, work: Work, answer: dict, *, watch: bool) -> dict:
    messages = []
    inbox = Inbox(state, work)
    try:
        while (message := await inbox.next(request, watch=watch)) is not None:
            messages.append(message)
    except _ClientGone:
        raise ApiError(499, "the client went away") from None
    finally:
        inbox.close()
    data = []
    for message in messages:
        if message["type"] == "error":
            status = message.get("status", 500)
            raise ApiError(status, message["message"],
                           type_="server_error" if status >= 500 else "invalid_request_error",
                           param=openai_api.param_of(message["message"]) if status == 400 else None,
                           code="unavailable" if status == 503 else None, exit_code=message.get("exit_code"),
                           headers={"x-should-retry": "false"} if status == 500 else None)
        if message["type"] == "failed":
            raise ApiError(500, message["error"], type_="server_error", exit_code=message.get("exit_code"),
                           headers={"x-should-retry": "false"})
        if message["type"] == "image":
            data.append(await run_in_threadpool(_openai_item, state, message, answer, request))
    return {"created": int(time.time()), "data": data, **answer["fields"]}


async def remembered(state: ServerState, key: str, body: dict, make):
    """One render per Idempotency-Key: a retry with the same key and body joins the render in flight or
    gets its answer (kept IDEMPOTENCY_TTL_S); the same key with another body is refused."""
    kept = state.remembered
    now = time.monotonic()
    for old in [k for k, (_, task, expires) in kept.items() if expires < now and task.done()]:
        del kept[old]
    while _kept_bytes(kept) > IDEMPOTENCY_MAX_BYTES:  # oldest answers go first
        del kept[next(k for k, (_, task, _) in kept.items() if task.done())]
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    entry = kept.get(key)
    if entry is not None and entry[0] != fingerprint:
        raise ApiError(400, "this Idempotency-Key was used with another request body", param="Idempotency-Key",
                       code="idempotency_key_reused")
    if entry is None:
        while len(kept) >= IDEMPOTENCY_MAX:
            done = [k for k, (_, task, _) in kept.items() if task.done()]
            if not done:
                raise ApiError(429, "too many requests with an Idempotency-Key are in flight; retry later",
                               type_="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            del kept[done[0]]
        entry = (fingerprint, asyncio.ensure_future(make()), now + IDEMPOTENCY_TTL_S)
        kept[key] = entry
    task = entry[1]
    try:
        return await asyncio.shield(task)
    except ApiError as exc:
        if exc.status in (429, 503):  # not done: a retry may be taken later
            kept.pop(key, None)
        raise


def _kept_bytes(kept: dict) -> int:
    """The base64 image text the answered Idempotency-Keys hold."""
    total = 0
    for _, task, _ in kept.values():
        if task.done() and not task.cancelled() and task.exception() is None:
            total += sum(len(item.get("b64_json", "")) for item in task.result()["data"])
    return total


def _openai_item(state: ServerState, message: dict, answer: dict, request: HttpRequest) -> dict:
    """One data item of an answer. Blocking (files, encoding): call it off the event loop."""
    path = _compressed(state, message["path"], answer)
    item = {"seed": message["seed"], "key": message["key"]}
    if answer["response_format"] == "url":
        item["url"] = f"{public_base(request)}/v1/images/files/{os.path.basename(path)}"
        sweep_images(state.config.output_dir, keep=os.path.basename(path))
    else:
        item["b64_json"] = base64.b64encode(_take(path)).decode()
    return item


def _compressed(state: ServerState, path: str, answer: dict) -> str:
    """The image at the asked output_compression: rendered as lossless PNG, encoded here with the
    same metadata (plus the compression) into the place the answer names."""
    if answer["output_compression"] is None:
        return path
    from PIL import Image

    from ..storage import media
    from ..storage.images import read_metadata

    meta = dict(read_metadata(path)["sana"] or {})
    meta["output_compression"] = answer["output_compression"]
    with Image.open(path) as image:
        data = media.encode(media.Frames.still(image), answer["output_format"].upper(), meta,
                            quality=answer["output_compression"])
    config = state.config
    directory = config.output_dir if answer["response_format"] == "url" else config.scratch_dir
    final = str(directory / (os.path.basename(path)[:-4] + OUTPUT_FORMATS[answer["output_format"]]))
    media.write_encoded(data, final, overwrite=False)
    _unlink(path)
    return final


def _preview_bytes(image, output_format: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format])
    return buffer.getvalue()


# ---- the images of `url` answers ----------------------------------------------------------------------

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
                if not FILE_NAME.fullmatch(entry.name):
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


def chunks(handle, size: int, chunk: int = 1 << 16):
    """A file's first size bytes in pieces (a plain iterator: Starlette reads it in its threadpool)."""
    with handle:
        left = size
        while left > 0:
            data = handle.read(min(chunk, left))
            if not data:
                return
            left -= len(data)
            yield data


def _take(path: str) -> bytes:
    """A rendered image's bytes, removing the server's copy (read like any file: bounded, regular only).
    Blocking: call it off the event loop."""
    try:
        return read_bounded(path, MAX_IMAGE_BYTES)
    finally:
        _unlink(path)


def _unlink(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
