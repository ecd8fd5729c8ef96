"""`sana doctor`: can this machine run sana-cli, and is the model there? Never touches the network.

    from sana_cli.doctor import diagnose, format_text
    diagnosis = diagnose("sana-4k", require_gpu=True)
    print(format_text(diagnosis)); raise SystemExit(diagnosis["exit_code"])

It reports library versions, the GPU, the Hugging Face cache and offline mode, sana-cli's own cache,
and for every real preset whether its weights are in the HF cache ("complete", "partial" or
"missing"), plus a list of checks, each failed one with a command that fixes it. exit_code is 4
(environment) when something needed is missing, 2 for a model name that names nothing, else 0.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from ..cache import cache_root
from ..errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE
from ..models import presets, tiny
from ..version import __version__

# (import name, distribution, what to install): the runtime dependencies of pyproject.toml.
REQUIRED = (
    ("torch", "torch", "torch>=2.5"),
    ("diffusers", "diffusers", "diffusers>=0.42"),
    ("transformers", "transformers", "transformers>=5,<6"),
    ("accelerate", "accelerate", "accelerate>=1.0"),
    ("patch_conv", "patch_conv", "patch_conv>=0.0.1b0"),
    ("PIL", "pillow", "pillow>=10"),
    ("click", "click", "click>=8.1"),
    ("huggingface_hub", "huggingface_hub", "huggingface_hub>=1.0"),
    ("safetensors", "safetensors", "safetensors>=0.4"),
    ("tokenizers", "tokenizers", "tokenizers>=0.21"),
    ("torchao", "torchao", "torchao>=0.15"),
)
OPTIONAL = (("bitsandbytes", "bitsandbytes", "sana-cli[nf4]", "only needed for --quantize nf4"),)

_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's own reading of HF_HUB_OFFLINE
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")  # diffusers / transformers weight file names
COMPLETE, PARTIAL, MISSING = "complete", "partial", "missing"


def diagnose(model: str | None = None, require_gpu: bool = False, *, offline: bool | None = None) -> dict:
    """Everything `sana doctor` reports, as JSON-ready data. model: a preset, hub id or directory to
    check specifically; require_gpu: a missing CUDA GPU is a failure; offline: override
    HF_HUB_OFFLINE (None reads it). Never raises for a broken environment: that is what it reports."""
    checks: list[dict] = []
    versions, modules = _versions(checks)
    gpu = _gpu(modules.get("torch"), require_gpu, checks)
    hf = _hf_cache(offline)
    sana_cache = _sana_cache(checks)
    models = {p.name: {"repo": p.repo, "variant": p.variant, **safe_cache_status(p.repo, p.variant, hf["hub_cache"])}
              for p in presets.PRESETS if not p.is_tiny}
    _unreadable_entries(models, hf, checks)
    target = _check_model(model, hf, models, gpu, checks) if model else None
    failed = [c for c in checks if not c["ok"]]
    exit_code = max((c.get("exit_code", EXIT_ENVIRONMENT) for c in failed), default=EXIT_OK)
    return {"ok": not failed, "exit_code": exit_code, "platform": platform.platform(), "versions": versions,
            "gpu": gpu, "hf_cache": hf, "sana_cli_cache": sana_cache, "models": models, "model": target,
            "checks": checks}


def _check(checks: list[dict], name: str, ok: bool, detail: str, fix: str | None = None,
           exit_code: int = EXIT_ENVIRONMENT) -> dict:
    check = {"name": name, "ok": ok, "detail": detail, "fix": fix}
    if not ok:
        check["exit_code"] = exit_code
    checks.append(check)
    return check


# ---- packages ----------------------------------------------------------------------------------------

def _versions(checks: list[dict]) -> tuple[dict, dict]:
    versions = {"python": platform.python_version(), "sana-cli": __version__}
    modules = {}
    from .loading import quiet_backend_imports

    quiet_backend_imports()
    for module_name, dist, spec in REQUIRED:
        module, version, error = _import(module_name, dist)
        versions[dist] = version
        if module is not None:
            modules[module_name] = module
            _check(checks, dist, True, version or "installed")
        else:
            fix = (f"pip install '{spec}'  # on a GPU machine, the CUDA build for your driver (see README)"
                   if dist == "torch" else f"pip install '{spec}'")
            _check(checks, dist, False, f"cannot import {module_name}: {error}", fix)
        if dist == "torch":
            versions["cuda"] = getattr(getattr(module, "version", None), "cuda", None) if module else None
    for module_name, dist, spec, why in OPTIONAL:
        module, version, error = _import(module_name, dist)
        versions[dist] = version
        detail = version if module is not None else f"not installed ({why})"
        _check(checks, dist, True, detail, None if module is not None else f"pip install '{spec}'")
    return versions, modules


def _import(module_name: str, dist: str):
    """(module or None, version or None, error text or None); a broken install is not a crash."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a package that fails while importing
        return None, None, f"{type(exc).__name__}: {exc}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree, not installed
        version = getattr(module, "__version__", None)
    return module, version if isinstance(version, str) else None, None


