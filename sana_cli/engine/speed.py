"""Opt-in speed modes: torch.compile of the transformer (with a compile cache that later processes
reuse) and fp8 linear layers through torchao.

Neither changes what is computed beyond floating-point rounding (compile) or the fp8 quantisation
error (fp8); the GPU tests compare both with the default path.
"""

from __future__ import annotations

import os

from ..errors import EnvironmentProblem

# Figures measured on an H100: compiling saves ~20 ms per transformer call at 1024x1024 and
# ~130 ms at 4096x4096; a cold compile costs ~40 s. `--compile auto` turns it on when a run's
# estimated saving exceeds that cost.
COLD_COMPILE_SECONDS = 40.0


def estimated_saving_seconds(width: int, height: int, steps: int, images: int) -> float:
    megapixels = width * height / 2**20
    per_call = 0.020 * megapixels ** 0.68  # fits 20 ms at 1 MPx and 130 ms at 16 MPx
    return per_call * steps * images


# Each distinct graph costs about a cold compile again: the first change of shape (after which dynamo marks
# the changed sizes dynamic and reuses that graph) and each further CFG on/off or PAG layer set.
RECOMPILE_SECONDS = COLD_COMPILE_SECONDS
# Dynamo's default of 8 graphs per code object is reached by a mixed batch (sizes x batch sizes x CFG x PAG);
# past the limit the frame runs eagerly, which is slow but never an error (fullgraph=False).
RECOMPILE_LIMIT = 64


def compile_graphs(jobs, groups=None) -> int:
    """Graphs a run compiles: one per CFG on/off and PAG layer set, plus one when the shapes (size, batch
    size) vary, after which dynamo's automatic dynamic shapes reuse it."""
    groups = groups or [[i] for i in range(len(jobs))]
    variants: dict[tuple, set] = {}
    for group in groups:
        first = jobs[group[0]]
        variant = (first.guidance > 1.0, first.pag_layers if first.pag_scale > 0 else None)
        variants.setdefault(variant, set()).add((first.width, first.height, len(group)))
    return len(variants) + any(len(shapes) > 1 for shapes in variants.values())


def compile_pays_off(jobs, groups=None) -> bool:
    """True when compiling is expected to save more time than it costs (every graph it compiles), on a GPU."""
    saving = sum(estimated_saving_seconds(j.width, j.height, j.steps, 1) for j in jobs)
    cost = COLD_COMPILE_SECONDS + RECOMPILE_SECONDS * (compile_graphs(jobs, groups) - 1)
    return saving > cost


def apply(loaded, *, compile: bool, fp8: bool) -> None:
    """Apply the requested modes to a freshly loaded model, fp8 first (compile must see the final graph)."""
    if fp8:
        enable_fp8(loaded)
    if compile:
        enable_compile(loaded)


def compile_cache_dir() -> str:
    """Inductor's cache under sana-cli's cache unless the user chose one, so that only the first
    process pays the full compile and later ones load kernels from disk."""
    from ..cache import cache_root

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


def enable_compile(loaded, backend: str = "inductor") -> None:
    """Compile the transformer with automatic dynamic shapes, so a new size or batch size reuses a graph
    instead of adding one, and without fullgraph, so that even past the recompile limit a call runs
    (eagerly) instead of failing. Under --low-memory, accelerate's offload hook moves the transformer
    inside its forward, which dynamo should not trace: there each block is compiled instead (the hook
    stays outside every compiled region)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # on by default in recent torch; made explicit
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    transformer = loaded.pipe.transformer
    if loaded.options.low_memory or getattr(transformer, "_hf_hook", None) is not None:
        for block in transformer.transformer_blocks:
            block.compile(dynamic=None, backend=backend)
    else:
        transformer.compile(fullgraph=False, dynamic=None, backend=backend)


def enable_fp8(loaded) -> None:
    """Dynamic fp8 activations and fp8 weights for the transformer's large linear layers (Hopper/Ada)."""
    import torch

    if loaded.device.type != "cuda":
        raise EnvironmentProblem("--fp8 needs a CUDA GPU (compute capability 8.9 or newer)")
    capability = torch.cuda.get_device_capability(loaded.device)
    if capability < (8, 9):
        raise EnvironmentProblem(f"--fp8 needs compute capability 8.9 or newer; this GPU has "
                                 f"{capability[0]}.{capability[1]}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise EnvironmentProblem("--fp8 needs torchao", hint="pip install 'sana-cli[fp8]'") from exc

    def large_linear(module, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.")
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    quantize_(loaded.pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=large_linear)
