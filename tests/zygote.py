"""A `sana` process that has already imported what a run imports, forked once per command.

Starting `sana` costs about ten seconds of CPU before it does anything (torch, diffusers, transformers and
torchao import), while a tiny-model image takes half a second; the suite starts `sana` hundreds of times.
So each test worker runs one of these: it imports the CLI and the libraries once, then listens on a Unix
socket. For each command it receives the argument list, working directory, environment and the three
standard descriptors, forks, and the child runs `sana_cli.cli.main()` exactly as the console script does
and ends through the interpreter's normal shutdown (atexit handlers, thread joins, flushes). The child is a
real process: its own pid, exit status, signals and descriptors; what it skips is the exec and the imports.

The zygote itself imports and forks, nothing else: it never runs a model, installs no signal handler,
starts no thread and sets no library state (log levels, warning filters, the inductor cache directory),
so every child starts from the state a fresh interpreter has after those imports. Values that libraries
read from the environment at import time are the zygote's; `conftest.run_sana` starts a real process
instead whenever a command's environment differs from the zygote's in anything but the variables sana
reads at run time.

A test's own script (`python -c CODE ARGS`, which patches something and then calls main) runs the same way.

Protocol, one connection per command: the client sends one JSON line {argv, cwd, env[, code]} with descriptors
0, 1, 2 attached (SCM_RIGHTS); the zygote answers {"pid": N} when the child exists, then {"status": S}
(the raw wait status) when it has ended."""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys


def preload() -> None:
    """Everything a `sana` run imports on its way to an image, a server or a decode."""
    import pkgutil

    import diffusers
    import huggingface_hub  # noqa: F401
    import sana_cli
    import torch  # noqa: F401
    import transformers  # noqa: F401

    for module in pkgutil.walk_packages(sana_cli.__path__, "sana_cli."):
        __import__(module.name)
    for name in ("SanaPipeline", "SanaPAGPipeline", "SanaSprintPipeline", "SanaSprintImg2ImgPipeline",
                 "SanaControlNetPipeline", "SanaTransformer2DModel", "SanaControlNetModel", "AutoencoderDC",
                 "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "SCMScheduler"):
        getattr(diffusers, name, None)  # diffusers imports its pipelines on first attribute access
    from transformers import Gemma2Model, PreTrainedTokenizerFast  # noqa: F401


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, new_fds, _flags, _address = socket.recv_fds(connection, 1 << 20, 3)
        if not chunk:
            raise ConnectionError("the client went away before its request was whole")
        data += chunk
        fds += new_fds
    return json.loads(data), fds


def _send(connection: socket.socket, message: dict) -> None:
    try:
        connection.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the client gave up (a timeout that killed the child); nothing to tell


def serve(path: str) -> dict:
    """Answer commands until killed (Zygote.close). Returns only in a forked child, with the request that
    child is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _events in selector.select():
            if key.data is None:
                connection, _ = listener.accept()
                try:
                    request, fds = _receive(connection)
                except (OSError, ValueError):
                    connection.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    others = [(key.fd, key.data[1]) for key in selector.get_map().values() if key.data]
                    return _become_child(request, fds, [listener, connection, selector], others)
                for fd in fds:
                    os.close(fd)
                _send(connection, {"pid": pid})
                selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, connection))
            else:
                pid, connection = key.data
                selector.unregister(key.fileobj)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                _send(connection, {"status": status})
                connection.close()


def _become_child(request: dict, fds: list[int], owned: list, others: list) -> dict:
    for pidfd, connection in others:  # the zygote's watch on its other children, and their clients
        os.close(pidfd)
        connection.close()
    for resource in owned:
        resource.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)  # inheritable: what the command starts sees the same 0, 1 and 2
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    return request


def run_child(target) -> None:
    """target() as a fresh interpreter runs a script (for `sana`: `sys.exit(main())`, as the console script
    does), and the interpreter's shutdown up to the point where it tears down its modules: waiting for
    threads, atexit handlers, flushing stdout and stderr, the exit status of an uncaught exception, and
    death by SIGINT after an uncaught KeyboardInterrupt.
    The module teardown is left out: in a process that has inherited the zygote's heap it touches every
    object, copies every page and costs seconds, and it decides nothing a command's caller can see."""
    import atexit
    import signal
    import threading

    interrupted = False
    try:
        target()
        code = 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, True
    except BaseException:  # noqa: BLE001 - the interpreter's own last resort: a traceback and exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - any failure of the last flush
            code = 120  # what the interpreter exits with when its last flush of stdout fails
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)



