"""LoRA files: `--lora PATH_OR_HUB_ID[:SCALE]` parsed, found, hashed and checked against the model before
anything loads. Torch-free; the engine applies them (engine/lora.py)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import EnvironmentProblem, UsageError
from ..models.modelref import transformer_config

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
    from .values import check_finite

    check_finite(f"the scale of LoRA {source}", scale)
    low, high = SCALE_RANGE
    if not low <= scale <= high:
        raise UsageError(f"the scale of LoRA {source} must be in {low:g}..{high:g}, got {scale:g}")
    return float(scale)


def resolve(source: str, *, offline: bool = False) -> tuple[str, str, str]:
    """(id for metadata, local weights file, sha256) of a LoRA source. Usage errors for anything that
    is not a safetensors LoRA; an environment error when a hub LoRA cannot be fetched."""
    from ..models.modelref import is_hub_id, looks_like_path
    from . import supplied

    if supplied.active():  # on a server: the copy of the bytes the client sent, never its path or the hub
        weights = supplied.local(source, what="LoRA")
        return source, weights, sha256_file(weights, source)
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
    from ..models.modelref import cached_file

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
    from ..safeio import open_regular

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
    from ..safeio import BadSafetensors, read_safetensors_header

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


def resolve_all(specs, model_ref, *, offline: bool = False) -> tuple[tuple[str, str, float], ...]:
    """Every --lora value of a job, resolved and checked: ((id, sha256, scale), ...), in the order given."""
    if isinstance(specs, str):
        specs = (specs,)
    resolved, seen = [], set()
    config = None
    for spec in specs or ():
        if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):  # (source, scale) or resolved (id, sha256, scale)
            source, scale = spec[0], check_scale(spec[-1], str(spec[0]))
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
    from . import supplied

    if supplied.active():  # a server's copies are hashed per request, never cached by a client's path
        return resolve(source, offline=offline)
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
    """The local file of a resolved LoRA, re-checked against its hash (it may have changed since planning).
    On a server, the copy of the bytes the client sent with this sha256."""
    from . import supplied

    if supplied.active():
        weights = supplied.local(identity, digest, "LoRA")
        now = sha256_file(weights, identity)
        if now != digest:
            raise UsageError(f"LoRA {identity}: the server's copy does not hash to its sha256; run again")
        return weights
    _, weights, now = resolve(identity, offline=offline)
    if now != digest:
        raise UsageError(f"LoRA {identity} changed after the run was planned (its sha256 differs); run again")
    return weights
