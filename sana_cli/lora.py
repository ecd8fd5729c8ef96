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

import hashlib
import os
import re
from pathlib import Path

from .errors import EnvironmentProblem, UsageError

SCALE_RANGE = (-4.0, 4.0)
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2**20
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def parse_spec(text: str) -> tuple[str, float]:
    """(source, scale) of one --lora value, by the module's rule."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("--lora is empty")
    source, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and _NUMBER.fullmatch(tail.strip()):
        source, scale = head, float(tail)
    return source, check_scale(scale, source)


def check_scale(scale, source: str) -> float:
    from .plan import check_finite

    check_finite(f"the scale of LoRA {source}", scale)
    low, high = SCALE_RANGE
    if not low <= scale <= high:
        raise UsageError(f"the scale of LoRA {source} must be in {low:g}..{high:g}, got {scale:g}")
    return float(scale)


def resolve(source: str, *, offline: bool = False) -> tuple[str, str, str]:
    """(id for metadata, local weights file, sha256) of a LoRA source. Usage errors for anything that
    is not a safetensors LoRA; an environment error when a hub LoRA cannot be fetched."""
    from .modelref import is_hub_id, looks_like_path

    path = Path(source).expanduser()
    if path.exists():
        weights = _local_weights(source, path)
        return str(path.resolve()), str(weights), sha256_file(weights, source)
    repo, _, revision = source.partition("@")
    if looks_like_path(source) or source.lower().endswith((".safetensors", *PICKLE_SUFFIXES)) or not is_hub_id(repo):
        raise UsageError(f"LoRA {source}: no such file or directory",
                         hint="give a .safetensors file, a directory holding one, or a hub id org/name")
    weights = _hub_weights(repo, revision or None, offline)
    return source, str(weights), sha256_file(weights, source)


def _local_weights(source: str, path: Path) -> Path:
    if path.is_dir():
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(found) == 1:
            return found[0]
        if not found and any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise _pickle_refusal(source)
        raise UsageError(f"LoRA directory {source} holds {len(found)} .safetensors files; name the one to use"
                         if found else f"LoRA directory {source} holds no .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(source)
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"LoRA {source} is not a .safetensors file")
    return path


def _pickle_refusal(source: str) -> UsageError:
    return UsageError(f"LoRA {source} is a pickle file; sana-cli loads LoRAs from .safetensors only",
                      hint="convert it to safetensors; --allow-pickle covers model weights, not LoRAs")


def _hub_weights(repo: str, revision: str | None, offline: bool) -> Path:
    from .modelref import cached_file

    found = cached_file(repo, DEFAULT_WEIGHT_NAME, revision)
    if found is not None:
        return found
    if offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise EnvironmentProblem(f"LoRA {repo} is not in the Hugging Face cache and offline mode is on",
                                 hint=f"download it once online (`hf download {repo}`)")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        names = [n for n in list_repo_files(repo, revision=revision) if n.endswith(".safetensors")]
        name = DEFAULT_WEIGHT_NAME if DEFAULT_WEIGHT_NAME in names else names[0] if len(names) == 1 else None
        if name is None:
            raise UsageError(f"LoRA {repo} holds {len(names)} .safetensors files at its top level; sana-cli "
                             f"needs {DEFAULT_WEIGHT_NAME} or exactly one")
        return Path(hf_hub_download(repo, name, revision=revision))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, exit 4: the hub, not the input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvironmentProblem(f"cannot fetch LoRA {repo}: {first}") from None


def sha256_file(path, source: str, what: str = "LoRA") -> str:
    """The sha256 of a regular file (never a FIFO or device), in hex; unreadable is a usage error naming `what`."""
    from .safeio import open_regular

    digest = hashlib.sha256()
    try:
        with open_regular(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {source}: {exc.strerror or exc}") from None
    return digest.hexdigest()


# ---- the header check ----------------------------------------------------------------------------

def read_header(path, source: str) -> dict:
    """The tensors a safetensors file declares: {name: shape}. The whole header is parsed and checked by one
    call under one guard (safeio.read_safetensors_header): a file that is not safetensors is a usage error."""
    from .safeio import BadSafetensors, read_safetensors_header

    try:
        tensors, _ = read_safetensors_header(path, MAX_HEADER_BYTES)
    except BadSafetensors as exc:
        if exc.truncated:
            raise UsageError(f"LoRA {source} is truncated") from None
        raise UsageError(f"LoRA {source} is not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise UsageError(f"LoRA {source} is not a readable safetensors file ({exc.strerror or exc})") from None
    return {name: shape for name, (_, shape, _) in tensors.items()}


def _module_sizes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of the transformer's linear layers a LoRA may target, from its config."""
    inner = int(config.get("num_attention_heads", 70)) * int(config.get("attention_head_dim", 32))
    cross_heads = config.get("num_cross_attention_heads") or config.get("num_attention_heads", 70)
    cross_dim = config.get("cross_attention_head_dim") or config.get("attention_head_dim", 32)
    cross_inner = int(cross_heads) * int(cross_dim)
    context = int(config.get("cross_attention_dim") or inner)
    sizes = {}
    for block in range(int(config.get("num_layers", 20))):
        prefix = f"transformer_blocks.{block}"
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            sizes[f"{prefix}.attn1.{name}"] = (inner, inner)
        sizes[f"{prefix}.attn2.to_q"] = (inner, cross_inner)
        sizes[f"{prefix}.attn2.to_k"] = (context, cross_inner)
        sizes[f"{prefix}.attn2.to_v"] = (context, cross_inner)
        sizes[f"{prefix}.attn2.to_out.0"] = (cross_inner, inner)
    sizes["caption_projection.linear_1"] = (int(config.get("caption_channels", 2304)), inner)
    sizes["caption_projection.linear_2"] = (inner, inner)
    return sizes


