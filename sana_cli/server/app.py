"""`sana serve`'s routes: each handler checks who asks, reads the body, and hands over to the module that
does the work (intake plans it, answers reads the queue into an answer). The state they share is one
ServerState, reached through the request (the `state` dependency).

Endpoints:
  GET  /                        a small page: type a prompt, see the images as they finish
  GET  /v1/models[/ID]          the presets, the loaded models and the operator's aliases (OpenAI's form)
  POST /v1/images/generations   OpenAI's images API (b64_json or url), Sana's own parameters as extra fields
                                (openai_images checks every field); "stream": true answers OpenAI's
                                Server-Sent Events (partial images, then each completed image)
  POST /v1/images/edits         OpenAI's image edits (a multipart form): image-to-image from one uploaded image
  POST /v1/images/variations    an OpenAI error: image-to-image needs a prompt (use /edits)
  GET  /openapi.json            the OpenAPI document of these public endpoints
  GET  /v1/images/files/ID      an image of a `url` response (only the server's own output directory)
  GET  /v1/sana/health          version and state (the attaching CLI's handshake; the protocol is in wire)
  POST /v1/sana/load            load a model with load options; its description
  POST /v1/sana/jobs            planned jobs from an attached CLI; NDJSON events and encoded images

Every request is planned by the same code as the CLI before it queues; its errors are OpenAI error
objects with the CLI's message text. Nothing a client sends names a path on the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import SanaError
from ..models import presets
from ..safeio import MAX_IMAGE_BYTES, open_regular
from ..version import __version__
from . import answers, intake
from . import openai_images as openai_api
from ..planning.fields import FILE_FIELDS
from .http_io import Guard, RequestId, accepting, authorize, from_sana, install_error_answers, read_form, read_json
from .http_io import server_state
from .http_io import MAX_BODY
from .openai_images import ApiError
from .page import PAGE
from .state import ServerConfig, ServerState
from .wire import HEALTH_PATH, JOBS_PATH, LOAD_PATH, MAX_JOBS_BODY, health_answer
from .work_queue import Scheduler

routes = APIRouter()
State = Depends(server_state)


def create_app(scheduler: Scheduler, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="sana serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sana = ServerState(scheduler=scheduler, config=config)
    app.add_middleware(RequestId)
    install_error_answers(app)
    app.include_router(routes)
    app.add_middleware(Guard, config=config)
    return app


@routes.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(PAGE)


@routes.get("/openapi.json")
async def openapi():
    from .openapi import document

    return document(__version__)


def _model_names(state: ServerState) -> tuple[list[str], set]:
    loaded = set(state.scheduler.models.loaded_names())
    names = [p.name for p in presets.PRESETS.values()] if isinstance(presets.PRESETS, dict) else \
        [p.name for p in presets.PRESETS]
    names += [name for name in ("tiny", "tiny-sprint", "tiny-teacher") if name not in names]
    names += sorted(loaded - set(names))
    names += [name for name in state.config.aliases.names() if name not in names]
    return names, loaded


def _model_object(state: ServerState, name: str, loaded: set) -> dict:
    target = state.config.aliases.resolve(name)
    item = {"id": name, "object": "model", "created": 0, "owned_by": "sana-cli", "loaded": target in loaded}
    if target != name:
        item["alias_of"] = target
    return item


@routes.get("/v1/models")
async def models(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    names, loaded = _model_names(state)
    return {"object": "list", "data": [_model_object(state, name, loaded) for name in names]}


@routes.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    names, loaded = _model_names(state)
    if model_id not in names:
        raise ApiError(404, f"the model '{model_id}' does not exist here (GET /v1/models lists them)",
                       param="model", code="model_not_found")
    return _model_object(state, model_id, loaded)


@routes.post("/v1/images/edits")
async def edits(request: HttpRequest, state: ServerState = State):
    """OpenAI's image edits: a multipart form with one start image (and a mask where the server has mask
    input), planned and rendered as image-to-image with the form's other fields as a generation's."""
    authorize(request, state.config)
    accepting(state)
    parts = await read_form(request, openai_api.MAX_EDIT_BODY, max_files=openai_api.MAX_EDIT_FILES,
                            max_fields=openai_api.MAX_EDIT_FIELDS)
    file_fields = tuple(name for name in openai_api.EDIT_FILES if name in FILE_FIELDS)
    asked, uploads = openai_api.parse_edit(parts, file_fields)
    key = _idempotency_key(request)

    async def answer(watch: bool):
        work, fields_ = await run_in_threadpool(intake.openai_work, asked, state.config, state.scheduler, uploads)
        if asked.stream:
            return answers.openai_events(state, request, work, fields_)
        return await answers.openai_answer(state, request, work, fields_, watch=watch)

    if asked.stream or key is None:
        return await answer(watch=True)
    # A retry is the same form: its fields, and each file by the sha256 of its bytes.
    form = {"edit": [[name, value if isinstance(value, str) else hashlib.sha256(value[1]).hexdigest()]
                     for name, value in parts]}
    return await answers.remembered(state, key, form, lambda: answer(watch=False))


def _idempotency_key(request: HttpRequest) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not answers.IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "the Idempotency-Key header must be 1..256 visible ASCII characters",
                       param="Idempotency-Key", code="invalid_idempotency_key")
    return key


@routes.post("/v1/images/variations")
async def variations(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    raise ApiError(400, "image variations are not supported: Sana's image-to-image needs a prompt saying what to "
                   "make of the image; send it to POST /v1/images/edits with a prompt (and 'strength')",
                   param="prompt", code="unsupported_endpoint")


@routes.get(HEALTH_PATH)
async def health(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    scheduler = state.scheduler
    return health_answer(pid=os.getpid(), loaded=scheduler.models.loaded_names(), queued=scheduler.queued(),
                         draining=state.config.draining)


@routes.post(LOAD_PATH)
async def load(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    accepting(state)
    body = await read_json(request, MAX_BODY)
    ref, options = await run_in_threadpool(intake.model_and_options, body)
    try:
        loaded = await asyncio.to_thread(state.scheduler.models.get, ref, options)
    except SanaError as exc:
        raise from_sana(exc) from None
    return {"model": loaded.describe()}


@routes.post(JOBS_PATH)
async def jobs(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    accepting(state)
    body = await read_json(request, MAX_JOBS_BODY)
    work = await run_in_threadpool(intake.attached_work, state, body)
    return answers.attached_stream(state, request, work)


@routes.post("/v1/images/generations")
async def generations(request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    accepting(state)
    body = await read_json(request, MAX_BODY)
    asked = openai_api.parse(body)
    key = _idempotency_key(request)
    work, answer = await run_in_threadpool(intake.openai_work, asked, state.config, state.scheduler)
    if asked.stream:
        return answers.openai_events(state, request, work, answer)
    if key is None:
        return await answers.openai_answer(state, request, work, answer, watch=True)
    return await answers.remembered(state, key, body,
                                    lambda: answers.openai_answer(state, request, work, answer, watch=False))


@routes.get("/v1/images/files/{name}")
async def files(name: str, request: HttpRequest, state: ServerState = State):
    authorize(request, state.config)
    if not answers.FILE_NAME.fullmatch(name):
        raise ApiError(404, "no such image", code="not_found")
    try:  # the safe open (never blocks on a FIFO, regular files only, no links), off the event loop
        handle = await run_in_threadpool(open_regular, state.config.output_dir / name, MAX_IMAGE_BYTES,
                                         follow_links=False)
    except OSError:
        raise ApiError(404, "no such image", code="not_found") from None
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(answers.chunks(handle, size), headers={"Content-Length": str(size)},
                             media_type={"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[
                                 name.rsplit(".", 1)[1]])
