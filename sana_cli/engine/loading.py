"""Loading Sana pipelines: class, device, dtype, variant, revision, offline mode, safety.

The one module that calls `from_pretrained`. It never passes `trust_remote_code` or
`custom_pipeline`, loads safetensors only unless the user allows pickle, and maps every loading
failure to a one-line error with the right exit code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..cache import cache_root
from ..errors import EnvironmentProblem, UsageError
from ..models.modelref import ModelRef, check_components
from ..models.presets import SANA, SANA_PAG, SANA_SPRINT, SANA_VIDEO, component_dtypes, fp8_refusal, pag_supported
from ..planning.plan import LoadOptions, quantize_choice
from . import tiny_build as tiny
from .load_errors import loading_error, offline_missing

# Weight files above this size on disk mean "a real model": it needs CUDA unless --device cpu.
_BIG_MODEL_BYTES = 200 * 2**20


@dataclass
class LoadedModel:
    """A loaded pipeline plus what the runner and the metadata need to know about it."""

    pipe: object
    ref: ModelRef
    device: object  # torch.device
    dtype: object  # torch.dtype of the transformer
    commit: str | None = None
    options: LoadOptions = field(default_factory=LoadOptions)
    _pag: dict = field(default_factory=dict)
    text_encoder_freed: bool = False
    _description: dict | None = None
    dtypes: dict = field(default_factory=dict)  # component name -> the torch.dtype the load planned for it
    # Device types on which a one-shot run moves the text encoder to `meta` once every prompt is encoded.
    # Only CUDA by default (on the CPU the memory comes back only to the allocator); tests widen it to run
    # that path on a CPU.
    release_text_encoder_on: tuple = ("cuda",)
    lora_state: dict = field(default_factory=dict)  # the LoRA adapters loaded and the set fused (see lora.apply)
    lora_restorable: bool = False  # keep a copy of the weights a LoRA changes, to change the set later
    _controlnets: dict = field(default_factory=dict)  # ControlNet source -> SanaControlNetPipeline
    _img2img: object = None
    _image_to_video: object = None
    # The per-call state every pipeline shares, as loaded, taken before the first call (see prepare_call).
    _loaded_scheduler: object = None
    _loaded_processors: dict | None = None

    @property
    def generator_device(self) -> str:
        # Noise is drawn on the execution device, as the model cards do, so a seed gives the card's noise.
        # Pixels equal a plain from_pretrained pipeline's; the card's extra `text_encoder.to(bf16)` also
        # casts Gemma's rotary frequencies to bf16, which moves pixels by a few levels (bench/README.md).
        return self.device.type

    def check_pag_layers(self, pag_layers: str) -> list[str]:
        """The layer patterns of a --pag-layers value, each matching a self-attention layer of this transformer
        as diffusers' PAG matches them (checked here, before a run: diffusers only finds out mid-call)."""
        from ..models.presets import check_pag_layers

        return check_pag_layers(pag_layers, int(self.pipe.transformer.config.num_layers), self.ref.name)

    def pipeline_for(self, pag_layers: str | None):
        """The base pipeline, or a SanaPAGPipeline sharing its weights.

        Built from the base pipeline's components rather than with `from_pipe`, which casts every shared
        module to its `dtype` argument (float32 when none is given): one dtype cannot express an fp16
        transformer beside a bf16 Gemma and DC-AE, and a round trip through it is lossy."""
        if not pag_layers:
            return self.pipe
        if pag_layers not in self._pag:
            from diffusers import SanaPAGPipeline

            layers = self.check_pag_layers(pag_layers)
            components = {name: self.pipe.components[name]
                          for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
            try:
                pag = SanaPAGPipeline(**components, pag_applied_layers=layers)
            except ValueError as exc:
                raise UsageError(f"--pag-layers {pag_layers!r}: {exc}") from exc
            pag.set_progress_bar_config(disable=True)
            self._pag[pag_layers] = pag
        return self._pag[pag_layers]

    def pipeline_for_job(self, job):
        """The pipeline that makes a job's image: a ControlNet or (SANA-Sprint) image-to-image pipeline built from
        the base pipeline's components (sharing every module, as PAG does), else pipeline_for(pag_layers). A Sana
        model's image-to-image job runs the pipeline it would run without its image (see img2img)."""
        if job.controlnet:
            if job.controlnet not in self._controlnets:
                from diffusers import SanaControlNetPipeline

                from .controlnet import load_controlnet

                controlnet = load_controlnet(self, job.controlnet, getattr(job, "controlnet_sha256", None))
                pipe = SanaControlNetPipeline(**self._base_components(), controlnet=controlnet)
                pipe.set_progress_bar_config(disable=True)
                self._controlnets[job.controlnet] = pipe
            return self._controlnets[job.controlnet]
        if job.image and self.ref.pipeline == SANA_VIDEO:  # the first frame of an image-to-video job
            if self._image_to_video is None:
                from diffusers import SanaImageToVideoPipeline

                self._image_to_video = SanaImageToVideoPipeline(**self._base_components())
                self._image_to_video.set_progress_bar_config(disable=True)
            return self._image_to_video
        if job.image and self.ref.is_sprint:
            if self._img2img is None:
                from diffusers import SanaSprintImg2ImgPipeline

                self._img2img = SanaSprintImg2ImgPipeline(**self._base_components())
                self._img2img.set_progress_bar_config(disable=True)
            return self._img2img
        return self.pipeline_for(job.pag_layers)

    def prepare_call(self, job):
        """The pipeline that makes a job's image, with every piece of per-call component state set for this
        job and nothing left from an earlier call. The base, PAG, ControlNet and image-to-image pipelines
        share one transformer, VAE and text encoder, so this is the one place that state is set:

        - the LoRA set fused into the transformer: exactly the job's (lora.apply);
        - the transformer's attention processors: the loaded ones. A PAG call swaps in perturbed-attention
          processors and puts back what it found only when it returns: a call that raised (out of memory,
          a failed batch retried alone) left them on the shared transformer, where a plain call would use
          them and a later PAG call would take them for the originals;
        - the scheduler: a fresh copy of the loaded one (the preset's flow shift is in its config) for this
          call alone, so no timesteps, step or begin index, or solver history of an earlier call, or of
          another pipeline, can reach this one; for a Sana model's image-to-image job, cut to the steps its
          strength keeps (img2img.truncate_schedule);
        - ControlNet conditioning, strength and PAG scale are arguments of the call, not component state.

        Then every component's dtype and device are checked, the ControlNet's too (check_placement)."""
        from . import lora

        if self._loaded_scheduler is None:
            self._loaded_scheduler = copy.deepcopy(self.pipe.scheduler)
            self._loaded_processors = dict(self.pipe.transformer.attn_processors)
        pipe = self.pipeline_for_job(job)
        lora.apply(self, job.loras, restorable=self.lora_restorable)
        transformer = self.pipe.transformer
        current = transformer.attn_processors
        if current.keys() != self._loaded_processors.keys() or any(
                current[name] is not processor for name, processor in self._loaded_processors.items()):
            transformer.set_attn_processor(dict(self._loaded_processors))
        pipe.scheduler = copy.deepcopy(self._loaded_scheduler)
        if job.image and not (self.ref.is_sprint or self.ref.is_video):  # a video's image is its first frame
            from . import img2img

            img2img.truncate_schedule(pipe.scheduler, img2img.skipped_steps(job))
        self.check_placement(pipe)
        return pipe

    def _base_components(self) -> dict:
        return {name: self.pipe.components[name]
                for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}

    def free_text_encoder(self) -> None:
        """Release the text encoder's GPU memory for good, once every prompt of a one-shot run is
        encoded (the memory plan). Moving it to the meta device frees it instantly."""
        encoder = getattr(self.pipe, "text_encoder", None)
        if (encoder is None or self.text_encoder_freed or self.device.type not in self.release_text_encoder_on
                or self.options.low_memory):
            return  # under CPU offload it already went back to the CPU after encoding
        import torch

        encoder.to("meta")
        self.text_encoder_freed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def check_placement(self, pipe=None) -> None:
        """Every component is in the dtype and on the device the load planned (the text encoder on `meta`
        once released), and so is the ControlNet of `pipe` when it has one (the transformer's dtype). A silent
        cast or move anywhere later fails here, loudly, instead of doubling the memory or changing the pixels
        unnoticed."""
        wrong = []
        planned_modules = [(name, getattr(self.pipe, name, None), planned) for name, planned in self.dtypes.items()]
        if getattr(pipe, "controlnet", None) is not None:
            planned_modules.append(("controlnet", pipe.controlnet, self.dtype))
        for name, module, planned in planned_modules:
            if module is None:
                continue
            parameter = next(module.parameters(), None)
            if parameter is None:
                continue
            if name == "text_encoder" and self.text_encoder_freed:
                where = "meta"
            elif self.options.low_memory and self.device.type == "cuda":
                where = None  # CPU offload moves components between the CPU and the GPU by design
            else:
                where = self.device.type
            dtype = _plain_dtype(parameter)
            if dtype != planned or (where is not None and parameter.device.type != where):
                wrong.append(f"{name} is {str(dtype).removeprefix('torch.')} on {parameter.device}, planned "
                             f"{str(planned).removeprefix('torch.')} on {where or 'cpu/' + self.device.type}")
        if wrong:
            raise RuntimeError("internal error: a model component moved or changed dtype: " + "; ".join(wrong))

    def describe(self) -> dict:
        """Model facts for metadata and JSON output (the same dict for every image of a run)."""
        if self._description is None:
            self._description = self._describe()
        return self._description

    def _describe(self) -> dict:
        import diffusers
        import torch
        import transformers

        return {"model": self.ref.name, "model_id": self.ref.source,
                "revision": self.ref.revision, "commit": self.commit, "pipeline": self.ref.pipeline,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "generator": self.generator_device,
                "scheduler": type(self.pipe.scheduler).__name__,
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__}}


