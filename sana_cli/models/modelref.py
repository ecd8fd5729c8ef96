"""Resolve `--model` to what it names, reading only JSON files: no torch, no network.

A model is a preset name (or alias), a local diffusers directory, or a hub repo id. For a hub id
that is not a preset we look in the Hugging Face cache for its config; when it is not there the
pipeline class and native size stay unknown until the runner has loaded it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnvironmentProblem, UsageError
from . import presets
from .presets import SANA, SANA_SPRINT, SANA_VIDEO, SUPPORTED_PIPELINES, Preset, pag_supported

# Hugging Face repo ids: ASCII letters, digits, '-', '_' and '.', one '/', neither part starting or
# ending with '-' or '.', no '--' or '..', at most 96 characters each (huggingface_hub's own rules).
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}", re.ASCII)


def is_hub_id(value: str) -> bool:
    """Whether value is a well-formed hub repo id (org/name), and nothing else (no spaces, shell
    characters, line breaks or non-ASCII look-alikes)."""
    return (isinstance(value, str) and _HUB_ID.fullmatch(value) is not None and "--" not in value
            and ".." not in value)


@dataclass(frozen=True)
class ModelRef:
    """What a `--model` value resolved to."""

    name: str  # what we show: the preset name, or the id / path as given
    source: str  # hub repo id, absolute local path, or "tiny:<variant>"
    kind: str  # "tiny", "hub" or "local"
    pipeline: str | None  # diffusers class name, when known before loading
    native_size: int | None
    steps: int
    guidance: float
    preset: Preset | None = None
    revision: str | None = None
    supports_pag: bool = True
    min_steps: int = 1
    max_steps: int = 1000
    pag_layers: str = "transformer_blocks.8"

    @property
    def uses_cfg(self) -> bool:
        return self.pipeline != SANA_SPRINT

    @property
    def is_sprint(self) -> bool:
        return self.pipeline == SANA_SPRINT

    @property
    def is_video(self) -> bool:
        """A SANA-Video model (`sana video`), which `sana generate` does not run."""
        return self.pipeline == SANA_VIDEO

    def describe(self) -> str:
        detail = self.source if self.source != self.name else ""
        parts = [p for p in (detail, self.pipeline or "pipeline read at load time") if p]
        return f"{self.name} ({', '.join(parts)})"


def looks_like_path(value: str) -> bool:
    """A value the user meant as a filesystem path rather than a hub id (which has exactly one '/')."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", ".."):
        return True
    return "\\" in value or value.count("/") > 1


def resolve(value: str | None, *, revision: str | None = None) -> ModelRef:
    """Resolve a --model value; None means the default model. Reads JSON only."""
    if value is None:
        value = presets.DEFAULT_MODEL
    value = value.strip()
    if not value:
        raise UsageError("--model is empty")
    kind, target = classify(value)
    if kind == "preset":
        return _from_preset(target, revision)
    if kind == "local":
        return _from_local(value, target, revision)
    return _from_hub(value, revision)


def classify(value: str):
    """What a --model value names, by the rules `generate` uses: ("preset", Preset), ("local",
    absolute Path) or ("hub", repo id). Anything else raises the error `generate` gives."""
    if not value or not value.strip():
        raise UsageError("--model is empty")
    preset = presets.find(value)
    if preset is not None:
        return "preset", preset
    path = Path(value).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for a path (or with a NUL) names no directory
        exists = False
    if exists:
        return "local", path.resolve()
    if looks_like_path(value) or not is_hub_id(value):
        near = presets.suggest(value)
        if near and not looks_like_path(value):
            raise UsageError(f"unknown model '{value}'; did you mean '{near}'?", hint="`sana models` lists presets")
        if not looks_like_path(value) and "/" in value:
            raise UsageError(f"'{value}' is not a hub id (org/name of letters, digits, '-', '_' and '.')",
                             hint="give a preset name, a hub id like org/name, or an existing directory")
        raise EnvironmentProblem(f"model directory '{value}' does not exist",
                                 hint="give a preset name, a hub id like org/name, or an existing directory")
    return "hub", value


def _from_preset(preset: Preset, revision: str | None) -> ModelRef:
    return ModelRef(name=preset.name, source=preset.repo, kind="tiny" if preset.is_tiny else "hub",
                    pipeline=preset.pipeline, native_size=preset.native_size, steps=preset.steps,
                    guidance=preset.guidance, preset=preset, revision=revision,
                    supports_pag=preset.supports_pag, min_steps=preset.min_steps, max_steps=preset.max_steps,
                    pag_layers=preset.pag_layers)


def _from_local(value: str, path: Path, revision: str | None) -> ModelRef:
    if not path.is_dir():
        raise UsageError(f"model path '{value}' is a file, not a diffusers directory",
                         hint="pass the folder that holds model_index.json")
    if not os.path.lexists(path / "model_index.json"):  # present but not a file: the bounded read says why
        raise UsageError(f"'{value}' is not a diffusers model directory: it has no model_index.json")
    if revision:
        raise UsageError("--revision applies to hub models, not to a local directory")
    return _from_configs(value, str(path), "local", lambda name: _read_json(path / name), revision=None, root=path)


def _from_hub(repo: str, revision: str | None) -> ModelRef:
    def locate(name: str) -> Path | None:
        try:
            return cached_file(repo, name, revision=revision)
        except (OSError, ValueError) as exc:
            raise EnvironmentProblem(f"the HF cache entry of {repo} is unreadable: {exc}",
                                     hint=f"`sana doctor --model {repo}` diagnoses it") from exc

    def cached(name: str) -> dict | None:
        found = locate(name)
        return _read_json(found) if found is not None else None

    index_file = locate("model_index.json")
    return _from_configs(repo, repo, "hub", cached, revision=revision,
                         root=index_file.parent if index_file is not None else None)


