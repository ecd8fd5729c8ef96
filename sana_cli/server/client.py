"""The attaching side of `sana serve`: find this user's server, send it planned jobs, write what it returns.

Standard library only (no torch, no HTTP framework), so an attached `sana generate` starts fast. The
CLI keeps planning, validation, manifests, claims, resume and atomic writes; the server renders and
returns each image's encoded bytes (with sana-cli's metadata) and the run's events. So stdout, JSON,
exit codes, files and metadata are the in-process ones by construction.

What travels between the two, and the bounds every answer is held to, is defined once in `wire`.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import EnvironmentProblem, GenerationError, SanaError, UsageError
from .wire import (
    CONNECT_TIMEOUT,
    EVENT_SLACK_BYTES,
    HEALTH_PATH,
    JOBS_PATH,
    LOAD_PATH,
    MAX_ANSWER_BYTES,
    MalformedAnswer,
    answer_object,
    auth_headers,
    error_from,
    error_text,
    file_sources,
    image_line_limit,
    in_requests,
    input_files,
    jobs_request,
    model_request,
    private_place_problem,
    read_description,
    read_event,
    remove_if_stale,
    same_installation,
    short,
    socket_path,
)

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
        return auth_headers(self.api_key)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = CONNECT_TIMEOUT):
        """(status, JSON object) of one request; OSError when nobody answers, MalformedAnswer when the
        answer is larger than MAX_ANSWER_BYTES or not a JSON object."""
        connection = self.connection(timeout)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body),
                               headers=self.headers())
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER_BYTES + 1)
        except http.client.HTTPException as exc:
            raise OSError(f"bad answer: {exc}") from exc
        finally:
            connection.close()
        return response.status, answer_object(raw)


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
    from ..version import __version__

    try:
        status, body = endpoint.request("GET", HEALTH_PATH)
    except MalformedAnswer as exc:
        raise EnvironmentProblem(f"the server at {endpoint.describe()} answered the handshake with a malformed "
                                 f"answer ({exc}): it is not a sana server",
                                 hint="start `sana serve`, unset SANA_SERVER, or pass --no-server") from None
    except OSError as exc:
        raise EnvironmentProblem(f"no sana server answers at {endpoint.describe()} "
                                 f"({getattr(exc, 'strerror', None) or exc})",
                                 hint="start `sana serve`, unset SANA_SERVER, or pass --no-server") from None
    if status == 401:
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} refused the API key",
                                 hint="set SANA_API_KEY to the server's key")
    if status != 200:
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} answered HTTP {status}: "
                                 f"{error_text(body)}")
    if not same_installation(body):
        raise EnvironmentProblem(f"the sana server at {endpoint.describe()} runs sana-cli "
                                 f"{short(body.get('sana_cli'), 40)}, this is {__version__}",
                                 hint="restart `sana serve` from this installation")
    return body


def attach_blocker(model, options, *, keep_latents: bool, jobs=(), controlnet: str | None = None) -> str | None:
    """Why this run cannot go to a server the same way it would run here (None: it can). Input images and
    LoRAs travel as their bytes; a local ControlNet directory (a job's, or a batch's --controlnet) does not."""
    from .wire import LOCAL_CONTROLNET, unsendable

    if model.kind == "local":
        return "a local model directory is loaded by this process (a server never opens a client's path)"
    problem = next((why for why in map(unsendable, jobs) if why), None)
    if problem is not None:
        return problem
    if controlnet and os.path.exists(os.path.expanduser(controlnet)):
        return LOCAL_CONTROLNET
    if options.max_memory_gib is not None:
        return "--max-memory caps one process's memory, which a shared server cannot do for one request"
    if keep_latents:
        return "--keep-latents writes latents files, which only an in-process run keeps"
    if options.only is not None:
        return "a partial load runs in-process"
    return None


def remote_model(endpoint: Endpoint, model, options, announce=None) -> "RemoteModel":
    return RemoteModel(endpoint, model, options, announce=announce)


# ---- the attached run ----------------------------------------------------------------------------

class RemoteModel:
    """Stands where a LoadedModel stands in the API: the plan runs on a server, the files are written here.

    Everything the server sends is untrusted: each event is checked against what was asked (its type,
    fields and the image index it names), each image against its job (the format asked for, the planned
    size and the key embedded in its metadata) before it is written, and every line and the whole answer
    are bounded. Anything else is one "malformed" error (exit 1); the images written before it are whole
    and recorded, nothing partial is. A "done" that leaves planned images unsent records them as failed."""

    remote = True

    def __init__(self, endpoint: Endpoint, ref, options, announce=None):
        self.endpoint = endpoint
        self.ref = ref
        self.options = options
        self._description: dict | None = None
        self._announce = announce  # said once, when the first image is sent to the server

    def describe(self) -> dict:
        """The server's LoadedModel.describe() for this model and these options (loads it there)."""
        if self._description is None:
            try:
                status, body = self.endpoint.request("POST", LOAD_PATH, model_request(self.ref, self.options),
                                                     timeout=None)
            except MalformedAnswer as exc:
                raise self._malformed(str(exc)) from None
            except OSError as exc:
                raise self._gone(exc) from None
            if status != 200:
                raise error_from(status, body)
            try:
                self._description = read_description(body.get("model"))
            except MalformedAnswer as exc:
                raise self._malformed(str(exc)) from None
        return self._description

    def _gone(self, exc=None) -> GenerationError:
        why = f" ({getattr(exc, 'strerror', None) or exc})" if exc else ""
        return GenerationError(f"the sana server at {self.endpoint.describe()} went away before the run "
                               f"finished{why}; nothing partial was written",
                               hint="rerun the command (it renders here when no server runs), or pass --no-server")

    def _malformed(self, why: str) -> GenerationError:
        return GenerationError(f"the answer of the sana server at {self.endpoint.describe()} was malformed "
                               f"({short(why, 200)}); nothing partial was written",
                               hint="restart `sana serve` from this installation, or pass --no-server")

    def run(self, plan, options, *, events, stop, on_result=None, done=frozenset(), claim=None):
        """The runner's contract (runner.run) with the rendering done by the server: the same claims
        (images another live process holds are waited for, then taken or found done), the same
        "done" positions, the same outcome."""
        from ..reporting.events import Noted
        from ..reporting.results import RunOutcome, StopToken

        stop = stop or StopToken()
        started = time.perf_counter()
        outcome = RunOutcome()
        timings = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}
        tried: set[int] = set()  # positions sent to the server (or handed to their holder)

        def halted() -> bool:
            return stop.requested or (options.fail_fast and bool(outcome.failed))

        def claimable(groups: list[list[int]]) -> tuple[list, list[list[int]]]:
            """The jobs of groups this process may render now, and the groups another process holds."""
            from ..planning.keys import claim_group

            wanted, waiting = [], []
            for group in groups:
                jobs, write, busy = claim_group(plan.jobs, group, done, tried, claim)
                wanted += [job for job, want in zip(jobs, write) if want]
                if busy:
                    waiting.append(group)
            return wanted, waiting

        def render(wanted: list) -> None:
            # Input files travel as bytes: each checked against its bound first, then read (and checked
            # against the hash planning took) just before the request that sends it.
            sources = file_sources(wanted, self.options.offline)
            for part in in_requests(wanted, sources):
                if halted():
                    break
                files = input_files(part, sources)
                if self._announce is not None:
                    self._announce()
                    self._announce = None
                for name, value in self._render(plan, options, part, outcome, events, stop, on_result,
                                                files).items():
                    timings[name] += value

        pending = [group for group in plan.groups if any(i not in done for i in group)]
        wanted, waiting = claimable(pending)
        if wanted:
            render(wanted)
        if waiting and not halted():
            count = sum(len(group) for group in waiting)
            events(Noted(f"waiting for another process to finish image(s) of {len(waiting)} GPU batch(es) "
                         f"({count} image(s)) it claimed"))
        while waiting and not halted():  # images other processes were rendering: done by them, or ours
            time.sleep(0.5)
            wanted, waiting = claimable(waiting)
            if wanted and not halted():
                render(wanted)
        outcome.stopped_by = stop.signal_number
        timings.update(write=0.0, total=time.perf_counter() - started)
        outcome.timings = {name: round(value, 4) for name, value in timings.items()}
        outcome.results.sort(key=lambda r: r.job.index)
        return outcome

    def _render(self, plan, options, wanted: list, outcome, events, stop, on_result, files: dict) -> dict:
        """Send wanted jobs (and the bytes of their input files) in one request and write what comes back;
        the server's timings."""
        from ..reporting.events import BatchStarted, ImageFailed, ImageWritten, Noted, Step, Warned
        from ..reporting.results import ImageResult
        from ..storage.media import write_encoded

        by_index = {job.index: job for job in wanted}
        line_limit = max(image_line_limit(job) for job in wanted)
        total_limit = sum(image_line_limit(job) for job in wanted) + EVENT_SLACK_BYTES
        body = jobs_request(self.ref, self.options, decode=options.decode, force_size=plan.force_size, jobs=wanted,
                            files=files)
        connection = self.endpoint.connection(timeout=None)
        lines: queue.Queue = queue.Queue()
        try:
            connection.request("POST", JOBS_PATH, body=json.dumps(body), headers=self.endpoint.headers())
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise self._gone(exc) from None
        if response.status != 200:
            try:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise self._gone(exc) from None
            finally:
                connection.close()
            try:
                answer = answer_object(raw)
            except MalformedAnswer as exc:
                raise self._malformed(f"HTTP {response.status} with {exc}") from None
            raise error_from(response.status, answer)

        def read() -> None:
            total = 0
            try:
                while True:
                    line = response.readline(line_limit + 1)
                    if not line:
                        break
                    total += len(line)
                    if len(line) > line_limit:
                        lines.put(MalformedAnswer(f"a line longer than the {line_limit} bytes this run's images "
                                                  "may take"))
                        return
                    if total > total_limit:
                        lines.put(MalformedAnswer(f"more than the {total_limit} bytes this run may take"))
                        return
                    lines.put(line)
            # The main thread closes the connection once it has the last line, and http.client then fails in
            # whatever way it is caught (ValueError, AttributeError on a released socket, ...): all mean "ended".
            except Exception:  # noqa: BLE001
                pass
            lines.put(None)

        def finish(result: ImageResult) -> None:
            outcome.results.append(result)
            if on_result is not None:
                on_result(result)
            events(ImageWritten(result) if result.ok else ImageFailed(result))

        threading.Thread(target=read, name="sana-attach", daemon=True).start()
        finished = False
        seen: set[int] = set()
        current: set[int] = set()  # the images of the GPU batch in flight
        server_timings: dict = {}
        try:
            while True:
                # A stop ends generate at once; a batch first takes the images of the GPU batch in flight,
                # as an in-process batch finishes its current GPU batch.
                if stop.requested and (options.abort_in_flight or not current - seen):
                    break
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    break
                try:
                    if isinstance(line, MalformedAnswer):
                        raise line
                    message = read_event(line, by_index, seen)
                except MalformedAnswer as exc:
                    raise self._malformed(str(exc)) from None
                kind = message["type"]
                if kind == "step":
                    events(Step(step=message["step"], total=message["total"]))
                elif kind == "batch":
                    current = set(message["indices"])
                    events(BatchStarted(number=message["number"], total=message["total"],
                                        jobs=tuple(by_index[i] for i in message["indices"])))
                elif kind == "warning":
                    if message["message"] not in outcome.warnings:
                        outcome.warnings.append(message["message"])
                    events(Warned(message["message"]))
                elif kind == "note":
                    events(Noted(message["message"]))
                elif kind in ("image", "failed"):
                    job = by_index[message["index"]]
                    seen.add(job.index)
                    result = ImageResult(job=job, decode=message["decode"], fallbacks=message["fallbacks"],
                                         seconds=message["seconds"], retried_alone=message["retried_alone"])
                    if kind == "image":
                        problem = _image_problem(message["data"], job)
                        if problem is not None:
                            raise self._malformed(f"image {job.index} {problem}")
                        try:
                            result.written = write_encoded(message["data"], job.path, overwrite=plan.overwrite)
                        except SanaError as exc:
                            result.error, result.error_exit_code = exc.line(), exc.exit_code
                    else:
                        result.error, result.error_exit_code = message["error"], message["exit_code"]
                    finish(result)
                    if options.fail_fast and not result.ok:
                        break
                elif kind == "done":
                    self._description = message["model"] or self._description
                    outcome.peak_memory_bytes = message["peak_memory_bytes"]
                    outcome.peak_reserved_bytes = message["peak_reserved_bytes"]
                    server_timings = message["timings"]
                    finished = True
                    break
                elif kind == "error":
                    raise error_from(message["status"], {"error": message})
        finally:
            with _suppressed():
                connection.sock and connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
        if not finished and not stop.requested and not (options.fail_fast and outcome.failed):
            raise self._gone()
        if finished:  # every image asked for ends written or failed: a "done" without some is no success
            for job in wanted:
                if job.index not in seen:
                    finish(ImageResult(job=job, error=f"the sana server at {self.endpoint.describe()} finished "
                                                      "without sending this image", error_exit_code=1))
        return {name: server_timings.get(name, 0.0) for name in ("encode", "denoise", "decode")}


def _image_problem(data: bytes, job) -> str | None:
    """Why encoded bytes from a server are not this job's image: not the format its path asks for, not
    the planned size, or metadata whose key is another job's. None when they are."""
    import io
    import warnings

    from PIL import Image

    from ..planning.plan import image_format
    from ..storage.images import _EXIF_IMAGE_DESCRIPTION

    expected = image_format(job.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=(expected,))
            if image.size != (job.width, job.height):
                return f"is {image.size[0]}x{image.size[1]}, the job planned {job.width}x{job.height}"
            image.load()  # every pixel decodes: a truncated file is not an image
            if expected == "PNG":
                meta = image.info.get("sana")
            else:
                description = image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
                meta = description[len("sana:"):] if isinstance(description, str) and \
                    description.startswith("sana:") else None
    except Exception:  # noqa: BLE001 - whatever crafted bytes make Pillow raise: not the image asked for
        return f"is not a readable {expected} image"
    try:
        meta = json.loads(meta) if isinstance(meta, str) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("key") != job.key:
        return "does not carry the key of the job it was sent for (its metadata is another image's)"
    return None


class _suppressed:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)
