"""The attach protocol between `sana serve` and an attached `sana generate`/`sana batch`, defined once and
imported by both sides: where the socket is and when it is safe, the endpoints, the handshake (version and
KEY_SCHEMA), the request shapes (a job, load options), the NDJSON events a run answers with, the error
object, and the bounds the client holds every answer to. A shape changed here changes for both.

Standard library only at import (the planning types are imported where used), so an attached run starts fast.

A job travels as every field of `plan.ImageJob` (its PIXEL_FIELDS included) but its path, load options as
the fields of `plan.LoadOptions` that decide how a model is loaded. A field added to either flows through.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import stat
from dataclasses import asdict, fields
from pathlib import Path

from ..cache import cache_root
from ..errors import EnvironmentProblem, GenerationError, SanaError, UsageError
from ..planning.fields import FILE_FIELDS

# ---- where: the user-only socket, and the endpoints ---------------------------------------------------

SOCKET_NAME = "sana.sock"
API_PREFIX = "/v1/sana"
HEALTH_PATH = f"{API_PREFIX}/health"  # GET: the handshake
LOAD_PATH = f"{API_PREFIX}/load"  # POST {model, revision, load}: the loaded model's description
JOBS_PATH = f"{API_PREFIX}/jobs"  # POST {model, revision, load, decode, force_size, jobs}: NDJSON events
JSON = "application/json"
NDJSON = "application/x-ndjson"
CONNECT_TIMEOUT = 3.0


def auth_headers(api_key: str | None) -> dict:
    """The request headers of a client holding this API key (none: a server without a key)."""
    headers = {"Content-Type": JSON}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def given_key(authorization: str) -> str:
    """The API key an Authorization header carries ("" when it carries none)."""
    return authorization[7:] if authorization[:7].lower() == "bearer " else ""


def socket_dir() -> Path:
    """The user-only directory holding the server's socket, under sana-cli's cache."""
    return cache_root() / "serve"


def socket_path() -> Path:
    return socket_dir() / SOCKET_NAME


def private_place_problem(path: Path, *, want_socket: bool) -> str | None:
    """Why a socket (or its directory) must not be trusted: not ours, open to others, or not what it
    should be (a symbolic link, a file). None when it is safe."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    kind_ok = stat.S_ISSOCK(info.st_mode) if want_socket else stat.S_ISDIR(info.st_mode)
    if not kind_ok:
        return f"{path} is not a {'socket' if want_socket else 'directory'}"
    if info.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if info.st_mode & 0o077:
        return f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _socket_live(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        sock.close()


def remove_if_stale(path: Path) -> bool:
    """Remove our socket file when nobody listens on it (a server that crashed); True if removed."""
    if private_place_problem(path, want_socket=True) is not None or _socket_live(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


# ---- the handshake ------------------------------------------------------------------------------------

def health_answer(*, pid: int, loaded: list, queued: int, draining: bool) -> dict:
    """GET /health: what the server says of itself; `sana_cli` and `key_schema` are the handshake."""
    from ..planning.plan import KEY_SCHEMA
    from ..version import __version__

    return {"ok": True, "sana_cli": __version__, "key_schema": KEY_SCHEMA, "pid": pid, "loaded": loaded,
            "queued": queued, "draining": draining}


def same_installation(answer: dict) -> bool:
    """Whether a health answer comes from a server of this version with this key schema (its keys, and so
    its images, are the ones this process would make)."""
    from ..planning.plan import KEY_SCHEMA
    from ..version import __version__

    return answer.get("sana_cli") == __version__ and answer.get("key_schema") == KEY_SCHEMA


# ---- requests: a job, load options --------------------------------------------------------------------

# LoadOptions fields that stay with the client: logging, a partial load, and a per-process memory cap
# (a shared server cannot cap itself for one request; such a run stays in-process).
CLIENT_ONLY_LOAD_FIELDS = ("verbose", "only", "max_memory_gib")
INPUT_FILE_FIELDS = FILE_FIELDS  # job fields that name files on this machine (the field table's)
# Input files travel as their bytes: each at most this large, and one request's files together at most
# MAX_INPUT_BYTES (a batch whose files are larger is sent in several requests).
MAX_INPUT_FILE_BYTES = 256 << 20
MAX_INPUT_BYTES = 512 << 20
MAX_JOBS_BODY = (256 << 20) + MAX_INPUT_BYTES * 4 // 3 + (1 << 20)  # a batch file's jobs and their files in base64


def model_request(ref, options) -> dict:
    """POST /load's body, and the start of POST /jobs's: the model by preset name or hub id (a client's path
    never reaches the server), its revision, and the load options that decide how it is loaded."""
    return {"model": ref.name if ref.kind != "hub" else ref.source, "revision": ref.revision,
            "load": load_to_wire(options)}


def jobs_request(ref, options, *, decode: str, force_size: bool, jobs, files: dict | None = None) -> dict:
    """POST /jobs's body: planned jobs to render with this model, decode and size rule, and the bytes of
    the input files they name ({sha256: base64}; see input_files)."""
    return {**model_request(ref, options), "decode": decode, "force_size": force_size,
            "jobs": [job_to_wire(job) for job in jobs],
            "files": {digest: base64.b64encode(data).decode() for digest, data in (files or {}).items()}}


def job_to_wire(job) -> dict:
    """Every field of an ImageJob but its path (a client path never reaches the server), and the
    image format the path asks for (its suffix), which the server encodes."""
    data = asdict(job)
    data["ext"] = os.path.splitext(data.pop("path"))[1].lower() or ".png"
    return data


def job_from_wire(data: dict, path: str):
    """The ImageJob a job_to_wire dict describes, writing to `path` (the server's own)."""
    from ..planning.plan import ImageJob, PixelOptions

    known = {f.name for f in fields(ImageJob)}
    unknown = set(data) - known - {"path"}
    if unknown:
        raise UsageError(f"unknown job field(s): {', '.join(sorted(unknown))}")
    values = {**data, "path": path}
    values["pixels"] = PixelOptions(**values.get("pixels", {}))
    for field in fields(ImageJob):  # JSON made tuples into lists; the key tells () from []
        if isinstance(field.default, tuple) and isinstance(values.get(field.name), list):
            values[field.name] = _tuples(values[field.name])
    return ImageJob(**values)


def _tuples(value):
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def load_to_wire(options) -> dict:
    return {name: value for name, value in asdict(options).items() if name not in CLIENT_ONLY_LOAD_FIELDS}


def load_from_wire(data: dict):
    from ..planning.plan import LoadOptions

    allowed = {f.name for f in fields(LoadOptions)} - set(CLIENT_ONLY_LOAD_FIELDS)
    unknown = set(data) - allowed
    if unknown:
        raise UsageError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    return LoadOptions(**data)


# ---- input files: sent as bytes, checked by hash on both sides --------------------------------------
# A job names its input files by the path the client wrote and the sha256 planning took of their bytes
# (the key holds the sha256). The client sends the bytes; the server keeps them only if they hash to
# what the job says, and renders from its own copy (inputs.supplied): it never opens a client's path.
# A row of the field table that names a file, X, carries its bytes' hash in the row X_sha256; LoRAs
# carry theirs in each (id, sha256, scale). A ControlNet is a model: a preset or hub id travels by
# name; a local ControlNet directory is a whole model, which the client does not send (in-process).


def file_refs(job) -> list[tuple[str, str, str]]:
    """(field, the path or id the client named, sha256) of every input file a job needs the bytes of."""
    refs = []
    for name in INPUT_FILE_FIELDS:
        value = getattr(job, name, None)
        if not value:
            continue
        if name == "loras":
            refs += [(name, identity, digest) for identity, digest, _ in value]
        elif name != "controlnet":
            refs.append((name, value, getattr(job, f"{name}_sha256", None)))
    return refs


LOCAL_CONTROLNET = "a local ControlNet directory is loaded by this process (a server never opens a client's path)"


def unsendable(job) -> str | None:
    """Why a job's inputs cannot go to a server (None: they can): a local ControlNet directory."""
    controlnet = getattr(job, "controlnet", None)
    return LOCAL_CONTROLNET if controlnet and os.path.isabs(controlnet) else None


def file_sources(jobs, offline: bool = False) -> dict:
    """{sha256: (file to read, what it is, as the user named it)} of every input file of these jobs, each
    no larger than MAX_INPUT_FILE_BYTES (a larger one is a usage error before anything is sent)."""
    from ..inputs.lora import weights_file

    sources: dict = {}
    for job in jobs:
        for name, value, digest in file_refs(job):
            if digest in sources:
                continue
            what = "LoRA" if name == "loras" else f"--{name.replace('_', '-')}"
            path = weights_file(value, digest, offline) if name == "loras" else value
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                raise UsageError(f"{what} {value}: {exc.strerror or exc}") from None
            if size > MAX_INPUT_FILE_BYTES:
                raise UsageError(f"{what} {value} is larger than the {MAX_INPUT_FILE_BYTES >> 20} MiB a file sent "
                                 "to a server may be", hint="pass --no-server to render it in this process")
            sources[digest] = (path, what, value, size)
    return sources


def in_requests(jobs, sources: dict) -> list[list]:
    """The jobs in order, cut into the requests that send them: each request's files together at most
    MAX_INPUT_BYTES (a request sends the files its jobs name)."""
    requests, current, files = [], [], set()
    for job in jobs:
        wanted = files | {digest for _, _, digest in file_refs(job)}
        if current and sum(sources[digest][3] for digest in wanted) > MAX_INPUT_BYTES:
            requests.append(current)
            current, wanted = [], {digest for _, _, digest in file_refs(job)}
        current.append(job)
        files = wanted
    return requests + ([current] if current else [])


def input_files(jobs, sources: dict) -> dict:
    """{sha256: bytes} of the input files of these jobs, each read now (bounded, a regular file) and
    checked against the sha256 planning took: a file changed since is a usage error, never sent."""
    files: dict = {}
    for job in jobs:
        for _, _, digest in file_refs(job):
            if digest not in files:
                path, what, shown, _ = sources[digest]
                files[digest] = read_input_file(path, what, shown, digest)
    return files


def read_input_file(path: str, what: str, shown: str, digest: str | None) -> bytes:
    """The bytes of one input file, read now: at most MAX_INPUT_FILE_BYTES (also if it grew since it was
    planned) and hashing to `digest`, else a usage error naming it."""
    import hashlib

    from ..safeio import read_bounded

    try:
        data = read_bounded(path, MAX_INPUT_FILE_BYTES)
    except OSError as exc:
        try:
            grown = os.stat(path).st_size > MAX_INPUT_FILE_BYTES
        except OSError:
            grown = False
        if grown:
            raise UsageError(f"{what} {shown} is larger than the {MAX_INPUT_FILE_BYTES >> 20} MiB a file sent to a "
                             "server may be", hint="pass --no-server to render it in this process") from None
        raise UsageError(f"{what} {shown}: {getattr(exc, 'strerror', None) or exc}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise UsageError(f"{what} {shown} changed after the run was planned (its sha256 differs); run again")
    return data


def files_from_wire(raw) -> dict:
    """The server's side: {sha256: bytes} of a jobs body's files, each decoded, bounded and hashed. A file
    whose bytes do not hash to the sha256 it is sent under is a usage error."""
    import hashlib

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError("'files' must be an object of sha256 to base64 bytes")
    files, total = {}, 0
    for digest, data in raw.items():
        if not isinstance(data, str) or not isinstance(digest, str) or len(digest) != 64:
            raise UsageError("'files' must be an object of sha256 to base64 bytes")
        if len(data) > (MAX_INPUT_FILE_BYTES * 4 // 3) + 4:
            raise UsageError(f"an input file is larger than the {MAX_INPUT_FILE_BYTES >> 20} MiB a file sent to a "
                             "server may be")
        try:
            content = base64.b64decode(data, validate=True)
        except ValueError:
            raise UsageError("an input file's bytes are not base64") from None
        total += len(content)
        if total > MAX_INPUT_BYTES:
            raise UsageError(f"the input files of one request are larger than {MAX_INPUT_BYTES >> 20} MiB")
        if hashlib.sha256(content).hexdigest() != digest:
            raise UsageError(f"an input file's bytes do not hash to the sha256 {short(digest, 64)} it was sent as "
                             "(changed on the way?)")
        files[digest] = content
    return files


# ---- answers: bounds ----------------------------------------------------------------------------------

# What a server may send back is bounded: a short answer (health, load, an error) and, in a run's event
# stream, each line (an image's line by its planned pixel count) and the whole stream.
MAX_ANSWER_BYTES = 1 << 20
EVENT_SLACK_BYTES = 64 << 20  # steps, batches, warnings and notes of a whole run
IMAGE_SLACK_BYTES = 1 << 20  # an encoded image's metadata and container beyond 4 bytes a pixel
MAX_TEXT_CHARS = 20000  # a warning, a note or an error message
IMAGE_EXIT_CODES = (1, 2, 4)  # the documented codes an image's failure may carry; any other is 1
DESCRIPTION_FIELDS = ("model", "model_id", "revision", "commit", "pipeline", "dtype", "device")  # what records use
TIMING_NAMES = ("encode", "denoise", "decode")


class MalformedAnswer(ValueError):
    """What a server sent is not what sana-cli's server sends."""


def image_line_limit(job) -> int:
    """The longest event line an image of this job may take: its encoded bytes (at most 4 bytes a pixel
    and the metadata) in base64, and the event's other fields."""
    return (job.width * job.height * 4 + IMAGE_SLACK_BYTES) * 4 // 3 + (64 << 10)


def answer_object(raw: bytes) -> dict:
    """A short answer (health, load, an error) as its JSON object; MalformedAnswer for anything else."""
    if len(raw) > MAX_ANSWER_BYTES:
        raise MalformedAnswer(f"an answer longer than {MAX_ANSWER_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise MalformedAnswer("an answer that is not JSON") from None
    if not isinstance(body, dict):
        raise MalformedAnswer(f"a JSON {type(body).__name__} where an object belongs")
    return body


def short(value, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- answers: the NDJSON events of POST /jobs ---------------------------------------------------------
# The server's render loop makes these messages (and "partial" previews, which only OpenAI streams send);
# an image message carries the server's path, which attached_line replaces by the encoded bytes.

def step_event(step: int, total: int) -> dict:
    return {"type": "step", "step": step, "total": total}


def batch_event(number: int, total: int, indices: list) -> dict:
    return {"type": "batch", "number": number, "total": total, "indices": indices}


def text_event(kind: str, message: str) -> dict:
    """A "warning" or a "note"."""
    return {"type": kind, "message": message}


def result_event(result, index: int) -> dict:
    """An image written ("image", with the server's path) or failed ("failed", with its error and exit code)."""
    message = {"type": "image" if result.ok else "failed", "index": index, "decode": result.decode,
               "fallbacks": list(result.fallbacks), "seconds": round(result.seconds, 4),
               "retried_alone": result.retried_alone, "path": result.job.path, "seed": result.job.seed,
               "key": result.job.key}
    if not result.ok:
        message.update(error=result.error, exit_code=result.error_exit_code or 1)
    return message


def done_event(outcome, model: dict) -> dict:
    return {"type": "done", "timings": outcome.timings, "model": model,
            "peak_memory_bytes": outcome.peak_memory_bytes, "peak_reserved_bytes": outcome.peak_reserved_bytes}


def error_event(message: str, exit_code: int, status: int) -> dict:
    """The whole run failed: the HTTP status it would have had, and the CLI's exit code."""
    return {"type": "error", "message": message, "exit_code": exit_code, "status": status}


def attached_line(message: dict, data: bytes | None = None) -> bytes:
    """One event as its NDJSON line; an image's with its encoded bytes (its path already taken out)."""
    if data is not None:
        message = {**message, "data": base64.b64encode(data).decode()}
    return (json.dumps(message) + "\n").encode()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(message: dict, name: str, *, optional: bool = False) -> str | None:
    value = message.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise MalformedAnswer(f"a {message.get('type')} event whose {name!r} is not text")
    return short(value, MAX_TEXT_CHARS)


def read_event(line: bytes, by_index: dict, seen: set) -> dict:
    """One event line from a server, checked field by field against what this run asked for; the
    values the client uses (an image's bytes decoded). MalformedAnswer for anything else."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise MalformedAnswer("a line that is not JSON") from None
    if not isinstance(message, dict):
        raise MalformedAnswer(f"a JSON {type(message).__name__} where an event object belongs")
    kind = message.get("type")

    def ints(*names: str) -> None:
        for name in names:
            if not _is_int(message.get(name)):
                raise MalformedAnswer(f"a {kind} event whose {name!r} is not a whole number")

    def asked(index) -> int:
        if not _is_int(index) or index not in by_index:
            raise MalformedAnswer(f"an event for image {short(index, 40)}, which this run never asked for")
        return index

    if kind == "step":
        ints("step", "total")
        return {"type": kind, "step": message["step"], "total": message["total"]}
    if kind == "batch":
        ints("number", "total")
        indices = message.get("indices")
        if not isinstance(indices, list) or not indices:
            raise MalformedAnswer("a batch event without its image indices")
        return {"type": kind, "number": message["number"], "total": message["total"],
                "indices": [asked(index) for index in indices]}
    if kind in ("warning", "note"):
        return {"type": kind, "message": _text(message, "message")}
    if kind in ("image", "failed"):
        index = asked(message.get("index"))
        if index in seen:
            raise MalformedAnswer(f"image {index} sent twice")
        fallbacks = message.get("fallbacks") or []
        if not isinstance(fallbacks, list) or not all(isinstance(item, str) for item in fallbacks):
            raise MalformedAnswer(f"an {kind} event whose 'fallbacks' is not a list of text")
        seconds = message.get("seconds", 0.0)
        checked = {"type": kind, "index": index, "decode": _text(message, "decode", optional=True),
                   "fallbacks": tuple(short(item, 200) for item in fallbacks[:16]),
                   "seconds": float(seconds) if _number(seconds) else 0.0,
                   "retried_alone": message.get("retried_alone") is True}
        if kind == "image":
            data = message.get("data")
            if not isinstance(data, str):
                raise MalformedAnswer(f"image {index} without its data")
            try:
                checked["data"] = base64.b64decode(data, validate=True)
            except ValueError:
                raise MalformedAnswer(f"image {index} whose data is not base64") from None
        else:
            code = message.get("exit_code")
            checked["error"] = _text(message, "error")
            checked["exit_code"] = code if _is_int(code) and code in IMAGE_EXIT_CODES else 1
        return checked
    if kind == "done":
        model, timings = message.get("model"), message.get("timings") or {}
        model = None if model is None else read_description(model)
        if not isinstance(timings, dict):
            raise MalformedAnswer("a done event whose 'timings' is not an object")
        peaks = {name: message.get(name) if _is_int(message.get(name)) else None
                 for name in ("peak_memory_bytes", "peak_reserved_bytes")}
        return {"type": kind, "model": model, **peaks,
                "timings": {name: float(value) for name, value in timings.items()
                            if name in TIMING_NAMES and _number(value)}}
    if kind == "error":
        status = message.get("status", 500)
        code = message.get("exit_code")
        return {"type": kind, "status": status if _is_int(status) else 500, "message": _text(message, "message"),
                "exit_code": code if _is_int(code) else None}
    raise MalformedAnswer(f"an event of unknown type {short(kind, 40)!r}")


def read_description(model) -> dict:
    """A loaded model's description from a server: an object with text (or null) for every field that
    metadata, manifests and JSON output take from it."""
    if not isinstance(model, dict):
        raise MalformedAnswer("a model description that is not an object")
    for name in DESCRIPTION_FIELDS:
        value = model.get(name)
        if not (isinstance(value, str) or (value is None and name in ("revision", "commit"))):
            raise MalformedAnswer(f"a model description whose {name!r} is not text")
    return model


# ---- errors -------------------------------------------------------------------------------------------
# An error answer is OpenAI's object {"error": {message, type, param, code}} plus sana-cli's exit_code; the
# HTTP status carries the kind of failure (400 usage, 503 environment, 500 run time), and a client makes of
# it the error the CLI would have raised itself.

USAGE_STATUSES = (400, 404, 413, 422)
ENVIRONMENT_STATUSES = (401, 403, 429, 503)


def error_object(message: str, type_: str, param: str | None, code: str | None, exit_code: int | None) -> dict:
    error = {"message": message, "type": type_, "param": param, "code": code}
    if exit_code is not None:
        error["exit_code"] = exit_code
    return {"error": error}


def error_text(body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else "no error message"


def error_from(status: int, body: dict) -> SanaError:
    """A server's error answer as the error the CLI would have raised itself."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = short(error.get("message") or f"the sana server answered HTTP {status}", MAX_TEXT_CHARS)
    code = error.get("exit_code")
    if status in USAGE_STATUSES:
        exc = UsageError(message)
    elif status in ENVIRONMENT_STATUSES:
        exc = EnvironmentProblem(message)
    else:
        exc = GenerationError(message)
    if _is_int(code) and 1 <= code <= 4:  # only documented codes leave the CLI
        exc.exit_code = code
    return exc
