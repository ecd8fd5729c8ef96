"""ControlNet and image-to-image: which models can, what a --controlnet value names, and loading it.

`--controlnet` names `tiny-controlnet` (built in, offline), a local directory holding a
SanaControlNetModel (its config.json, or a `controlnet/` folder of a pipeline directory), or a hub id.
It runs through diffusers' SanaControlNetPipeline, built from the loaded model's components, so only
SanaPipeline models can use it (not SANA-Sprint, and not together with PAG). Its config is checked
against the model's transformer before anything loads, where both are readable.

Image-to-image runs through SanaSprintImg2ImgPipeline on the Sprint models, and on the other Sana models
through their own pipeline call started from noised image latents on a shortened schedule (engine.img2img).
Both keep the same number of steps for a strength (kept_steps). Inpainting (--mask) is for the SanaPipeline
models only: SanaSprintImg2ImgPipeline has no place to blend the known region back.

Pure Python: torch is imported only by load_controlnet.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

CONTROLNETS = {"tiny-controlnet": "tiny:controlnet"}  # built-in names -> source
CONTROL_SCALE_RANGE = (0.0, 2.0)
_MUST_MATCH = ("in_channels", "num_attention_heads", "attention_head_dim", "caption_channels", "patch_size")


def check_takes_controlnet(model) -> None:
    """SANA-Sprint has no ControlNet pipeline."""
    if model.is_sprint:
        raise UsageError(f"{model.name} (SANA-Sprint) cannot use a ControlNet",
                         hint="ControlNet works with the SanaPipeline models, e.g. sana-600m-1024 or tiny")


def check_takes_mask(model) -> None:
    """Inpainting blends the known region back after each step of a SanaPipeline call: not SANA-Sprint."""
    if model.is_sprint:
        raise UsageError(f"{model.name} (SANA-Sprint) cannot inpaint: SanaSprintImg2ImgPipeline has no mask",
                         hint="--mask works with the SanaPipeline models, e.g. sana-1600m-1024 or tiny")


def resolve_controlnet(value: str, model) -> str:
    """The source of a --controlnet value (a built-in name, an absolute directory or a hub id), checked
    against the model's family and, where readable, its transformer config."""
    from ..models.modelref import is_hub_id

    if not isinstance(value, str) or not value.strip():
        raise UsageError("--controlnet is empty")
    check_takes_controlnet(model)
    from . import supplied

    if value in CONTROLNETS:
        source, config = value, _tiny_config()
    elif supplied.active():  # on a server: a built-in name or a hub id, never a path of the client's
        if not is_hub_id(value):
            raise UsageError(f"--controlnet {value} is not a hub id or a built-in ControlNet (a server never opens "
                             "a client's path)")
        source, config = value, _cached_config(value)
    else:
        path = Path(value).expanduser()
        if path.exists():
            folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
            config = _read_config(folder / "config.json")
            if config is None:
                raise UsageError(f"--controlnet {value} has no config.json of a SanaControlNetModel")
            source = str(folder.resolve())
        elif is_hub_id(value):
            source, config = value, _cached_config(value)
        else:
            raise UsageError(f"--controlnet {value}: no such directory, and not a hub id",
                             hint="give tiny-controlnet, a directory or a hub id org/name")
    if config is not None:
        _check_fits(config, value, model)
    return source


_DIGESTS: dict[tuple, str] = {}  # one run plans many rows with one ControlNet: hash its files once


def controlnet_digest(source: str) -> str | None:
    """The sha256 of a local ControlNet directory's content: of the name and bytes of every file in it that
    loading can read (config.json and the weights, of any variant), so a directory edited in place gives
    other keys and never passes for finished images on resume, as a LoRA's file does. None for the built-in
    tiny ControlNet (made the same way every time) and hub ids (named by id and revision, like models)."""
    if source in CONTROLNETS or not Path(source).is_absolute():
        return None

    folder = Path(source)
    try:
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
        marker = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns, st.st_ino) for p in files)
    except OSError as exc:
        raise UsageError(f"cannot read --controlnet {source}: {exc.strerror or exc}") from None
    key = (source, marker)
    if key not in _DIGESTS:
        import hashlib

        whole = hashlib.sha256()
        from .lora import sha256_file

        for path in files:
            whole.update(f"{path.name}\0{sha256_file(path, source, '--controlnet')}\n".encode())
        _DIGESTS[key] = whole.hexdigest()
    return _DIGESTS[key]


def _tiny_config() -> dict:
    from ..models import tiny

    return {"_class_name": "SanaControlNetModel", **tiny.controlnet_config()}


def _read_config(path: Path) -> dict | None:
    from ..models.modelref import _read_json

    if not path.is_file():
        return None
    return _read_json(path)


def _cached_config(repo: str) -> dict | None:
    from ..models.modelref import _read_json, cached_file

    for name in ("config.json", "controlnet/config.json"):
        try:
            found = cached_file(repo, name)
        except (OSError, ValueError):
            return None
        if found is not None:
            data = _read_json(found)
            if data and data.get("_class_name") == "SanaControlNetModel":
                return data
    return None


def _check_fits(config: dict, value: str, model) -> None:
    from ..models.modelref import transformer_config

    if config.get("_class_name") not in (None, "SanaControlNetModel"):
        raise UsageError(f"--controlnet {value} holds a {config.get('_class_name')}, not a SanaControlNetModel")
    transformer = transformer_config(model)
    if not transformer:
        return
    for key in _MUST_MATCH:
        if key in config and key in transformer and config[key] != transformer[key]:
            raise UsageError(f"--controlnet {value} does not fit {model.name}: its {key} is {config[key]}, the "
                             f"model's is {transformer[key]} (made for another base model?)")
    if int(config.get("num_layers", 0)) > int(transformer.get("num_layers", 20)):
        raise UsageError(f"--controlnet {value} has {config['num_layers']} blocks, more than the "
                         f"{transformer.get('num_layers', 20)} of {model.name}")


def check_control_scale(scale) -> float:
    from .values import check_finite

    check_finite("--control-scale", scale)
    low, high = CONTROL_SCALE_RANGE
    if not low <= scale <= high:
        raise UsageError(f"--control-scale must be in {low:g}..{high:g}, got {scale:g}")
    return float(scale)


def check_strength(strength) -> float:
    """Strength in 0..1, above 0 (how many steps that keeps: kept_steps)."""
    import math

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise UsageError(f"--strength must be a finite number in 0..1, got {strength!r}")
    if not 0 < strength <= 1:
        raise UsageError(f"--strength must be in 0..1 (above 0), got {strength:g}")
    return float(strength)


def kept_steps(steps: int, strength: float) -> int:
    """The denoising steps image-to-image runs for `steps` at `strength`: the last
    steps - int(max(steps - min(steps * strength, steps), 0)) of the schedule for `steps`, in floating point as
    written. That is diffusers' get_timesteps, which SanaSprintImg2ImgPipeline uses, and the Sana models use it
    too: strength 1 runs every step, 0.5 of 20 runs 10, 0.04 of 20 runs 1 (int(20 - 0.8) is 19), and any strength
    above 0 runs at least one unless steps * strength is lost to rounding against steps."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


def check_kept_steps(steps: int, strength: float, what: str = "--strength") -> int:
    """kept_steps, at least one: a strength so small that it keeps no step is a usage error, not an image
    equal to the input (diffusers raises mid-call)."""
    kept = kept_steps(steps, strength)
    if kept < 1:
        raise UsageError(f"{what} {strength:g} keeps no denoising step of {steps} (image-to-image runs the last "
                         f"{steps} - int({steps} - {steps} * strength) of them)")
    return kept