def import_runtime(verbose: bool = False):
    """Import torch and diffusers, turning a missing or broken install into exit code 4. Their own
    log lines and per-component progress bars are silenced unless verbose (--debug)."""
    from .speed import compile_cache_dir

    compile_cache_dir()  # before torch: inductor fixes its cache directory the first time it looks
    if not verbose:
        quiet_backend_imports()
    try:
        import diffusers
        import huggingface_hub
        import torch
        import transformers
    except ImportError as exc:
        raise EnvironmentProblem(f"a required package is missing: {exc.name or exc}",
                                 hint="reinstall sana-cli (see README)") from exc
    if not verbose:  # our own error line says what went wrong; theirs would be a second one
        diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity(transformers.utils.logging.CRITICAL)
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.logging.set_verbosity_error()  # its retry notices, when the hub is unreachable
        quiet_library_warnings()
    return torch


# Packages whose Python warnings are theirs to their developers (peft's "Already found a `peft_config`
# attribute" when a run loads a second LoRA, deprecations): not a user's concern, and stderr is for sana's
# own lines. --debug shows them.
_WARNING_MODULES = ("peft", "diffusers", "transformers", "accelerate", "huggingface_hub", "torchao", "bitsandbytes",
                    "safetensors", "torch")


def quiet_library_warnings() -> None:
    import warnings

    for module in _WARNING_MODULES:
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


