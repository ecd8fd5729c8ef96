"""Running `sana serve`: the loopback port and the user-only Unix socket bound, the models named up front
loaded, uvicorn with slow-client limits, and the shutdown (the first SIGTERM/SIGINT drains, a second stops)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from ..errors import EnvironmentProblem, GenerationError
from ..planning.plan import LoadOptions
from .answers import sweep_images
from .app import create_app
from .intake import model_and_options
from .openai_images import Aliases
from .state import ServerConfig
from .wire import private_place_problem, remove_if_stale
from .work_queue import Scheduler, log

# Slow clients: a request's head must arrive within HEAD_TIMEOUT (its body: http_io.BODY_TIMEOUT); an idle
# kept-alive connection closes after KEEP_ALIVE_TIMEOUT.
HEAD_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5


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


def serve(*, host: str, port: int, models: list[str], keep_alive: float | None, max_memory_gib: float | None,
          api_key: str | None, window: float, max_queue: int, output_dir: Path, load: LoadOptions,
          aliases: Aliases | None = None, ready=None, allow_hosts: tuple = ()) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; returns the exit code."""
    import tempfile

    import uvicorn

    from .wire import socket_path
    from .work_queue import ModelCache

    cache = ModelCache(keep_alive=keep_alive, budget_bytes=None if max_memory_gib is None
                       else int(max_memory_gib * 2**30))
    scheduler = Scheduler(window=window, max_queue=max_queue, models=cache)
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sana-serve-"))
    config = ServerConfig(api_key=api_key, output_dir=output_dir, scratch_dir=scratch, load=load, models=models,
                          host=host, allow_hosts=allow_hosts, aliases=aliases)
    sweep_images(output_dir)
    tcp = bind_tcp(host, port)
    path = socket_path()
    unix = bind_unix(path)
    inode = os.stat(path).st_ino  # remove the socket at exit only if it is still ours
    for name in models:  # up front, before announcing the server
        ref, options = model_and_options({"model": name, "load": {}})
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
