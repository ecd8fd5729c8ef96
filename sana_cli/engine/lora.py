"""LoRA adapters: `--lora PATH_OR_HUB_ID[:SCALE]`, checked before anything loads, applied to the
transformer at run time.

Spec rule: the text after the LAST ':' is the scale when it reads as a number (`nan` and `inf` read
as numbers and are refused), otherwise the whole text is the source and the scale is 1.0. So a path
that itself ends in `:NUMBER` needs its scale written out (`my:1.5.safetensors` is fine, `run:2`
must be given as `run:2:1.0`). The source is a local `.safetensors` file, a local directory holding
exactly one `.safetensors` file (or diffusers' `pytorch_lora_weights.safetensors`), or a hub repo id
(`org/name`, exactly one '/', optionally `org/name@REVISION`), whose `pytorch_lora_weights.safetensors`
(or only `.safetensors` file) is used. An existing path always wins over a hub id.

Safetensors only: a pickle LoRA (.bin, .pt, .ckpt, .pth) is refused, also with --allow-pickle (which
covers model weights only), because loading one runs code from the file.

A LoRA's identity is the sha256 of its weights file: it goes into the image's metadata and key, so a
changed file never passes for a finished image on resume.

Before loading, the file's safetensors header (JSON, read without torch) is checked against the
model's transformer config where that config is readable: every LoRA pair must name a transformer
module that exists, with in/out sizes that fit it and matching ranks. A LoRA that does not fit is a
usage error naming it, before any image is made.

At run time all the run's LoRAs are loaded as named adapters, and the set an image needs is fused
into the transformer (diffusers' set_adapters weights, then fuse_lora): fused runs cost nothing per
step. Changing the set restores the exact original weights from a copy taken before the first fuse
(unfusing subtracts, which is off by float rounding), so A, then B, then A again gives A's pixels.
Fusing is all or nothing: diffusers fuses one layer at a time, so a fuse that fails part way (out of
memory on the GPU, an interrupt) is undone from that copy, which every fuse takes, and the weights are
exactly the base weights again. A run that never changes its set drops the copy once its fuse is done.
"""

from __future__ import annotations

from ..errors import EnvironmentProblem, UsageError
from ..inputs.lora import weights_file

# ---- run time (torch) ------------------------------------------------------------------------------

def adapter_name(digest: str) -> str:
    return "lora_" + digest[:16]


# Adapters a model keeps loaded at once (a server's model serves many clients' LoRAs): loading one more
# deletes the least recently used that the run does not need, so the set held never grows without bound.
MAX_LOADED_ADAPTERS = 8


def prepare(loaded, sets, *, restorable: bool) -> None:
    """Load every LoRA a run needs as a named adapter before any image is made, so one that does not
    fit fails the run at once (exit 2) instead of failing the rows that use it. Beyond MAX_LOADED_ADAPTERS,
    the least recently used adapters this run does not need are deleted first (loaded again when asked for)."""
    state = loaded.lora_state
    needed = [adapter_name(digest) for loras in sets for _, digest, _ in loras]
    used = state.setdefault("used", {})  # adapter name -> a use counter: least recently used first
    for name in needed:
        used[name] = state["uses"] = state.get("uses", 0) + 1
    missing = {(identity, digest) for loras in sets for identity, digest, _ in loras
               if adapter_name(digest) not in state.setdefault("loaded", set())}
    if not missing:
        return
    if state.get("fused"):
        _restore(loaded)
    _make_room(loaded, keep=set(needed), coming=len(missing))
    state.setdefault("requires_grad", {name: p.requires_grad for name, p in loaded.pipe.transformer.named_parameters()})
    for identity, digest in sorted(missing):
        load_adapter(loaded, identity, digest)
    loaded.pipe.disable_lora()  # nothing acts until a set is applied
    _plain_flags(loaded, base=True)
    state["restorable"] = restorable


def _make_room(loaded, *, keep: set, coming: int) -> None:
    """Delete least recently used adapters not in `keep` until `coming` more fit within MAX_LOADED_ADAPTERS."""
    state = loaded.lora_state
    held = state["loaded"]
    spare = sorted((name for name in held if name not in keep), key=lambda name: state["used"].get(name, 0))
    gone = spare[:max(0, len(held) + coming - MAX_LOADED_ADAPTERS)]
    if not gone:
        return
    loaded.pipe.delete_adapters(gone)
    for name in gone:
        held.discard(name)
        state["used"].pop(name, None)