# Loggers that speak when diffusers imports an installed quantization backend: torchao lists the CUDA kernels a
# CPU build cannot load, torch's pytree a deprecation in torchao's registrations, bitsandbytes its missing CPU
# kernels. None of it concerns a run, and stderr is for sana's own lines.
_BACKEND_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


def quiet_backend_imports() -> None:
    import logging

    for name in _BACKEND_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def resolve_device(ref: ModelRef, requested: str, source_dir: Path | None):
    torch = import_runtime()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _is_big(ref, source_dir):
            raise EnvironmentProblem(f"{ref.name} needs a CUDA GPU and none is available",
                                     hint="--device cpu runs it on the CPU anyway, very slowly")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda was asked for but CUDA is not available",
                                 hint="check the NVIDIA driver and that torch is a CUDA build (`sana doctor`)")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"unsupported --device {requested!r}; use auto, cuda, cuda:N or cpu")
    return with_index(device, torch.cuda)


def with_index(device, cuda):
    """A bare `cuda` as the current CUDA device (what a multi-process launcher set for this rank): CPU
    offload would otherwise resolve it to cuda:0 on every rank. `cuda` is torch.cuda (a stand-in in tests)."""
    if device.type == "cuda" and device.index is None:
        return type(device)("cuda", cuda.current_device())
    return device


