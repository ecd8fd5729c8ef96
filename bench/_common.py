"""Helpers shared by the benchmark scripts: memory probes, child processes, image comparison, and
a description of the machine and software. No sana_cli imports here."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


# ---- memory --------------------------------------------------------------------------------------

def _status_kib(field: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakMemory:
    """Peak memory of this process over a window.

    cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats (what PyTorch allocated,
    weights included; the reference figures use it).
    cpu:  the peak resident set size, VmHWM, after resetting it to the current RSS by writing 5 to
    /proc/self/clear_refs (Linux >= 4.0); where that is not allowed, a thread samples VmRSS every 2 ms.
    `baseline` is the level at the start of the window (the loaded model, for a generate call)."""

    def __init__(self, device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS"
        self.baseline = None
        self.peak = None
        self._sampler = None

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return self
        self.baseline = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.kind = "peak RSS (VmHWM after clear_refs)"
        except OSError:
            self.kind = "peak RSS (VmRSS sampled every 2 ms)"
            self._sampler = _Sampler()
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self.peak = self._sampler.stop()
        else:
            kib = _status_kib("VmHWM")
            self.peak = None if kib is None else kib * 1024
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(0.002):
            self.peak = max(self.peak, rss_bytes() or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes() or 0)


def run_child(argv: list[str], *, env: dict | None = None, cwd=None, stdout_path=None, stderr_path=None,
              timeout: float | None = None) -> dict:
    """Run a child process; returns its wall seconds (timed from outside), exit code, its own peak
    RSS (ru_maxrss from wait4, so other children do not mix in), stdout and stderr."""
    import tempfile

    scratch = tempfile.mkdtemp(prefix="bench-child-")
    stdout_path = Path(stdout_path or os.path.join(scratch, "stdout"))
    stderr_path = Path(stderr_path or os.path.join(scratch, "stderr"))
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = None if timeout is None else started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"seconds": wall, "returncode": process.returncode, "peak_rss_bytes": peak,
            "stdout": stdout_path.read_text(errors="replace"), "stderr": stderr_path.read_text(errors="replace"),
            "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime,
            "timed_out": deadline is not None and wall > (timeout or 0)}


# ---- images --------------------------------------------------------------------------------------

def compare_images(reference, other) -> dict:
    """PSNR (dB) and max abs difference of two images (paths or PIL images) as uint8 RGB.
    psnr_db is None when the images are identical (infinite PSNR)."""
    import numpy as np
    from PIL import Image

    def load(image):
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                return np.asarray(opened.convert("RGB"), dtype=np.int16)
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    a, b = load(reference), load(other)
    if a.shape != b.shape:
        return {"identical": False, "psnr_db": None, "max_abs_diff": None,
                "error": f"size differs: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"}
    diff = np.abs(a - b)
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {"identical": mse == 0.0, "psnr_db": None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 3),
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 5)}


def combine_comparisons(items: list[dict]) -> dict:
    """One summary for several image pairs: the worst PSNR and the largest difference."""
    if not items:
        return {}
    if any("error" in item for item in items):
        return next(item for item in items if "error" in item)
    psnrs = [item["psnr_db"] for item in items if item["psnr_db"] is not None]
    return {"identical": all(item["identical"] for item in items), "psnr_db": min(psnrs) if psnrs else None,
            "max_abs_diff": max(item["max_abs_diff"] for item in items),
            "mean_abs_diff": round(sum(item["mean_abs_diff"] for item in items) / len(items), 5),
            "images": len(items), "identical_images": sum(item["identical"] for item in items)}


# ---- machine and software ------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe_device(device) -> dict:
    import torch

    info = {"type": device.type, "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_bytes": memory_total_bytes()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = f"{info['cpu']} ({info['cpu_cores']} cores)"
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews CPU timings."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "tokenizers", "patch_conv", "safetensors",
                 "numpy", "pillow"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def sana_cli_info() -> dict:
    import sana_cli

    info = {"version": sana_cli.__version__, "path": str(Path(sana_cli.__file__).resolve().parent)}
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "sana_cli"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["sana_cli_modified"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "device"


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(argv[0], REPO) if os.path.isabs(argv[0]) else argv[0]
    return shlex.join(["python", script, *argv[1:]])


def child_env(extra: dict | None = None) -> dict:
    """The environment for a sana child process: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


def gib(value) -> str:
    return "—" if value is None else f"{value / GIB:.2f} GiB"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
