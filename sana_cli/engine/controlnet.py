"""Loading a checked --controlnet (a SanaControlNetModel) onto a loaded model's device and dtype."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..inputs.controlnet import _MUST_MATCH, CONTROLNETS, controlnet_digest


def load_controlnet(loaded, source: str, digest: str | None = None):
    """The SanaControlNetModel a source names, in the transformer's dtype on the model's device; a local
    directory must still hold what was hashed while planning (`digest`)."""
    from diffusers import SanaControlNetModel

    from .load_errors import loading_error

    if digest is not None and controlnet_digest(source) != digest:
        raise UsageError(f"--controlnet {source} changed after the run was planned (its files' sha256 differs); "
                         "run again")

    offline = loaded.options.offline
    kwargs = dict(dtype=loaded.dtype, use_safetensors=None if loaded.options.allow_pickle else True)
    if source in CONTROLNETS:
        from . import tiny_build as tiny

        where = str(tiny.ensure(CONTROLNETS[source].split(":", 1)[1]))
    else:
        where = source
        if not Path(source).is_absolute():
            kwargs["local_files_only"] = offline
    try:
        try:
            model = SanaControlNetModel.from_pretrained(where, **kwargs)
        except OSError:
            if Path(where).is_absolute():
                raise
            model = SanaControlNetModel.from_pretrained(where, subfolder="controlnet", **kwargs)
    except Exception as exc:  # noqa: BLE001 - mapped to one line, as for models
        from ..models.modelref import ModelRef

        ref = ModelRef(name=f"ControlNet {source}", source=source, kind="hub", pipeline=None, native_size=None,
                       steps=20, guidance=4.5)
        raise loading_error(ref, exc, offline, allow_pickle=loaded.options.allow_pickle) from exc
    transformer = loaded.pipe.transformer.config
    for key in _MUST_MATCH:
        if model.config.get(key) != transformer.get(key):
            raise UsageError(f"--controlnet {source} does not fit {loaded.ref.name}: its {key} is "
                             f"{model.config.get(key)}, the model's is {transformer.get(key)}")
    return model.to(loaded.device).eval()