# ---- GPU ---------------------------------------------------------------------------------------------

def _gpu(torch, require_gpu: bool, checks: list[dict]) -> dict:
    info = {"available": False, "cuda": None, "devices": [], "reason": None}
    if torch is None:
        info["reason"] = "torch cannot be imported"
    else:
        info["cuda"] = torch.version.cuda
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as exc:  # noqa: BLE001 - a broken driver
            count, info["reason"] = 0, f"CUDA error: {exc}"
        for index in range(count):
            info["devices"].append(_device(torch, index))
        info["available"] = bool(info["devices"])
        if not info["available"] and info["reason"] is None:
            info["reason"] = ("torch is a CPU-only build" if torch.version.cuda is None
                              else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
    if info["available"]:
        names = ", ".join(f"{d['name']} ({_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])})"
                          for d in info["devices"])
        _check(checks, "gpu", True, names)
    elif require_gpu:
        if torch is not None and torch.version.cuda is None:
            fix = "pip install --force-reinstall torch  # a CUDA build (see README); then rerun `sana doctor --gpu`"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            fix = "nvidia-smi  # must list the GPU; check the NVIDIA driver" + (
                f" and CUDA_VISIBLE_DEVICES={_quote(visible)}" if visible is not None else "")
        _check(checks, "gpu", False, f"no CUDA GPU: {info['reason']}", fix)
    else:
        _check(checks, "gpu", True, f"none ({info['reason']}): only --model tiny or --device cpu will run")
    return info


def _device(torch, index: int) -> dict:
    properties = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    try:
        free, total = torch.cuda.mem_get_info(index)
    except Exception:  # noqa: BLE001 - report what we can
        free, total = None, getattr(properties, "total_memory", None)
    return {"index": index, "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
            "free_bytes": free, "total_bytes": total, "bf16": major >= 8}


def _gib(value) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, (int, float)) else "?"


# ---- caches ------------------------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub computes it, read from the environment now."""
    from ..models.modelref import hub_cache_dir as compute

    return compute()