def _from_configs(name: str, source: str, kind: str, read, revision: str | None, root: Path | None = None) -> ModelRef:
    """Build a ModelRef from model_index.json and the transformer / vae configs, where readable."""
    index = read("model_index.json")
    pipeline = index.get("_class_name") if index else None
    if index is not None and pipeline not in SUPPORTED_PIPELINES:
        raise UsageError(f"'{name}' holds a {pipeline or 'unnamed'} pipeline; sana-cli runs "
                         f"{', '.join(SUPPORTED_PIPELINES)}")
    check_components(name, index)
    if root is not None:
        check_model_files(name, root, index)
    transformer = read("transformer/config.json") or {}
    vae = read("vae/config.json") or {}
    native = None
    if transformer.get("sample_size") and vae.get("decoder_block_out_channels"):
        native = int(transformer["sample_size"]) * 2 ** (len(vae["decoder_block_out_channels"]) - 1)
    # A SanaPipeline checkpoint with guidance embeddings is a Sprint student saved under the wrong class.
    if pipeline == SANA and transformer.get("guidance_embeds"):
        pipeline = SANA_SPRINT
    sprint = pipeline == SANA_SPRINT
    supports_pag = pag_supported(pipeline, timestep_scale=transformer.get("timestep_scale", 1.0))
    video = pipeline == SANA_VIDEO
    return ModelRef(name=name, source=source, kind=kind, pipeline=pipeline, native_size=native,
                    steps=2 if sprint else 50 if video else 20, guidance=6.0 if video else 4.5, revision=revision,
                    supports_pag=supports_pag,
                    min_steps=1, max_steps=4 if sprint else 1000)


def check_components(name: str, index: dict | None) -> None:
    """Refuse a model_index.json whose components come from anywhere but diffusers or transformers:
    such a repo ships its own Python code, and sana-cli never runs code from a model repo."""
    for component, value in (index or {}).items():
        if component.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if value[0] not in ("diffusers", "transformers"):
            raise UsageError(f"'{name}' wants custom code for its {component} ({value[0]}.{value[1]}); sana-cli "
                             "never runs code from a model repository")


def check_model_files(name: str, root: Path, index: dict | None) -> None:
    """Refuse a model whose files include something that is not a regular file (a FIFO, a device, a
    link to /dev/zero) or a JSON file too large to be a config, before any loader opens it: the
    loaders read such files without limits and would hang or exhaust memory."""
    import stat

    from ..safeio import MAX_JSON_BYTES

    folders = [root] + [root / component for component in (index or {}) if not component.startswith("_")]
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise UsageError(f"cannot read model directory {folder}: {exc.strerror or exc}") from exc
        for entry in entries:
            try:
                if entry.is_dir():
                    continue
                info = entry.stat()
            except FileNotFoundError:
                continue  # a dangling link: an unfinished download, which loading reports
            except OSError as exc:
                raise UsageError(f"cannot read {entry.path} of '{name}': {exc.strerror or exc}") from exc
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"'{name}' has {entry.path}, which is not a regular file (a FIFO, device or "
                                 "socket); sana-cli does not load it")
            if entry.name.endswith(".json") and info.st_size > MAX_JSON_BYTES:
                raise UsageError(f"{entry.path} of '{name}' is {info.st_size} bytes, too large for a config file")


def _read_json(path: Path) -> dict | None:
    """A config file, read as untrusted: a regular file of bounded size (never a FIFO or a device)."""
    from ..safeio import read_json

    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


_COMMIT = re.compile(r"[0-9a-f]{40}", re.ASCII)


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub computes it (HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub), read from the environment now rather than at import time."""
    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    home = expand(os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(expand(hub))


def cached_commit(repo: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The commit a revision (default main) points at in the HF cache, read as huggingface_hub lays
    it out, but as untrusted input: the refs file must be a small regular ASCII file holding a commit
    hash. A broken one raises OSError/ValueError (for a diagnosis); a missing one gives None."""
    from ..safeio import read_bounded

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    revision = revision or "main"
    if _COMMIT.fullmatch(revision):
        return revision
    if revision.startswith("/") or ".." in revision.split("/") or "\0" in revision:
        return None
    try:
        data = read_bounded(cache_dir / ("models--" + repo.replace("/", "--")) / "refs" / revision, 4096)
    except FileNotFoundError:
        return None
    try:
        commit = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"refs/{revision} of {repo} in the HF cache is not a commit hash (not ASCII)") from None
    if not _COMMIT.fullmatch(commit):
        raise ValueError(f"refs/{revision} of {repo} in the HF cache is not a commit hash")
    return commit


def cached_file(repo: str, name: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The path of one file of a hub repo's snapshot in the HF cache, or None when it is not there.
    A broken refs file raises OSError/ValueError (see cached_commit)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    commit = cached_commit(repo, revision, cache_dir)
    if commit is None:
        return None
    path = cache_dir / ("models--" + repo.replace("/", "--")) / "snapshots" / commit / name
    try:
        return path if path.is_file() else None
    except OSError:
        return None


def transformer_config(ref) -> dict | None:
    """The model's transformer config when it can be read without loading (tiny, local, cached hub)."""

    if ref.kind == "tiny":
        from . import tiny

        return tiny.transformer_config(ref.source.split(":", 1)[1])
    if ref.kind == "local":
        return _read_json(Path(ref.source) / "transformer" / "config.json")
    try:
        found = cached_file(ref.source, "transformer/config.json", ref.revision)
    except (OSError, ValueError):
        return None
    return _read_json(found) if found is not None else None