@contextlib.contextmanager
def current_cuda_device(device, cuda=None):
    """While a model loads for cuda:N, N is the current CUDA device, then the one before again. diffusers'
    bitsandbytes path (nf4) quantizes each weight on the current device when no device_map is given (and a
    pipeline's device_map cannot name a GPU index), so without this every process of a multi-GPU run, and
    `--device cuda:N`, quantized on GPU 0 before the transformer moved. `cuda` is torch.cuda (a stand-in in tests)."""
    if getattr(device, "type", None) != "cuda" or device.index is None:
        yield
        return
    if cuda is None:
        import torch

        cuda = torch.cuda
    previous = cuda.current_device()
    cuda.set_device(device.index)
    try:
        yield
    finally:
        cuda.set_device(previous)


def _is_big(ref: ModelRef, source_dir: Path | None) -> bool:
    if ref.kind == "tiny":
        return False
    if source_dir is None:
        return True
    size = sum(p.stat().st_size for p in (source_dir / "transformer").glob("*") if p.is_file())
    return size > _BIG_MODEL_BYTES


def _plain_dtype(parameter):
    """The dtype a parameter was loaded in (a torchao fp8 or int8 weight reports its original dtype; a
    bitsandbytes 4-bit one keeps it in its quantization state)."""
    state_dtype = getattr(getattr(parameter, "quant_state", None), "dtype", None)
    return state_dtype if state_dtype is not None else getattr(parameter, "dtype", None)


def _dtype_plan(ref: ModelRef, device, requested: str, checkpoint: str | None):
    """(dtype argument for from_pretrained, {component: torch.dtype}) by presets.component_dtypes."""
    import torch

    names = component_dtypes(checkpoint, requested, device.type, video=ref.pipeline == SANA_VIDEO)
    dtypes = {name: getattr(torch, value) for name, value in names.items()}
    if dtypes["transformer"] == dtypes["vae"] == dtypes["text_encoder"]:
        return dtypes["transformer"], dtypes
    return {"default": dtypes["vae"], "transformer": dtypes["transformer"]}, dtypes


def checkpoint_dtype(ref: ModelRef, source_dir: Path | None, variant: str | None) -> str | None:
    """The dtype the checkpoint's transformer weights ship in: the preset's; else the weight variant's;
    else, for a local directory, the first floating tensor in its safetensors header; else unknown."""
    if ref.preset is not None:
        return ref.preset.dtype
    if variant in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[variant]
    if source_dir is None:
        return None
    for path in sorted((source_dir / "transformer").glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(min(size, 100 * 2**20)))
        except (OSError, ValueError):
            return None
        for entry in header.values():
            stored = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
                entry.get("dtype") if isinstance(entry, dict) else None)
            if stored:
                return stored
    return None


def _variant(ref: ModelRef, source_dir: Path | None, offline: bool) -> str | None:
    """The weight variant to request: the preset's, else the one the files on disk or hub have."""
    if ref.preset is not None:
        return ref.preset.variant
    files: list[str] = []
    if source_dir is not None:
        files = [str(p.relative_to(source_dir)) for p in source_dir.rglob("*.safetensors")]
    elif not offline:
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(ref.source, revision=ref.revision)
        except Exception:  # noqa: BLE001 - the listing is only a hint; loading reports real errors
            files = []
    transformer_files = [f for f in files if f.startswith("transformer/")]
    for variant in ("bf16", "fp16"):
        if any(f".{variant}." in name for name in transformer_files):
            return variant
    return None


def _source_dir(ref: ModelRef) -> Path | None:
    """The model's directory when it is local (a tiny model, built on first use, or a local path);
    None for a hub model, which from_pretrained resolves through the HF cache."""
    if ref.kind == "tiny":
        try:
            return tiny.ensure(ref.source.split(":", 1)[1])
        except Exception as exc:  # noqa: BLE001 - usually a full or read-only disk
            raise EnvironmentProblem(f"cannot build the tiny model in {cache_root()}: {exc}",
                                     hint="set SANA_CLI_CACHE to a writable directory") from exc
    if ref.kind == "local":
        return Path(ref.source)
    return None


def _pipeline_class(ref: ModelRef, source: str, offline: bool, revision: str | None):
    import diffusers

    name = ref.pipeline
    if name is None:  # a hub id we have not seen: read its model_index.json first, never run its code
        try:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(source, "model_index.json", revision=revision, local_files_only=offline)
            with open(index, encoding="utf-8") as handle:
                data = json.load(handle)
        except Exception as exc:  # noqa: BLE001 - mapped to a clear message
            raise loading_error(ref, exc, offline) from exc
        name = data.get("_class_name")
        check_components(ref.name, data)
        if name not in (SANA, SANA_PAG, SANA_SPRINT, SANA_VIDEO):
            raise UsageError(f"{ref.name} holds a {name} pipeline; sana-cli runs Sana, Sana PAG, Sprint and "
                             "SANA-Video")
    # A PAG checkpoint has the same components: load it as SanaPipeline and derive PAG with from_pipe.
    return getattr(diffusers, SANA if name == SANA_PAG else name), name


