"""Shared fixtures: an isolated cache with the tiny models built once, offline HF, and helpers that
run the installed `sana` in a subprocess exactly as a user or CI script would.

The suite runs on pytest-xdist workers (addopts in pyproject.toml). Each worker has its own cache and
temp dirs; the tiny models are built once per run by whichever worker gets there first (under a file
lock, in a directory all workers share) and copied into each worker's cache. A file whose tests share
one expensive module fixture (a server, a full-size VAE, a built batch) runs whole on one worker."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

SANA = shutil.which("sana", path=os.path.dirname(sys.executable)) or shutil.which("sana")


# Files whose tests share one expensive module-scoped fixture (a `sana serve` process, the full-size VAE,
# a rendered batch, loaded pipelines): each runs whole on one xdist worker, so the fixture is built once and
# its tests see the state they were written against. Every other test is handed out one by one, to whichever
# worker is free. Done by the scheduler below, not by xdist_group markers: with this pytest, markers added
# at collection never reach xdist's --dist loadgroup (both workers built each of these fixtures).
ONE_WORKER_FILES = ("test_serve.py", "test_serve_hostile.py", "test_openai_clients.py", "test_decode.py",
                    "test_lora_control_img2img.py", "test_report.py", "test_bench.py", "test_gpu.py", "test_video.py")


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with a scope per test, except one scope per file in ONE_WORKER_FILES."""
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.rsplit("/", 1)[-1] in ONE_WORKER_FILES else nodeid

    return OneWorkerFiles(config, log)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sana-cache")


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(cache_dir, tmp_path_factory):
    """No test reads the user's caches or reaches the network."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    saved = {key: os.environ.get(key) for key in ("SANA_CLI_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "SANA_MODEL",
                                                  "SANA_OUTPUT_DIR", "GITHUB_STEP_SUMMARY")}
    os.environ.update(SANA_CLI_CACHE=str(cache_dir), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    for key in ("SANA_MODEL", "SANA_OUTPUT_DIR", "GITHUB_STEP_SUMMARY"):
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _cache_root(path: Path):
    saved = os.environ["SANA_CLI_CACHE"]
    os.environ["SANA_CLI_CACHE"] = str(path)
    try:
        yield
    finally:
        os.environ["SANA_CLI_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_models(isolated_environment, cache_dir, tmp_path_factory) -> dict[str, Path]:
    """The three built-in tiny models in the isolated cache, built once per run: with xdist workers,
    the first worker builds them into a directory they all share (the others wait on its lock) and
    each copies them into its own cache, so no test sees another worker's writes."""
    from sana_cli.engine import tiny_build as tiny

    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "sana-tiny-models"
        shared.mkdir(exist_ok=True)
        with open(shared / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with _cache_root(shared):
                built = [tiny.ensure(variant) for variant in tiny.VARIANTS]
        for path in built:
            target = cache_dir / path.relative_to(shared)
            if not target.exists():
                shutil.copytree(path, target)
    return {variant: tiny.ensure(variant) for variant in tiny.VARIANTS}


def _signal_state() -> dict:
    state = {signal.Signals(sig).name: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    state["blocked"] = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return state


@pytest.fixture(autouse=True)
def signals_left_as_found():
    """A test must leave this process's SIGINT/SIGTERM handlers and signal mask as it found them: a
    child started later inherits an ignored or blocked signal through fork and exec, and then no
    longer stops on Ctrl-C (that is what made a FIFO test fail only after other tests had run)."""
    before = _signal_state()
    yield
    after = _signal_state()
    if after != before:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, before[signal.Signals(sig).name])
        signal.pthread_sigmask(signal.SIG_SETMASK, before["blocked"])
        pytest.fail(f"the test changed this process's signal state: {before} -> {after}")


@pytest.fixture(scope="session")
def tiny_dir(tiny_models) -> Path:
    return tiny_models["sana"]


def full_size_dcae():
    """The dc-ae-f32c32-sana-1.0 architecture (Sana's VAE) with random weights, in fp32 on the CPU."""
    import torch
    from diffusers import AutoencoderDC

    blocks = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=32, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
        decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
        decoder_layers_per_block=[3, 3, 3, 3, 3, 3], encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
        decoder_qkv_multiscales=[[], [], [], [5], [5], [5]], upsample_block_type="interpolate",
        downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()


PRLIMIT = shutil.which("prlimit")


def limited(command: list, *, memory: int | None = None, file_size: int | None = None) -> list:
    """The command run under an address-space and/or file-size limit, set by util-linux's `prlimit`,
    which sets them and execs the command. Not preexec_fn: Python code run between fork and exec is
    unsafe beside other threads (every xdist worker has some, and fake servers run in threads), where
    the child can deadlock before it execs. A Python child ignores SIGXFSZ itself, so a write past the
    file-size limit fails with EFBIG, as on a full disk."""
    if not memory and not file_size:
        return [str(part) for part in command]
    assert PRLIMIT, "these tests need util-linux's prlimit"
    return [PRLIMIT, *([f"--as={memory}"] if memory else []), *([f"--fsize={file_size}"] if file_size else []),
            "--", *map(str, command)]


_zygotes: dict = {}
MAX_ZYGOTES = 3  # per worker: each holds the imported libraries (about 1 GB)


def _forked_sana(env: dict):
    """A zygote of this worker (started on first use) that can stand for a fresh `sana` started with
    this environment, else None. A zygote stands for commands whose environment equals its own in every
    variable a library may read at import time (OMP_NUM_THREADS, HF_HUB_OFFLINE, ...), so there is one
    zygote per such environment, up to MAX_ZYGOTES. SANA_TEST_FRESH_PROCESS=1 makes every command a
    fresh interpreter."""
    if os.environ.get("SANA_TEST_FRESH_PROCESS") == "1":
        return None
    from .zygote import Zygote, import_time_environment

    key = import_time_environment(env)
    if key in _zygotes and _zygotes[key] is None:  # it could not start: fresh processes for this environment
        return None
    zygote = _zygotes.get(key)
    if zygote is None:
        if len(_zygotes) >= MAX_ZYGOTES:
            return None
        try:
            zygote = Zygote(tempfile.mkdtemp(prefix="sana-zygote-"), env)
        except (OSError, RuntimeError) as exc:  # only slower without one: this environment's commands start fresh
            warnings.warn(f"no test zygote ({exc}); commands start a fresh interpreter", stacklevel=2)
            _zygotes[key] = None
            return None
        _zygotes[key] = zygote
        atexit.register(zygote.close)
    return zygote if zygote.alive() else None


def run_sana(*args, cwd=None, env=None, input=None, timeout=180, check_json=False, fresh=False, **streams):
    """subprocess.run([SANA, *args], capture_output=True, text=True, ...) for the `sana` command: env holds
    variables added to this process's environment; stdin, stdout or stderr may be given as for
    subprocess.run (stdout and stderr are captured otherwise). The process is forked from this worker's
    pre-imported zygote (tests/zygote.py), which saves the ten seconds of imports a fresh interpreter
    spends; fresh=True (or an environment no zygote can stand for) starts the installed console script."""
    assert SANA, "the sana console script is not installed next to this Python"
    assert set(streams) <= {"stdin", "stdout", "stderr"}, f"run_sana takes no {sorted(streams)}"
    full_env = dict(os.environ, **(env or {}))
    argv = [SANA, *map(str, args)]
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
    zygote = None if fresh else _forked_sana(full_env)
    if zygote is not None:
        from .zygote import run

        process = run(zygote, argv, cwd=cwd, env=full_env, input=input, timeout=timeout, **streams)
    else:
        process = subprocess.run(argv, cwd=cwd, env=full_env, input=input, text=True, timeout=timeout, **streams)
    if check_json:
        process.json = json.loads(process.stdout)
    return process


def shell_env(env=None) -> dict:
    """os.environ plus env, with PATH led by a directory whose `sana` is what a shell should find to run a
    command line sana printed (`sana info --command`): this worker's zygote when one stands for this
    environment (see zygote.launch), else the installed console script."""
    full_env = dict(os.environ, **(env or {}))
    zygote = _forked_sana(full_env)
    directory = os.path.dirname(SANA) if zygote is None else zygote.shim(SANA)
    full_env["PATH"] = f"{directory}{os.pathsep}{full_env.get('PATH', '')}"
    return full_env


def run_python(code: str, *args, cwd=None, env=None, timeout=300):
    """subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, ...), forked from
    this worker's zygote like run_sana: for a test's script that imports what `sana` imports."""
    full_env = dict(os.environ, **(env or {}))
    argv = [sys.executable, "-c", code, *map(str, args)]
    zygote = _forked_sana(full_env)
    if zygote is None:
        return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    from .zygote import run

    return run(zygote, argv, cwd=cwd, env=full_env, input=None, timeout=timeout, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, code=code)


def sana_popen(args, *, fresh: bool = False, env=None, **kwargs):
    """subprocess.Popen([SANA, *args], env=env, **kwargs), the process forked from this worker's zygote
    when it can stand for a fresh one (see run_sana); the returned object has Popen's pid, pipes, poll,
    wait, communicate, send_signal, terminate and kill. args: what follows `sana` on its command line."""
    assert SANA, "the sana console script is not installed next to this Python"
    argv = [SANA, *map(str, args)]
    full_env = dict(os.environ) if env is None else dict(env)
    allowed = {"stdin", "stdout", "stderr", "cwd", "text"}
    zygote = None if fresh or set(kwargs) - allowed else _forked_sana(full_env)
    if zygote is None:
        return subprocess.Popen(argv, env=full_env, **kwargs)
    from .zygote import ForkedProcess

    return ForkedProcess(zygote, argv, env=full_env, **kwargs)


@pytest.fixture
def sana():
    return run_sana


def one_line_error(process) -> str:
    """A failed run says why in exactly one 'sana: error:' line, last on stderr, with no traceback;
    only 'sana:' progress lines may come before it."""
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert lines, "stderr is empty"
    errors = [line for line in lines if line.startswith("sana: error: ")]
    assert errors == [lines[-1]], f"expected one final error line, got:\n{process.stderr}"
    assert all(line.startswith("sana: ") for line in lines), f"stray output on stderr:\n{process.stderr}"
    return lines[-1]


def _cpu_seconds() -> float:
    """CPU time of this worker, its waited-for children and the children its zygotes have waited for."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    ticks = os.sysconf("SC_CLK_TCK")
    for zygote in filter(None, _zygotes.values()):
        try:
            fields = Path(f"/proc/{zygote.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15]) / ticks  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With SANA_TEST_CPU_LOG=FILE, each test's CPU seconds (setup, call and teardown, with every process it
    started) are appended to FILE: where the suite's time goes, measured even on a busy machine."""
    log = os.environ.get("SANA_TEST_CPU_LOG")
    before = _cpu_seconds() if log else 0.0
    yield
    if log:
        with open(log, "a", encoding="utf-8") as stream:
            stream.write(f"{_cpu_seconds() - before:.2f}\t{item.nodeid}\n")
