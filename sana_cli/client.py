"""The attaching side of `sana serve`: find this user's server, send it planned jobs, write what it returns.

Standard library only (no torch, no HTTP framework), so an attached `sana generate` starts fast. The
CLI keeps planning, validation, manifests, claims, resume and atomic writes; the server renders and
returns each image's encoded bytes (with sana-cli's metadata) and the run's events. So stdout, JSON,
exit codes, files and metadata are the in-process ones by construction.

The wire format is generic over the job record and the load options: a job travels as every field of
`plan.ImageJob` (its PIXEL_FIELDS included) but its path, load options as the fields of
`plan.LoadOptions` that decide how a model is loaded. A field added to either flows through unchanged.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import socket
import stat
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from .cache import cache_root
from .errors import EnvironmentProblem, GenerationError, SanaError, UsageError

SOCKET_NAME = "sana.sock"
API_PREFIX = "/v1/sana"
# LoadOptions fields that stay with the client: logging, a partial load, and a per-process memory cap
# (a shared server cannot cap itself for one request; such a run stays in-process).
CLIENT_ONLY_LOAD_FIELDS = ("verbose", "only", "max_memory_gib")
CONNECT_TIMEOUT = 3.0


def socket_dir() -> Path:
    """The user-only directory holding the server's socket, under sana-cli's cache."""
    return cache_root() / "serve"


def socket_path() -> Path:
    return socket_dir() / SOCKET_NAME


# ---- wire format ---------------------------------------------------------------------------------

def job_to_wire(job) -> dict:
    """Every field of an ImageJob but its path (a client path never reaches the server)."""
    data = asdict(job)
    data.pop("path")
    return data


def job_from_wire(data: dict, path: str):
    """The ImageJob a job_to_wire dict describes, writing to `path` (the server's own)."""
    from .plan import ImageJob, PixelOptions

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
    from .plan import LoadOptions

    allowed = {f.name for f in fields(LoadOptions)} - set(CLIENT_ONLY_LOAD_FIELDS)
    unknown = set(data) - allowed
    if unknown:
        raise UsageError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    return LoadOptions(**data)


# ---- connections ---------------------------------------------------------------------------------

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a Unix socket path, or an http host and port."""

    unix: str | None = None
    host: str | None = None
    port: int | None = None
    api_key: str | None = None
    explicit: bool = False  # named by SANA_SERVER: unreachable is an error, not a fallback

    def describe(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"http://{self.host}:{self.port}"

    def connection(self, timeout: float | None = CONNECT_TIMEOUT) -> http.client.HTTPConnection:
        if self.unix:
            return _UnixConnection(self.unix, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = CONNECT_TIMEOUT):
        """(status, JSON body) of one request; OSError when nobody answers."""
        connection = self.connection(timeout)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body),
                               headers=self.headers())
            response = connection.getresponse()
            raw = response.read()
        except http.client.HTTPException as exc:
            raise OSError(f"bad answer: {exc}") from exc
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw or b"{}")
        except ValueError:
            return response.status, {}


def parse_server_url(value: str, api_key: str | None) -> Endpoint:
    """SANA_SERVER: unix:/path/to/socket or http://host:port. Anything else, or any part that a URL
    parser rejects (a bracket left open, a port out of range, control characters), is bad usage."""
    bad = f"SANA_SERVER={value!r} is not http://HOST:PORT or unix:/PATH"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise UsageError(f"{bad} (it holds a control character)")
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path:
            raise UsageError(f"SANA_SERVER={value!r} names no socket path")
        return Endpoint(unix=path, api_key=api_key, explicit=True)
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError:
        raise UsageError(bad) from None
    if (parts.scheme != "http" or not hostname or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None or " " in parts.netloc):
        raise UsageError(bad)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"SANA_SERVER={value!r} has a bad port") from None
    if port is None:
        port = 80
    if not 1 <= port <= 65535:
        raise UsageError(f"SANA_SERVER={value!r} has a bad port")
    return Endpoint(host=hostname, port=port, api_key=api_key, explicit=True)


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


def discover(note=lambda message: None) -> Endpoint | None:
    """The server this command should attach to: SANA_SERVER when set (unreachable: exit 4), else a
    live socket of this user's in the cache directory. A stale socket is removed; one that is not
    safely ours is ignored (with a note)."""
    api_key = os.environ.get("SANA_API_KEY") or None
    explicit = os.environ.get("SANA_SERVER", "").strip()
    if explicit:
        endpoint = parse_server_url(explicit, api_key)
        if endpoint.unix:
            problem = private_place_problem(Path(endpoint.unix), want_socket=True)
            if problem:
                raise EnvironmentProblem(f"SANA_SERVER: {problem}", hint="start `sana serve` or unset SANA_SERVER")
        _check_health(endpoint)
        return endpoint
    path = socket_path()
    if not os.path.lexists(path):
        return None
    problem = (private_place_problem(path.parent, want_socket=False)
               or private_place_problem(path, want_socket=True))
    if problem:
        note(f"not attaching to the server socket: {problem}; rendering here")
        return None
    if remove_if_stale(path):
        note(f"removed the stale server socket {path} (no server listens on it); rendering here")
        return None
    endpoint = Endpoint(unix=str(path), api_key=api_key)
    try:
        _check_health(endpoint)
    except EnvironmentProblem as exc:
        note(f"{exc.message}; rendering here")
        return None
    return endpoint


def _check_health(endpoint: Endpoint) -> dict:
    from . import __version__
    from .plan import KEY_SCHEMA

    try:
        status, body = endpoint.request("GET", f"{API_PREFIX}/health")
    except OSError as exc:
        raise EnvironmentProblem(f"no sana server answers at {endpoint.describe()} "
                                 f"({getattr(exc, 'strerror', None) or exc})",
                                 hint="start `sana serve`, unset SANA_SERVER, or pass --no-server") from None
    if status == 401:
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} refused the API key",
                                 hint="set SANA_API_KEY to the server's key")
    if status != 200:
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} answered HTTP {status}: "
                                 f"{_error_text(body)}")
    if body.get("sana_cli") != __version__ or body.get("key_schema") != KEY_SCHEMA:
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} runs sana-cli "
                                 f"{body.get('sana_cli')}, this is {__version__}",
                                 hint="restart `sana serve` from this installation")
    return body


def _error_text(body: dict) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else "no error message"


INPUT_FILE_FIELDS = ("loras", "controlnet", "control_image", "image")  # job fields that name files on this machine


def uses_input_files(job) -> bool:
    """Whether a job needs a LoRA, a ControlNet or an input image, which only this process may open."""
    return any(getattr(job, name, None) for name in INPUT_FILE_FIELDS)


def attach_blocker(model, options, *, keep_latents: bool, input_files: bool = False) -> str | None:
    """Why this run cannot go to a server the same way it would run here (None: it can)."""
    if model.kind == "local":
        return "a local model directory is loaded by this process (a server never opens a client's path)"
    if input_files:
        return "LoRA, ControlNet and input-image files are read by this process (a server never opens a client's path)"
    if options.max_memory_gib is not None:
        return "--max-memory caps one process's memory, which a shared server cannot do for one request"
    if keep_latents:
        return "--keep-latents writes latents files, which only an in-process run keeps"
    if options.only is not None:
        return "a partial load runs in-process"
    return None


def remote_model(endpoint: Endpoint, model, options) -> "RemoteModel":
    return RemoteModel(endpoint, model, options)


# ---- the attached run ----------------------------------------------------------------------------

class RemoteModel:
    """Stands where a LoadedModel stands in the API: the plan runs on a server, the files are written here."""

    remote = True

    def __init__(self, endpoint: Endpoint, ref, options):
        self.endpoint = endpoint
        self.ref = ref
        self.options = options
        self._description: dict | None = None

    def _model_body(self) -> dict:
        return {"model": self.ref.name if self.ref.kind != "hub" else self.ref.source,
                "revision": self.ref.revision, "load": load_to_wire(self.options)}

    def describe(self) -> dict:
        """The server's LoadedModel.describe() for this model and these options (loads it there)."""
        if self._description is None:
            try:
                status, body = self.endpoint.request("POST", f"{API_PREFIX}/load", self._model_body(), timeout=None)
            except OSError as exc:
                raise self._gone(exc) from None
            if status != 200:
                raise _error_from(status, body)
            self._description = body["model"]
        return self._description

    def _gone(self, exc=None) -> GenerationError:
        why = f" ({getattr(exc, 'strerror', None) or exc})" if exc else ""
        return GenerationError(f"the sana server at {self.endpoint.describe()} went away before the run "
                               f"finished{why}; nothing partial was written",
                               hint="rerun the command (it renders here when no server runs), or pass --no-server")

    def run(self, plan, options, *, events, stop, on_result=None, done=frozenset(), claim=None):
        """The runner's contract (runner.run) with the rendering done by the server."""
        from .events import BatchStarted, ImageFailed, ImageWritten, Noted, Step, Warned
        from .output import write_encoded
        from .results import ImageResult, RunOutcome, StopToken

        stop = stop or StopToken()
        started = time.perf_counter()
        outcome = RunOutcome()
        wanted = []
        for group in plan.groups:
            jobs = [plan.jobs[i] for i in group]
            write = [i not in done for i in group]
            if claim is not None:
                write, _ = claim(jobs, write)
            wanted += [job for job, want in zip(jobs, write) if want]
        by_index = {job.index: job for job in wanted}
        outcome.timings = {"total": 0.0}
        if not wanted:
            return outcome
        body = {**self._model_body(), "decode": options.decode, "force_size": plan.force_size,
                "jobs": [job_to_wire(job) for job in wanted]}
        connection = self.endpoint.connection(timeout=None)
        lines: queue.Queue = queue.Queue()
        try:
            connection.request("POST", f"{API_PREFIX}/jobs", body=json.dumps(body), headers=self.endpoint.headers())
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._gone(exc) from None
        if response.status != 200:
            raw = response.read()
            connection.close()
            try:
                answer = json.loads(raw or b"{}")
            except ValueError:
                answer = {}
            raise _error_from(response.status, answer)

        def read() -> None:
            try:
                for line in response:
                    lines.put(line)
            # The main thread closes the connection once it has the last line, and http.client then fails in
            # whatever way it is caught (ValueError, AttributeError on a released socket, ...): all mean "ended".
            except Exception:  # noqa: BLE001
                pass
            lines.put(None)

        threading.Thread(target=read, name="sana-attach", daemon=True).start()
        finished = False
        seen = set()
        try:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if stop.requested:
                        break
                    continue
                if line is None:
                    break
                message = json.loads(line)
                kind = message.get("type")
                if kind == "step":
                    events(Step(step=message["step"], total=message["total"]))
                elif kind == "batch":
                    jobs = tuple(by_index[i] for i in message["indices"] if i in by_index)
                    events(BatchStarted(number=message["number"], total=message["total"], jobs=jobs))
                elif kind == "warning":
                    if message["message"] not in outcome.warnings:
                        outcome.warnings.append(message["message"])
                    events(Warned(message["message"]))
                elif kind == "note":
                    events(Noted(message["message"]))
                elif kind in ("image", "failed"):
                    job = by_index[message["index"]]
                    seen.add(job.index)
                    result = ImageResult(job=job, decode=message.get("decode"),
                                         fallbacks=tuple(message.get("fallbacks") or ()),
                                         seconds=message.get("seconds", 0.0),
                                         retried_alone=bool(message.get("retried_alone")))
                    if kind == "image":
                        try:
                            result.written = write_encoded(base64.b64decode(message["data"]), job.path,
                                                           overwrite=plan.overwrite)
                        except SanaError as exc:
                            result.error, result.error_exit_code = exc.line(), exc.exit_code
                    else:
                        result.error, result.error_exit_code = message["error"], message.get("exit_code") or 1
                    outcome.results.append(result)
                    if on_result is not None:
                        on_result(result)
                    events(ImageWritten(result) if result.ok else ImageFailed(result))
                    if options.fail_fast and not result.ok:
                        break
                elif kind == "done":
                    self._description = message.get("model") or self._description
                    outcome.peak_memory_bytes = message.get("peak_memory_bytes")
                    outcome.peak_reserved_bytes = message.get("peak_reserved_bytes")
                    server_timings = message.get("timings") or {}
                    finished = True
                    break
                elif kind == "error":
                    raise _error_from(message.get("status", 500), {"error": message})
        finally:
            with _suppressed():
                connection.sock and connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
        if not finished and not stop.requested and not (options.fail_fast and outcome.failed):
            raise self._gone()
        outcome.stopped_by = stop.signal_number
        timings = {key: server_timings.get(key, 0.0) for key in ("encode", "denoise", "decode")} if finished else {}
        timings.update(write=0.0, total=round(time.perf_counter() - started, 4))
        outcome.timings = timings
        outcome.results.sort(key=lambda r: r.job.index)
        return outcome


class _suppressed:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def _error_from(status: int, body: dict) -> SanaError:
    """A server's error answer as the error the CLI would have raised itself."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or f"the sana server answered HTTP {status}")
    code = error.get("exit_code")
    if status in (400, 404, 413, 422):
        exc = UsageError(message)
    elif status in (401, 403, 503, 429):
        exc = EnvironmentProblem(message)
    else:
        exc = GenerationError(message)
    if isinstance(code, int) and 1 <= code <= 4:
        exc.exit_code = code
    return exc