@dataclass(frozen=True)
class Preflight:
    """What load decides before it reads a weight: where the model is, its variant and stored dtype, the
    device, the weight format. Everything that can refuse a run without loading is decided here."""

    offline: bool
    source_dir: Path | None
    variant: str | None
    checkpoint: str | None
    device: object  # torch.device
    quantize: str | None


def preflight(ref: ModelRef, options: LoadOptions | None = None) -> Preflight:
    """Every refusal load can make without loading weights: an unknown or conflicting weight format, a bad
    memory cap, --fp8 with a checkpoint that is not bf16, a hub model missing from the cache while offline
    (before the device, so the missing model is what an offline machine without a GPU hears about first),
    no CUDA for --device cuda, a model too big for the CPU, --fp8 or --quantize nf4 without the GPU they need.
    Runs call it before they create an output directory or a manifest, so a refused run leaves the disk as it
    was."""
    options = options or LoadOptions()
    quantize_choice(options.quantize, options.fp8)  # an unknown or conflicting weight format, before loading
    check_max_memory(options.max_memory_gib)
    import_runtime(options.verbose)
    offline = options.offline or any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
                                     for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    source_dir = _source_dir(ref)
    variant = _variant(ref, source_dir, offline)
    checkpoint = checkpoint_dtype(ref, source_dir, variant)
    if options.fp8:  # fp8 runs on CUDA only, so judge the dtypes CUDA would get, before anything loads
        refusal = fp8_refusal(component_dtypes(checkpoint, options.dtype, "cuda"))
        if refusal:
            stored = f"a {checkpoint} checkpoint" if checkpoint else "a checkpoint"
            raise UsageError(f"{refusal} ({ref.name} is {stored}, --dtype {options.dtype})",
                             hint="--fp8 works with BF16 checkpoints under --dtype auto or bf16")
    if offline and ref.kind == "hub" and _uncached(ref):
        raise offline_missing(ref)
    device = resolve_device(ref, options.device, source_dir)
    if options.fp8 and device.type != "cuda":
        raise EnvironmentProblem("--fp8 needs a CUDA GPU (compute capability 8.9 or newer)")
    quantize = None if options.only else options.quantize  # `sana decode` loads only the VAE, never quantized
    if quantize:
        from . import quantize as quantizing

        quantizing.check(quantize, device.type)
    return Preflight(offline=offline, source_dir=source_dir, variant=variant, checkpoint=checkpoint, device=device,
                     quantize=quantize)


def _uncached(ref: ModelRef) -> bool:
    """A hub model whose model_index.json is not in the cache: loading offline cannot find it."""
    from ..models.modelref import cached_file

    try:
        return cached_file(ref.source, "model_index.json", ref.revision) is None
    except (OSError, ValueError):
        return False  # the cache cannot say: loading will