def offline_mode() -> bool:
    return any((os.environ.get(name) or "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hf_cache(offline: bool | None) -> dict:
    hub = hub_cache_dir()
    return {"hub_cache": str(hub), "exists": _is_dir(hub), "writable": _writable(hub),
            "offline": offline_mode() if offline is None else bool(offline),
            "hf_home": os.environ.get("HF_HOME"), "hf_hub_cache_env": os.environ.get("HF_HUB_CACHE")}


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # an unreadable parent: not usable either
        return False


def _writable(directory: Path) -> bool:
    """Whether directory is writable, or could be created writable (nearest existing parent), by
    trying: os.access lies on read-only mounts for root."""
    path = Path(directory)
    import tempfile

    try:
        while not path.exists():
            if path.parent == path:
                return False
            path = path.parent
        if not path.is_dir():
            return False
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _sana_cache(checks: list[dict]) -> dict:
    root = cache_root()
    built = [v for v in tiny.VARIANTS if _is_file(tiny.tiny_path(v) / "model_index.json")]
    writable = _writable(root)
    info = {"path": str(root), "exists": _is_dir(root), "writable": writable, "tiny_version": tiny.VERSION,
            "tiny_built": built}
    if writable:
        _check(checks, "sana-cli cache", True, f"{root} (tiny models built: {', '.join(built) or 'none yet'})")
    else:
        _check(checks, "sana-cli cache", False, f"{root} is not writable (the tiny model and compile cache live there)",
               f"mkdir -p {_quote(root)} && chmod u+w {_quote(root)}"
               "  # or: export SANA_CLI_CACHE=$HOME/.cache/sana-cli")
    return info


def _quote(value) -> str:
    """One shell word; control characters as visible $'...' escapes, so a copied fix runs as shown."""
    from ..planning.reproduce import shell_quote

    return shell_quote(str(value))


# ---- is a model in the HF cache? -----------------------------------------------------------------------

def cache_status(repo_id: str, variant: str | None, cache_dir: str | Path | None = None,
                 revision: str | None = None) -> dict:
    """Whether a diffusers pipeline repo is in the HF hub cache, from the cache alone (no network):
    "complete" when the snapshot has model_index.json and, for each component it names, its config
    and weights (the `variant` files, every shard an index lists); "partial" when some of it is
    there; "missing" when none is. variant "auto" accepts bf16, fp16 or plain weights."""
    from ..models.modelref import cached_file

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    result = {"status": MISSING, "snapshot": None, "problems": [], "size_bytes": 0}
    if not repo_dir.is_dir():
        return result
    found = cached_file(repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)
    if found is not None:
        snapshot = found.parent
    else:  # no refs/<revision> pointing at a snapshot with the index: look at the newest snapshot
        snapshots = sorted((p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()),
                           key=lambda p: p.stat().st_mtime) if revision is None else []
        snapshot = snapshots[-1] if snapshots else None
    if snapshot is None:
        result["problems"] = ["no snapshot" + (f" for revision {revision}" if revision else "")]
        return result
    result["snapshot"] = snapshot.name
    result["size_bytes"] = _size(snapshot)
    index = _read_json(snapshot / "model_index.json")
    if index is None:
        result["problems"] = ["model_index.json"]
        result["status"] = PARTIAL if result["size_bytes"] else MISSING
        return result
    problems = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[0] and spec[1]):
            continue
        problems += _component_problems(snapshot / name, name, str(spec[1]), variant)
    result["problems"] = problems
    result["status"] = PARTIAL if problems else COMPLETE
    return result


UNREADABLE = "unreadable"


def safe_cache_status(repo_id: str, variant: str | None, cache_dir: str | Path | None = None,
                      revision: str | None = None) -> dict:
    """cache_status, with a cache entry that cannot be read (permissions, a refs file that is not a
    commit hash, a FIFO or device where a file should be, links that loop, nesting too deep) reported
    as status "unreadable" and the reason, instead of raised."""
    try:
        return cache_status(repo_id, variant, cache_dir, revision)
    except (OSError, ValueError, RecursionError) as exc:
        root = Path(cache_dir if cache_dir is not None else hub_cache_dir())
        repo_dir = root / ("models--" + repo_id.replace("/", "--"))
        plain = isinstance(exc, (OSError, ValueError)) and str(exc)
        reason = str(exc) if plain else f"{type(exc).__name__}: {exc}"
        return {"status": UNREADABLE, "snapshot": None, "problems": [reason], "size_bytes": 0,
                "path": str(repo_dir)}


def _unreadable_entries(models: dict, hf: dict, checks: list[dict]) -> None:
    for name, info in models.items():
        if info.get("status") == UNREADABLE:
            _check(checks, f"hf cache {name}", False,
                   f"the HF cache entry of {info['repo']} cannot be read: {info['problems'][0]}",
                   f"rm -rf {_quote(info['path'])}  # then download it again")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _component_problems(directory: Path, name: str, class_name: str, variant: str | None) -> list[str]:
    if not directory.is_dir():
        return [f"{name}/"]
    if "Scheduler" in class_name or name == "scheduler":
        return [] if (directory / "scheduler_config.json").is_file() else [f"{name}/scheduler_config.json"]
    if "Tokenizer" in class_name or name.startswith("tokenizer"):
        missing = [] if (directory / "tokenizer_config.json").is_file() else [f"{name}/tokenizer_config.json"]
        if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "spiece.model",
                                                        "vocab.json")):
            missing.append(f"{name}/tokenizer.json")
        return missing
    missing = [] if (directory / "config.json").is_file() else [f"{name}/config.json"]
    return missing + [f"{name}/{problem}" for problem in _weight_problems(directory, variant)]