_PAIR = re.compile(r"(?:transformer\.)?(.+)\.lora_(A|B)(?:\.[\w-]+)?\.weight")
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def check_fits(shapes: dict, source: str, model: str, config: dict | None) -> None:
    """Refuse a LoRA whose tensors cannot apply to this transformer (see the module docstring)."""
    pairs: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        match = _PAIR.fullmatch(name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = shape
    if not pairs:
        kohya = any(".lora_down." in name or ".lora_up." in name for name in shapes)
        raise UsageError(f"LoRA {source} has no diffusers/peft LoRA weights (lora_A/lora_B) for a Sana transformer"
                         + (" (it is in the kohya format, which diffusers does not convert for Sana)" if kohya else ""))
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise UsageError(f"LoRA {source} has lora_{''.join(pair)} without its partner for {module}")
        a, b = pair["A"], pair["B"]
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            raise UsageError(f"LoRA {source} has a rank layout diffusers cannot load at {module} "
                             f"(lora_A {list(a)}, lora_B {list(b)})")
    if config is None:
        return  # the model's config is not readable before loading; loading checks the rest
    sizes = _module_sizes(config)
    layers = int(config.get("num_layers", 20))
    for module, pair in sorted(pairs.items()):
        block = _BLOCK.match(module)
        if block and int(block.group(1)) >= layers:
            raise UsageError(f"LoRA {source} does not fit {model}: it has weights for {module}, and {model} has "
                             f"{layers} transformer blocks (made for another base model?)")
        if module in sizes:
            want_in, want_out = sizes[module]
            got_in, got_out = pair["A"][1], pair["B"][0]
            if (got_in, got_out) != (want_in, want_out):
                raise UsageError(f"LoRA {source} does not fit {model}: {module} is {want_in}->{want_out} there and "
                                 f"{got_in}->{got_out} in the LoRA (made for another base model?)")
        elif not module.startswith(("transformer_blocks.", "caption_projection", "time_embed", "patch_embed",
                                    "proj_out", "norm_out")):
            raise UsageError(f"LoRA {source} does not fit {model}: it has weights for {module}, which a Sana "
                             "transformer does not have")


def transformer_config(ref) -> dict | None:
    """The model's transformer config when it can be read without loading (tiny, local, cached hub)."""
    from .modelref import _read_json, cached_file

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


def resolve_all(specs, model_ref, *, offline: bool = False) -> tuple[tuple[str, str, float], ...]:
    """Every --lora value of a job, resolved and checked: ((id, sha256, scale), ...), in the order given."""
    if isinstance(specs, str):
        specs = (specs,)
    resolved, seen = [], set()
    config = None
    for spec in specs or ():
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            source, scale = spec[0], check_scale(spec[1], str(spec[0]))
        else:
            source, scale = parse_spec(spec)
        identity, weights, digest = _resolved(source, offline)
        if digest in seen:
            raise UsageError(f"LoRA {source} is given twice; give it once with the sum of its scales")
        seen.add(digest)
        if config is None:
            config = transformer_config(model_ref) or {}
        check_fits(read_header(weights, source), source, model_ref.name, config or None)
        resolved.append((identity, digest, scale))
    return tuple(resolved)


_CACHE: dict[tuple, tuple] = {}  # one run resolves the same LoRA for every row: hash it once


def _resolved(source: str, offline: bool):
    try:
        stat = os.stat(os.path.expanduser(source))
        marker = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        marker = None
    key = (source, offline, marker)
    if key not in _CACHE:
        _CACHE[key] = resolve(source, offline=offline)
    return _CACHE[key]


def weights_file(identity: str, digest: str, offline: bool = False) -> str:
    """The local file of a resolved LoRA, re-checked against its hash (it may have changed since planning)."""
    _, weights, now = resolve(identity, offline=offline)
    if now != digest:
        raise UsageError(f"LoRA {identity} changed after the run was planned (its sha256 differs); run again")
    return weights


# ---- run time (torch) ------------------------------------------------------------------------------

def adapter_name(digest: str) -> str:
    return "lora_" + digest[:16]


def prepare(loaded, sets, *, restorable: bool) -> None:
    """Load every LoRA a run needs as a named adapter before any image is made, so one that does not
    fit fails the run at once (exit 2) instead of failing the rows that use it."""
    state = loaded.lora_state
    missing = {(identity, digest) for loras in sets for identity, digest, _ in loras
               if adapter_name(digest) not in state.setdefault("loaded", set())}
    if not missing:
        return
    if state.get("fused"):
        _restore(loaded)
    state.setdefault("requires_grad", {name: p.requires_grad for name, p in loaded.pipe.transformer.named_parameters()})
    for identity, digest in sorted(missing):
        load_adapter(loaded, identity, digest)
    loaded.pipe.disable_lora()  # nothing acts until a set is applied
    _plain_flags(loaded, base=True)
    state["restorable"] = restorable


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