def load(ref: ModelRef, options: LoadOptions | None = None) -> LoadedModel:
    """Load the pipeline a ModelRef names, ready to run. Raises SanaError subclasses on failure."""
    options = options or LoadOptions()
    checked = preflight(ref, options)
    offline, source_dir, variant, checkpoint = checked.offline, checked.source_dir, checked.variant, checked.checkpoint
    device, quantize = checked.device, checked.quantize
    if quantize:
        from . import quantize as quantizing
    dtype_argument, dtypes = _dtype_plan(ref, device, options.dtype, checkpoint)
    transformer_dtype = dtypes["transformer"]
    source = str(source_dir) if source_dir is not None else ref.source
    cls, class_name = _pipeline_class(ref, source, offline, ref.revision)
    # allow_pickle: prefer safetensors, fall back to .bin (use_safetensors=False would refuse safetensors)
    kwargs = dict(dtype=dtype_argument, use_safetensors=None if options.allow_pickle else True)
    if variant:
        kwargs["variant"] = variant
    if ref.kind == "hub":
        kwargs.update(revision=ref.revision, local_files_only=offline)
    if options.only:
        kwargs.update({name: None for name in ("tokenizer", "text_encoder", "transformer") if name not in options.only})
    if quantize:
        kwargs["quantization_config"] = quantizing.pipeline_config(quantize, transformer_dtype)
    try:
        with current_cuda_device(device):
            if quantize:
                with quantizing.compact_heap():
                    pipe = cls.from_pretrained(source, **kwargs)
                    quantizing.finish(pipe, quantize)
            else:
                pipe = cls.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one clear line
        raise loading_error(ref, exc, offline, allow_pickle=options.allow_pickle) from exc
    pipe.set_progress_bar_config(disable=True)
    _apply_flow_shift(pipe, ref)
    if options.max_memory_gib is not None and device.type == "cuda":
        import torch

        cap_cuda_memory(torch.cuda, device, int(options.max_memory_gib * 2**30))
        if not options.low_memory and needs_offload(weights_bytes(pipe), int(options.max_memory_gib * 2**30)):
            options = replace(options, low_memory=True)
    if options.low_memory and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if not options.only:
        ref = _refine(ref, pipe, class_name)
    loaded = LoadedModel(pipe=pipe, ref=ref, device=device, dtype=transformer_dtype,
                         commit=_cached_commit(ref) if ref.kind == "hub" else None, options=options, dtypes=dtypes)
    from . import speed

    if not options.only:
        speed.apply(loaded, compile=options.compiles(), fp8=options.fp8)
    return loaded


# Room the weights must leave under --max-memory for activations and a strip decode (the 4096px
# low-memory target is 8 GiB with about 6 GiB of that in offloaded weights).
MEMORY_RESERVE_BYTES = 2 * 2**30


def weights_bytes(pipe) -> int:
    """Bytes of the three models' weights as stored (quantized weights at their quantized size)."""
    from .quantize import storage_bytes

    modules = [getattr(pipe, name, None) for name in ("text_encoder", "transformer", "vae")]
    return sum(storage_bytes(p) for module in modules if module is not None for p in module.parameters())


def needs_offload(weights: int, max_memory: int) -> bool:
    """Under --max-memory, CPU offload (one component on the GPU at a time) when all the weights plus
    room to work do not fit in the budget."""
    return weights + MEMORY_RESERVE_BYTES > max_memory


def check_max_memory(max_memory_gib: float | None) -> None:
    if max_memory_gib is not None and not max_memory_gib > 0:
        raise UsageError(f"--max-memory must be more than 0 GiB, got {max_memory_gib:g}")


def cap_cuda_memory(cuda, device, max_memory: int) -> float:
    """Make --max-memory a hard cap: the caching allocator never holds more than the budget on this GPU
    (an allocation past it raises out-of-memory, which the decode and batch fallbacks handle).
    `cuda` is the torch.cuda module (a stand-in in tests). Returns the fraction set."""
    index = device.index if device.index is not None else cuda.current_device()
    total = cuda.get_device_properties(index).total_memory
    fraction = min(1.0, max_memory / total)
    cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _apply_flow_shift(pipe, ref: ModelRef) -> None:
    """Enforce the preset's scheduler shift (the 4K model needs 6.0) when the scheduler has one."""
    shift = ref.preset.flow_shift if ref.preset is not None else None
    config = pipe.scheduler.config
    if shift is not None and "flow_shift" in config and config.get("flow_shift") != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(config, flow_shift=shift)


def _refine(ref: ModelRef, pipe, class_name: str) -> ModelRef:
    """Fill in what only the loaded configs can tell (for hub ids that were not cached)."""
    transformer = pipe.transformer.config
    native = ref.native_size or int(transformer.sample_size) * pipe.vae_scale_factor
    pipeline = SANA_SPRINT if isinstance(pipe, _sprint_class()) else (ref.pipeline or class_name)
    timestep_scale = getattr(transformer, "timestep_scale", 1.0)
    supports_pag = ref.supports_pag and pag_supported(pipeline, timestep_scale=timestep_scale)
    return replace(ref, native_size=native, pipeline=pipeline, supports_pag=supports_pag)


def _sprint_class():
    from diffusers import SanaSprintPipeline

    return SanaSprintPipeline


def _cached_commit(ref: ModelRef) -> str | None:
    """The commit of the loaded snapshot, for the metadata (None when the cache cannot say)."""
    from ..models.modelref import cached_commit

    try:
        return cached_commit(ref.source, ref.revision)
    except (OSError, ValueError):
        return None
