"""--quantize: the transformer's weights stored quantized, through the quantization configs diffusers loads with.

int8: torchao's `Int8WeightOnlyConfig` (per-row int8 weights; each product runs in the run's dtype), given to
`from_pretrained` as diffusers' `TorchAoConfig`, which quantizes every `nn.Linear` as it loads. About half of
Sana's transformer weights are not in Linear layers but in the 1x1 convolutions of its feed-forward
(GLUMBConv), which no diffusers config quantizes; torchao's own `swap_conv2d_1x1_to_linear` turns each into
the same product as a Linear, and the same config quantizes those too. That brings the transformer to about
half its bf16 size (Linear layers alone: about 0.74x). It works on every device torch runs on.

nf4: bitsandbytes' 4-bit NormalFloat through diffusers' `BitsAndBytesConfig` (Linear layers), computing in
the run's dtype. bitsandbytes quantizes on CUDA only, so it is refused elsewhere before anything loads. It
quantizes on the current CUDA device, which the load makes the GPU asked for (pipeline.current_cuda_device).

fp8 is not here: `--quantize fp8` is `--fp8` (speed.enable_fp8, torchao fp8 weights and activations).

The VAE and Gemma stay as loaded: the VAE's convolutions decide every pixel directly, and under
`--low-memory` Gemma is on the GPU alone, where its bf16 weights (4.9 GiB) already fit an 8 GiB budget.
"""

from __future__ import annotations

import contextlib

from ..errors import EnvironmentProblem, UsageError

# quantize -> (module to import, the pip command that installs it, needs CUDA)
BACKENDS = {
    "int8": ("torchao", "pip install 'torchao>=0.15'", False),
    "nf4": ("bitsandbytes", "pip install 'sana-cli[nf4]'", True),
}


def check(quantize: str | None, device_type: str) -> None:
    """Refuse, before anything loads, a quantization this machine cannot run: nf4 without CUDA, or a
    backend that is not installed (exit 4, with the command that installs it)."""
    if quantize is None:
        return
    if quantize not in BACKENDS:
        raise UsageError(f"unknown --quantize {quantize!r}; use int8, fp8 or nf4")
    module, install, needs_cuda = BACKENDS[quantize]
    if needs_cuda and device_type != "cuda":
        raise EnvironmentProblem(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes quantizes on CUDA only)",
                                 hint="--quantize int8 works on the CPU")
    if not backend_installed(quantize):
        raise EnvironmentProblem(f"--quantize {quantize} needs the {module} package, which is not installed",
                                 hint=install)


def backend_installed(quantize: str) -> bool:
    import importlib

    try:
        importlib.import_module(BACKENDS[quantize][0])
    except ImportError:
        return False
    return True


def pipeline_config(quantize: str, dtype):
    """The diffusers PipelineQuantizationConfig that quantizes the transformer as it loads; `dtype` is the
    transformer's torch dtype, which stays its compute dtype."""
    from diffusers import BitsAndBytesConfig, TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig

    if quantize == "int8":
        config = TorchAoConfig(int8_config())
    elif quantize == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        raise UsageError(f"unknown --quantize {quantize!r}; use int8, fp8 or nf4")
    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def int8_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def finish(pipe, quantize: str) -> None:
    """After loading: int8 also quantizes the transformer blocks' 1x1 convolutions (as Linear layers), then
    lets go of the weight files the rest of the transformer still maps."""
    transformer = getattr(pipe, "transformer", None)
    if quantize == "int8" and transformer is not None:
        quantize_pointwise_convs(transformer)
        own_unquantized(transformer)


# glibc's mallopt parameter: allocations above it are mapped on their own and unmapped when freed.
_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def compact_heap(active: bool = True):
    """Quantizing on the CPU frees a temporary copy of every weight. glibc raises its mmap threshold after the
    first large free and then serves such copies from its heap, where they fragment: measured on the full-size
    transformer, 2.9 GiB of freed memory stayed resident after the load. So, while quantizing, copies above
    1 MiB get their own mapping (returned when freed); afterwards the threshold is fixed at glibc's 64-bit
    maximum (where its dynamic threshold ends up), and the heap is trimmed. Not glibc: nothing to do."""
    libc = _glibc() if active else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.malloc_trim(0)


def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def own_unquantized(module) -> None:
    """Give the module's unquantized parameters and buffers (norms, biases, the depthwise convolutions) their own
    memory. On the CPU they are views of the memory-mapped weight files, which keep every page the quantization
    read resident (3 GiB for the full-size transformer) for as long as one view lives."""
    import torch

    with torch.no_grad():
        for child in module.modules():
            for store in (child._parameters, child._buffers):
                for name, tensor in store.items():
                    if tensor is not None and tensor.device.type == "cpu" and not is_quantized(tensor):
                        tensor.data = tensor.data.clone()


def _is_block_pointwise_conv(module, fqn: str) -> bool:
    import torch

    return (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and fqn.startswith("transformer_blocks."))


def quantize_pointwise_convs(transformer) -> None:
    """The feed-forward's 1x1 convolutions as int8 Linear layers (torchao's swap, then the int8 config)."""
    import torch
    from torchao.quantization import quantize_, swap_conv2d_1x1_to_linear

    swapped = {name for name, module in transformer.named_modules() if _is_block_pointwise_conv(module, name)}
    if not swapped:
        return
    # The swap builds each Linear with fresh weights before taking the conv's: do that in the weights' dtype on
    # the meta device, so it costs neither time nor memory.
    with torch.device("meta"):
        swap_conv2d_1x1_to_linear(transformer, filter_fn=_is_block_pointwise_conv)
    quantize_(transformer, int8_config(),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn.rsplit(".", 1)[0] in swapped)


def is_quantized(parameter) -> bool:
    """Whether a parameter holds quantized data (a torchao tensor subclass or a bitsandbytes parameter)."""
    import torch

    return type(parameter) not in (torch.Tensor, torch.nn.Parameter) and (
        hasattr(parameter, "__tensor_flatten__") or hasattr(parameter, "quant_state"))


def storage_bytes(tensor) -> int:
    """The bytes a tensor really holds: for a torchao subclass, its inner tensors (int8 data and scales); for a
    bitsandbytes parameter, its packed data plus its quantization state; else numel x element size."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ not in ("Parameter", "Tensor"):
        names, _ = flatten()
        return sum(storage_bytes(getattr(tensor, name)) for name in names)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        size += sum(value.numel() * value.element_size() for value in vars(state).values()
                    if hasattr(value, "element_size"))
    return size


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as stored."""
    return sum(storage_bytes(t) for t in [*module.parameters(), *module.buffers()])


def quantized_modules(module) -> dict[str, str]:
    """{module name: weight type} for every module whose weight is quantized (for tests and the benchmark)."""
    found = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if weight is not None and is_quantized(weight):
            found[name] = type(weight).__name__
    return found