def launch(path: str, argv: list[str]) -> None:
    """`sana ARGS` for a shell that runs a printed command line: this process's descriptors, directory and
    environment become the command's, signals a shell sends here are passed on, and this process ends as
    the command did (its exit status, or killed by the same signal). Runs under `python -S`: stdlib only."""
    import signal

    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    answers = connection.makefile("rb")
    pid = json.loads(answers.readline())["pid"]
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, lambda received, _frame: os.kill(pid, received))
    status = json.loads(answers.readline())["status"]
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


# ---- the client side, used by conftest in the test worker ----

# Variables sana reads only while it runs (never a library at import time): a command may set them and still
# be forked from a zygote started without them.
RUN_TIME_VARIABLES = ("GITHUB_STEP_SUMMARY", "PYTEST_CURRENT_TEST", "COLUMNS", "LINES", "NO_COLOR", "TERM")


def import_time_environment(env: dict) -> frozenset:
    """The part of an environment a fresh `sana` could read before it runs: all but RUN_TIME_VARIABLES."""
    return frozenset((key, value) for key, value in env.items()
                     if not key.startswith("SANA_") and key not in RUN_TIME_VARIABLES)


class Zygote:
    """A zygote process started with this environment."""

    def __init__(self, directory: str, env: dict):
        import subprocess

        self.path = os.path.join(directory, "zygote.sock")
        self.process = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        ready = self.process.stdout.readline()
        if ready != b"ready\n":
            self.process.kill()
            raise RuntimeError(f"the test zygote did not start (it said {ready!r})")

    def shim(self, sana: str) -> str:
        """A directory whose `sana` runs commands forked from this zygote (see launch), for a shell's PATH."""
        directory = os.path.join(os.path.dirname(self.path), "bin")
        if not os.path.isdir(directory):
            os.mkdir(directory)
            script = os.path.join(directory, "sana")
            with open(script, "w", encoding="utf-8") as stream:
                stream.write(f'#!/bin/sh\nexec "{sys.executable}" -S "{os.path.abspath(__file__)}" launch '
                             f'"{self.path}" "{sana}" "$@"\n')
            os.chmod(script, 0o755)
        return directory

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class ForkedProcess:
    """The part of subprocess.Popen's interface the tests use, for a `sana` forked from a zygote: pid,
    stdin/stdout/stderr (PIPE, DEVNULL, a descriptor, a file, or None to inherit), text mode, poll, wait,
    communicate, send_signal, terminate, kill, returncode, and use as a context manager."""

    def __init__(self, zygote: Zygote, argv: list[str], *, stdin=None, stdout=None, stderr=None, cwd=None,
                 env=None, text: bool = False, encoding: str | None = None, code: str | None = None):
        import locale
        import subprocess

        self.args = argv
        self.returncode = None
        self.text = text or encoding is not None
        self.encoding = encoding or locale.getpreferredencoding(False)
        theirs, ours, to_close = [], [], []
        for number, how in enumerate((stdin, stdout, stderr)):
            if how is None:
                theirs.append(number)
                ours.append(None)
            elif how == subprocess.PIPE:
                read, write = os.pipe()
                child, parent = (read, write) if number == 0 else (write, read)
                theirs.append(child)
                to_close.append(child)
                ours.append(parent)
            elif how == subprocess.DEVNULL:
                null = os.open(os.devnull, os.O_RDWR)
                theirs.append(null)
                to_close.append(null)
                ours.append(None)
            elif how == subprocess.STDOUT and number == 2:
                theirs.append(theirs[1])
                ours.append(None)
            else:
                theirs.append(how if isinstance(how, int) else how.fileno())
                ours.append(None)
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connection.connect(zygote.path)
            request = {"argv": argv, "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
                       "env": dict(os.environ) if env is None else dict(env), **({"code": code} if code else {})}
            socket.send_fds(self._connection, [json.dumps(request).encode() + b"\n"], theirs)
        finally:
            for fd in to_close:
                os.close(fd)
        self._buffer = b""
        self.pid = json.loads(self._line(None))["pid"]
        self.stdin, self.stdout, self.stderr = (
            None if fd is None else self._stream(fd, "w" if number == 0 else "r") for number, fd in enumerate(ours))

    def _stream(self, fd: int, mode: str):
        import io

        raw = open(fd, mode + "b", buffering=0 if mode == "w" else -1)  # noqa: SIM115 - the caller closes it
        if not self.text:
            return raw
        return io.TextIOWrapper(raw, encoding=self.encoding, write_through=mode == "w")

    def _line(self, timeout: float | None) -> bytes | None:
        """The zygote's next answer line, or None when none came within timeout (None: wait for it)."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                return None
            chunk = self._connection.recv(4096)
            if not chunk:
                raise ConnectionError("the test zygote closed the connection without the exit status")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _finish(self, timeout: float | None) -> bool:
        line = self._line(timeout)
        if line is None:
            return False
        self.returncode = os.waitstatus_to_exitcode(json.loads(line)["status"])
        self._connection.close()
        return True

    def poll(self):
        if self.returncode is None:
            self._finish(0)
        return self.returncode

    def wait(self, timeout: float | None = None):
        import subprocess

        if self.returncode is None and not self._finish(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout: float | None = None):
        """Popen.communicate: send input, read both pipes to their end, wait; TimeoutExpired leaves the
        process running, as Popen's does."""
        import subprocess
        import threading
        import time

        if self.stdin is not None:
            data = input if input is not None else ("" if self.text else b"")

            def feed(stream=self.stdin):
                try:
                    if data:
                        stream.write(data)
                    stream.close()
                except (BrokenPipeError, ValueError):
                    pass

            threading.Thread(target=feed, daemon=True).start()
            self.stdin = None
        streams = [stream for stream in (self.stdout, self.stderr) if stream is not None]
        chunks = {stream.fileno(): [] for stream in streams}
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for stream in streams:
                selector.register(stream.fileno(), selectors.EVENT_READ)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in selector.select(left):
                    piece = os.read(key.fd, 1 << 16)
                    if piece:
                        chunks[key.fd].append(piece)
                    else:
                        selector.unregister(key.fd)
        results = []
        for stream in (self.stdout, self.stderr):
            if stream is None:
                results.append(None)
                continue
            data = b"".join(chunks[stream.fileno()])
            stream.close()
            results.append(data.decode(self.encoding).replace("\r\n", "\n").replace("\r", "\n") if self.text
                           else data)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(results)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.wait()


def run(zygote: Zygote, argv: list[str], *, cwd, env: dict, input: str | None, timeout: float, stdin=None,
        stdout=None, stderr=None, code: str | None = None):
    """subprocess.run(argv, cwd=cwd, env=env, input=input, text=True, timeout=timeout, stdin=stdin,
    stdout=stdout, stderr=stderr) with the child forked from the zygote."""
    import subprocess

    if input is not None:
        stdin = subprocess.PIPE
    process = ForkedProcess(zygote, argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env, text=True,
                            code=code)
    try:
        out, err = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


if __name__ == "__main__" and sys.argv[1] == "launch":
    launch(sys.argv[2], sys.argv[3:])
elif __name__ == "__main__":
    import gc

    preload()
    gc.freeze()  # the imported objects are never collected: a child's collections skip them and copy no page
    job = serve(sys.argv[1])
    # Only a forked child gets here: run the command as the `sana` console script would.
    if "code" in job:  # `python -c CODE ARGS...`
        sys.argv = ["-c", *job["argv"][3:]]  # argv: python -c CODE ARGS...
        run_child(lambda: exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"}))
    else:
        sys.argv = job["argv"]
        from sana_cli.cli import main

        run_child(main)