def _weight_problems(directory: Path, variant: str | None) -> list[str]:
    """[] when the directory has a complete set of safetensors weights of the variant."""
    variants = ("bf16", "fp16", None) if variant == "auto" else (variant,)
    incomplete = []
    for candidate in variants:
        for prefix in _WEIGHT_PREFIXES:
            middle = f".{candidate}" if candidate else ""
            if (directory / f"{prefix}{middle}.safetensors").is_file():
                return []
            index_name = f"{prefix}.safetensors.index{middle}.json"
            index = _read_json(directory / index_name)
            if index is not None:
                shards = sorted(set((index.get("weight_map") or {}).values()))
                absent = [s for s in shards if not (directory / s).is_file()]
                if shards and not absent:
                    return []
                incomplete += absent or [f"{index_name} (lists no shards)"]
    if incomplete:
        return incomplete
    wanted = f"*.{variant}.safetensors" if variant and variant != "auto" else "*.safetensors"
    others = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    return [wanted + (f" (only {', '.join(others)})" if others else "")]


def _read_json(path: Path) -> dict | None:
    """A JSON file from the cache, read as untrusted (bounded, regular files only); None when it is
    missing, unreadable or not a JSON object."""
    from ..safeio import read_json

    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _size(directory: Path) -> int:
    """Bytes under directory, following the links to blobs (as the HF cache uses) but never into
    linked directories; iterative, so no nesting depth can exhaust the stack."""
    total = 0
    pending = [str(directory)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file():
                    total += entry.stat().st_size
            except OSError:
                pass  # a dangling link to a blob that never finished, or a loop
    return total


# ---- the model asked about ---------------------------------------------------------------------------

def _check_model(model: str, hf: dict, models: dict, gpu: dict, checks: list[dict]) -> dict:
    """Whether `model` can be loaded as things stand: a failure only when offline and not cached."""
    from ..errors import SanaError
    from ..models.modelref import classify

    model = model.strip()
    try:  # exactly the names `generate` accepts, by its own rules
        kind, target = classify(model)
    except SanaError as exc:
        _check(checks, f"model {model}", False, exc.message, "sana models  # lists the presets",
               exit_code=exc.exit_code)
        return {"name": model, "kind": "unknown", "status": MISSING}
    preset = target if kind == "preset" else None
    path = target if kind == "local" else Path("")
    if preset is not None and preset.is_tiny:
        info = {"name": preset.name, "kind": "tiny", "status": "built" if (
            tiny.tiny_path(preset.repo.split(":", 1)[1]) / "model_index.json").is_file() else "built on first use"}
        _check(checks, f"model {preset.name}", True, f"built-in tiny model ({info['status']})")
        return info
    if kind == "local":
        ok = _is_file(path / "model_index.json")
        info = {"name": model, "kind": "local", "path": str(path.resolve()), "status": COMPLETE if ok else MISSING}
        _check(checks, f"model {model}", ok, f"local directory {path}" + ("" if ok else " has no model_index.json"),
               None if ok else "pass the folder that holds model_index.json", exit_code=EXIT_USAGE)
        return info
    if preset is not None:
        info = {"name": preset.name, "kind": "hub", **models[preset.name]}
    else:
        info = {"name": model, "kind": "hub", "repo": model, "variant": "auto",
                **safe_cache_status(model, "auto", hf["hub_cache"])}
    repo, status = info["repo"], info["status"]
    download = f"env HF_HUB_OFFLINE=0 hf download {_quote(repo)}  # needs the network once"
    if status == UNREADABLE:
        if preset is None:  # a preset's entry is already reported with the cache
            _unreadable_entries({model: info}, hf, checks)
    elif status == COMPLETE:
        detail = f"{repo} is in the HF cache ({_gib(info['size_bytes'])}, snapshot {str(info['snapshot'])[:12]})"
        _check(checks, f"model {info['name']}", True, detail + _gpu_note(gpu))
    elif hf["offline"]:
        _check(checks, f"model {info['name']}", False,
               f"{repo} is {status} in the HF cache ({hf['hub_cache']}) and offline mode is on"
               + (f"; missing: {', '.join(info['problems'][:5])}" if info["problems"] else ""),
               download + "; or unset HF_HUB_OFFLINE")
    elif not hf["writable"]:
        _check(checks, f"model {info['name']}", False,
               f"{repo} is {status} in the HF cache and {hf['hub_cache']} is not writable, so it cannot be downloaded",
               "export HF_HOME=/a/writable/dir  # then: " + download)
    else:
        _check(checks, f"model {info['name']}", True,
               f"{repo} is {status} in the HF cache: the first run downloads it" + _gpu_note(gpu),
               f"hf download {_quote(repo)}  # to fetch it ahead of time")
    return info


def _gpu_note(gpu: dict) -> str:
    return "" if gpu["available"] else "; it needs a CUDA GPU (none here; --device cpu is very slow)"


# ---- for people --------------------------------------------------------------------------------------

def format_text(diagnosis: dict) -> str:
    """The diagnosis as a few aligned lines for a terminal; failed checks last, each with its fix."""
    versions = diagnosis.get("versions", {})
    lines = []
    failed = [c for c in diagnosis.get("checks", []) if not c["ok"]]
    lines.append("sana doctor: " + ("all good" if not failed else
                                    f"{len(failed)} problem(s), exit {diagnosis.get('exit_code')}"))
    lines.append("")
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "cuda")
    lines.append(f"versions    {shown}")
    gpu = diagnosis.get("gpu") or {}
    if gpu.get("available"):
        for d in gpu["devices"]:
            lines.append(f"gpu {d['index']}       {d['name']}, {_gib(d['free_bytes'])} free of "
                         f"{_gib(d['total_bytes'])}, "
                         f"compute {d['capability']}, bf16 {'yes' if d['bf16'] else 'no'}, CUDA {gpu.get('cuda')}")
    else:
        lines.append(f"gpu         none ({gpu.get('reason')})")
    hf = diagnosis.get("hf_cache") or {}
    lines.append(f"hf cache    {hf.get('hub_cache')} (offline mode {'on' if hf.get('offline') else 'off'}"
                 f"{'' if hf.get('writable') else ', not writable'})")
    sana = diagnosis.get("sana_cli_cache") or {}
    lines.append(f"sana cache  {sana.get('path')} ({'writable' if sana.get('writable') else 'NOT writable'}; "
                 f"tiny built: {', '.join(sana.get('tiny_built') or []) or 'none'})")
    lines.append("models in the HF cache:")
    width = max((len(name) for name in diagnosis.get("models", {})), default=10)
    for name, info in diagnosis.get("models", {}).items():
        size = f"{_gib(info['size_bytes'])}" if info.get("size_bytes") else ""
        lines.append(f"  {name:<{width}}  {info['status']:<8}  {size:>9}  {info['repo']}")
    lines.append("checks:")
    for check in sorted(diagnosis.get("checks", []), key=lambda c: not c["ok"], reverse=False):
        lines.append(f"  {'ok  ' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
        if not check["ok"] and check.get("fix"):
            lines.append(f"        fix: {check['fix']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m sana_cli.doctor [MODEL]
    result = diagnose(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.stdout.write(format_text(result))
    sys.exit(result["exit_code"])