def _plain_flags(loaded, *, base: bool) -> None:
    """peft marks the base weights as frozen (requires_grad False) when it adds an adapter, and the CPU
    kernels round differently for frozen weights (the last float bit, now and then a pixel level). So the
    base weights carry their flags from before any adapter while no LoRA is fused (plain images equal a
    model that never had one) and are frozen while one is (equal to diffusers after load_lora_weights)."""
    flags = loaded.lora_state.get("requires_grad", {})
    for name, parameter in loaded.pipe.transformer.named_parameters():
        name = name.replace(".base_layer.", ".")  # peft wraps a module; its weights move under base_layer
        if name in flags:
            parameter.requires_grad_(flags[name] if base else False)


def apply(loaded, loras: tuple, *, restorable: bool) -> None:
    """Make the transformer carry exactly `loras` ((id, sha256, scale), ...), fused. With `restorable`
    the original weights of every module a LoRA touches are copied (to the CPU) before the first fuse,
    so a later set starts from the exact base weights."""
    state = loaded.lora_state
    wanted = tuple((digest, scale) for _, digest, scale in loras)
    if state.get("fused", ()) == wanted:
        return
    pipe = loaded.pipe
    if state.get("fused"):
        _restore(loaded)
    if not wanted:
        return
    prepare(loaded, [loras], restorable=restorable)
    names = [adapter_name(digest) for digest, _ in wanted]
    pipe.enable_lora()
    pipe.set_adapters(names, [scale for _, scale in wanted])
    _snapshot(loaded)  # always: a fuse that fails part way is undone from this copy
    try:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
    except BaseException:
        # diffusers fuses one layer at a time: an error in the middle (out of memory, an interrupt) has
        # changed the earlier layers. Back to the exact base weights before anything else runs.
        _back_to_base(loaded)
        if not restorable:
            state["originals"] = {}
        raise
    _plain_flags(loaded, base=False)
    state["fused"] = wanted
    state["restorable"] = restorable
    if not restorable:
        state["originals"] = {}  # the set never changes in this run: the copy is not needed any more


def load_adapter(loaded, identity: str, digest: str) -> None:
    """Load one LoRA as a named adapter (not active until set_adapters); failures name the LoRA."""
    from safetensors.torch import load_file

    weights = weights_file(identity, digest, loaded.options.offline)
    try:
        import peft  # noqa: F401 - diffusers' LoRA loading needs it
    except ImportError:
        raise EnvironmentProblem("LoRAs need the peft package", hint="pip install peft") from None
    try:
        state_dict = load_file(weights)
        check_finite_weights(state_dict, identity)
        loaded.pipe.load_lora_weights(state_dict, adapter_name=adapter_name(digest))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers / peft say why in many ways: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"LoRA {identity} does not fit {loaded.ref.name}: {first}") from None
    loaded.lora_state.setdefault("loaded", set()).add(adapter_name(digest))
    # An adapter that matched no module loads as nothing: diffusers only warns.
    if not _adapter_modules(loaded.pipe.transformer, adapter_name(digest)):
        raise UsageError(f"LoRA {identity} does not fit {loaded.ref.name}: none of its weights match a module")


def check_finite_weights(state_dict: dict, identity: str) -> None:
    """A LoRA with a NaN or infinite weight makes every image it touches black: a usage error naming it."""
    import torch

    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UsageError(f"LoRA {identity} has weights that are not finite (NaN or infinity in {name})")


def _adapter_modules(transformer, name: str) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(path, module) for path, module in transformer.named_modules()
            if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {})]


def _snapshot(loaded) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    originals = loaded.lora_state.setdefault("originals", {})
    for path, module in loaded.pipe.transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and path not in originals:
            base = module.get_base_layer()
            originals[path] = {name: tensor.detach().to("cpu", copy=True)
                               for name, tensor in base.named_parameters(recurse=False)}


def _restore(loaded) -> None:
    state = loaded.lora_state
    if not state.get("restorable"):
        raise RuntimeError("internal error: a fused LoRA set would change without a copy of the original weights")
    _back_to_base(loaded)


def _back_to_base(loaded) -> None:
    """The exact original weights, from the copy, whatever a fuse left behind: fully fused, fused part way,
    or not at all. Nothing here computes on the device (peft's unmerge subtracts each layer's product, which
    can run out of memory part way too): each saved tensor is copied into its parameter in place, on the
    parameter's current device, so compiled graphs and offload hooks keep seeing the same tensors."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = loaded.lora_state
    originals = state.get("originals", {})
    modules = dict(loaded.pipe.transformer.named_modules())
    with torch.no_grad():
        for path, tensors in originals.items():
            base = modules[path].get_base_layer()
            for name, tensor in base.named_parameters(recurse=False):
                tensor.copy_(tensors[name])
    for module in modules.values():
        if isinstance(module, BaseTunerLayer):
            del module.merged_adapters[:]  # peft's record of what is merged: nothing is, now
    loaded.pipe._merged_adapters = set()  # diffusers' record of the same
    loaded.pipe.disable_lora()
    _plain_flags(loaded, base=True)
    state["fused"] = ()
