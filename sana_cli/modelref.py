"""Resolve `--model` to what it names, reading only JSON files: no torch, no network.

A model is a preset name (or alias), a local diffusers directory, or a hub repo id. For a hub id
that is not a preset we look in the Hugging Face cache for its config; when it is not there the
pipeline class and native size stay unknown until the runner has loaded it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import presets
from .errors import EnvironmentProblem, UsageError
from .presets import SANA, SANA_SPRINT, SUPPORTED_PIPELINES, Preset

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    preset = presets.find(value)
    if preset is not None:
        return _from_preset(preset, revision)
    path = Path(value).expanduser()
    if path.exists():
        return _from_local(value, path.resolve(), revision)
    if looks_like_path(value) or not _HUB_ID.match(value):
        near = presets.suggest(value)
        if near and not looks_like_path(value):
            raise UsageError(f"unknown model '{value}'; did you mean '{near}'?", hint="`sana models` lists presets")
        raise EnvironmentProblem(f"model directory '{value}' does not exist",
                                 hint="give a preset name, a hub id like org/name, or an existing directory")
    return _from_hub(value, revision)


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
    if not (path / "model_index.json").is_file():
        raise UsageError(f"'{value}' is not a diffusers model directory: it has no model_index.json")
    if revision:
        raise UsageError("--revision applies to hub models, not to a local directory")
    return _from_configs(value, str(path), "local", lambda name: _read_json(path / name), revision=None)


def _from_hub(repo: str, revision: str | None) -> ModelRef:
    def cached(name: str) -> dict | None:
        from huggingface_hub import try_to_load_from_cache  # light import; no torch

        found = try_to_load_from_cache(repo, name, revision=revision)
        return _read_json(Path(found)) if isinstance(found, str) else None

    return _from_configs(repo, repo, "hub", cached, revision=revision)


def _from_configs(name: str, source: str, kind: str, read, revision: str | None) -> ModelRef:
    """Build a ModelRef from model_index.json and the transformer / vae configs, where readable."""
    index = read("model_index.json")
    pipeline = index.get("_class_name") if index else None
    if index is not None and pipeline not in SUPPORTED_PIPELINES:
        raise UsageError(f"'{name}' holds a {pipeline or 'unnamed'} pipeline; sana-cli runs "
                         f"{', '.join(SUPPORTED_PIPELINES)}")
    check_components(name, index)
    transformer = read("transformer/config.json") or {}
    vae = read("vae/config.json") or {}
    native = None
    if transformer.get("sample_size") and vae.get("decoder_block_out_channels"):
        native = int(transformer["sample_size"]) * 2 ** (len(vae["decoder_block_out_channels"]) - 1)
    # A SanaPipeline checkpoint with guidance embeddings is a Sprint student saved under the wrong class.
    if pipeline == SANA and transformer.get("guidance_embeds"):
        pipeline = SANA_SPRINT
    sprint = pipeline == SANA_SPRINT
    # SanaPAGPipeline ignores timestep_scale, so such models (the Sprint teacher) cannot use PAG.
    supports_pag = not sprint and float(transformer.get("timestep_scale", 1.0)) == 1.0
    return ModelRef(name=name, source=source, kind=kind, pipeline=pipeline, native_size=native,
                    steps=2 if sprint else 20, guidance=4.5, revision=revision, supports_pag=supports_pag,
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


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None
