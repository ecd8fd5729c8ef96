"""The code paths only a GPU takes, run on the CPU by forcing them: the text encoder released to `meta`,
an out-of-memory GPU batch, PAG sharing the loaded weights in their dtypes, compile across shapes and
under offload hooks, the dtype rule, and the placement invariant that catches any silent cast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sana_cli.models import presets
from sana_cli.models.modelref import resolve
from sana_cli.engine.loading import LoadOptions, load
from sana_cli.planning.plan import Request, model_for, plan_generate
from sana_cli.engine.runner import run

from .conftest import one_line_error


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def dtypes_of(loaded) -> dict:
    return {name: {p.dtype for p in getattr(loaded.pipe, name).parameters()}
            for name in ("transformer", "text_encoder", "vae")}


def plan_for(tmp_path, name="a.png", **request):
    request = Request(**{"prompt": "a red fox", "model": "tiny", "steps": 2, "seed": 1,
                         "output": str(tmp_path / name), "overwrite": True, **request})
    return plan_generate(request, model_for(request))


# ---- PAG keeps the loaded dtypes -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype, expected", [
    ("bf16", {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "vae": torch.bfloat16}),
    ("fp16", {"transformer": torch.float16, "text_encoder": torch.bfloat16, "vae": torch.bfloat16}),
])
def test_pag_shares_the_weights_without_casting_them(tiny_models, dtype, expected):
    loaded = load(resolve("tiny"), LoadOptions(dtype=dtype))
    before = {name: {e} for name, e in expected.items()}
    assert dtypes_of(loaded) == before
    pag = loaded.pipeline_for("transformer_blocks.0")
    assert pag is not loaded.pipe and pag.transformer is loaded.pipe.transformer
    assert pag.scheduler is loaded.pipe.scheduler
    assert dtypes_of(loaded) == before  # diffusers' from_pipe would have made every one float32
    loaded.check_placement()


def test_pag_runs_on_an_fp16_transformer_beside_bf16_gemma_and_dcae(tiny_models, tmp_path):
    """The fp16-preset layout: PAG's latents follow the transformer's dtype, never the embeddings'."""
    loaded = load(resolve("tiny"), LoadOptions(dtype="fp16"))
    plan = plan_for(tmp_path, pag_scale=2.0, pag_layers="transformer_blocks.1", num_images=2)
    report = run(plan, loaded, keep_text_encoder=False)
    assert not report.failed, [r.error for r in report.results]
    assert all(pixels(r.written.path).std() > 0 for r in report.results)
    assert dtypes_of(loaded)["transformer"] == {torch.float16}


def test_diffusers_from_pipe_would_have_been_caught_by_the_placement_check(tiny_models):
    from diffusers import SanaPAGPipeline

    loaded = load(resolve("tiny"), LoadOptions(dtype="bf16"))
    SanaPAGPipeline.from_pipe(loaded.pipe, pag_applied_layers=["transformer_blocks.0"])
    with pytest.raises(RuntimeError, match="transformer is float32 on cpu, planned bfloat16"):
        loaded.check_placement()


def test_a_silent_cast_fails_loudly(tiny_models, tmp_path):
    loaded = load(resolve("tiny"))
    loaded.pipe.vae.to(torch.bfloat16)  # something casts a component behind the plan's back
    with pytest.raises(RuntimeError, match="vae is bfloat16 on cpu, planned float32"):
        run(plan_for(tmp_path), loaded, keep_text_encoder=False)
    report = run(plan_for(tmp_path), loaded, keep_text_encoder=True)  # per-batch encoding: the image fails instead
    assert report.failed and "vae is bfloat16 on cpu, planned float32" in report.failed[0].error


# ---- out of memory after the text encoder was released ---------------------------------------------------

def inject_oom(module, when):
    """A forward pre-hook that raises torch.OutOfMemoryError (as CUDA's allocator would) when `when(input)`."""
    calls = {"raised": 0}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if when(hidden):
            calls["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return module.register_forward_pre_hook(hook, with_kwargs=True), calls


@pytest.fixture
def release_on_cpu(monkeypatch):
    """The CUDA branch of the memory plan on the CPU: the text encoder goes to `meta` once every prompt is
    encoded. diffusers finds a pipeline's device by preferring a component that is neither on the CPU nor
    on meta (the GPU), else the first one (here the released encoder); the stand-in keeps that preference
    with the CPU playing the GPU."""
    from diffusers import DiffusionPipeline

    def device(self):
        modules = [m for m in self.components.values() if isinstance(m, torch.nn.Module)]
        return next((m.device for m in modules if m.device.type != "meta"), modules[0].device)

    monkeypatch.setattr(DiffusionPipeline, "device", property(device))

    def prepare(loaded):
        loaded.release_text_encoder_on = ("cpu", "cuda")
        return loaded

    return prepare


def test_an_oom_batch_is_retried_alone_after_the_text_encoder_was_released(tiny_models, tmp_path, release_on_cpu):
    """Forces the CUDA-only release of the text encoder to `meta`, then an out-of-memory GPU batch of 3:
    each image is retried alone from the batch's kept embeddings, and equals the image made alone."""
    loaded = release_on_cpu(load(resolve("tiny")))
    handle, calls = inject_oom(loaded.pipe.transformer, lambda hidden: hidden.shape[0] > 2)  # CFG doubles
    try:
        report = run(plan_for(tmp_path, num_images=3, batch_size=3), loaded, keep_text_encoder=False)
    finally:
        handle.remove()
    assert calls["raised"] == 1
    assert loaded.text_encoder_freed and all(p.device.type == "meta" for p in loaded.pipe.text_encoder.parameters())
    assert [(r.ok, r.retried_alone, r.error) for r in report.results] == [(True, True, None)] * 3
    (tmp_path / "alone").mkdir()
    alone = run(plan_for(tmp_path / "alone", num_images=3, batch_size=1), load(resolve("tiny")),
                keep_text_encoder=False)
    for retried, reference in zip(report.results, alone.results):
        assert np.abs(pixels(retried.written.path) - pixels(reference.written.path)).max() <= 1


def test_an_oom_while_encoding_ahead_keeps_the_text_encoder(tiny_models, tmp_path, release_on_cpu):
    """Encoding every prompt first runs out of memory on the second GPU batch: the text encoder stays,
    each remaining batch encodes its own prompts, and every image is made."""
    loaded = release_on_cpu(load(resolve("tiny")))
    seen = {"calls": 0}

    def hook(*_):
        seen["calls"] += 1
        if seen["calls"] == 3:  # prompt and negative prompt of batch 1, then the prompt of batch 2
            raise torch.OutOfMemoryError("CUDA out of memory")

    handle = loaded.pipe.text_encoder.register_forward_pre_hook(hook)
    try:
        report = run(plan_for(tmp_path, num_images=3, batch_size=1), loaded, keep_text_encoder=False)
    finally:
        handle.remove()
    assert not loaded.text_encoder_freed
    assert [r.ok for r in report.results] == [True] * 3


# ---- compile ----------------------------------------------------------------------------------------------

def test_compile_survives_more_shapes_than_the_recompile_limit(tiny_models, tmp_path):
    """Nine sizes and batch sizes, CFG on and off and a PAG layer set through one compiled transformer (CPU
    backend): with fullgraph and static shapes, the ninth graph was a hard error."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    from sana_cli.engine import speed

    torch._dynamo.reset()
    saved = dynamo_config.recompile_limit
    loaded = load(resolve("tiny"))
    try:
        speed.enable_compile(loaded, backend="aot_eager")
        dynamo_config.recompile_limit = 4  # reached well before the end of this run
        requests = [dict(size=size, num_images=n, batch_size=n) for size, n in
                    ((64, 1), (96, 1), (128, 2), (160, 1), (192, 3), (64, 2), (224, 1), (256, 1), (96, 2))]
        requests += [dict(size=64, guidance=1.0), dict(size=96, pag_scale=2.0, pag_layers="transformer_blocks.1")]
        for number, extra in enumerate(requests):
            size = extra.pop("size")
            plan = plan_for(tmp_path, f"{number}.png", width=size, height=size, force_size=True, **extra)
            report = run(plan, loaded, keep_text_encoder=True)
            assert not report.failed, (extra, report.failed[0].error)
    finally:
        dynamo_config.recompile_limit = saved
        torch._dynamo.reset()


def test_compile_under_offload_hooks_compiles_blocks_only(tiny_models, tmp_path):
    """accelerate's offload hook (what --low-memory installs on CUDA, here with the CPU as the execution
    device) stays outside the compiled regions, and the image matches eager."""
    import torch._dynamo
    from accelerate import cpu_offload_with_hook

    from sana_cli.engine import speed

    torch._dynamo.reset()
    eager = run(plan_for(tmp_path, "eager.png"), load(resolve("tiny")), keep_text_encoder=True)
    loaded = load(resolve("tiny"))
    cpu_offload_with_hook(loaded.pipe.transformer, execution_device="cpu")
    try:
        speed.enable_compile(loaded, backend="aot_eager")
        assert not hasattr(loaded.pipe.transformer, "_compiled_call_impl") or \
            loaded.pipe.transformer._compiled_call_impl is None
        report = run(plan_for(tmp_path, "compiled.png"), loaded, keep_text_encoder=True)
    finally:
        torch._dynamo.reset()
    assert not report.failed, report.failed[0].error
    a, b = pixels(eager.results[0].written.path), pixels(report.results[0].written.path)
    assert np.abs(a - b).max() <= 1


def test_compile_auto_charges_every_graph_a_mixed_run_compiles(tmp_path):
    from sana_cli.engine.speed import compile_graphs, compile_pays_off

    def jobs(**request):
        request.update(model="sana-4k", steps=20)
        return plan_for(tmp_path, **request)

    same = jobs(num_images=20, batch_size=1)
    assert compile_graphs(same.jobs, same.groups) == 1 and compile_pays_off(same.jobs, same.groups)
    # The same 20 images of 4096px, but at mixed sizes, CFG on and off and two PAG layer sets: 5 graphs.
    mixed = []
    for number, extra in enumerate([dict(width=4096, height=4096), dict(width=3072, height=4096),
                                    dict(guidance=1.0), dict(pag_scale=2.0),
                                    dict(pag_scale=2.0, pag_layers="transformer_blocks.2")]):
        mixed += jobs(num_images=4, batch_size=1, seed=number * 10, **extra).jobs
    groups = [[i] for i in range(len(mixed))]
    assert compile_graphs(mixed, groups) == 5
    assert not compile_pays_off(mixed, groups)


# ---- dtypes -----------------------------------------------------------------------------------------------

def test_dtype_rule():
    rule = presets.component_dtypes
    bf16 = dict.fromkeys(presets.COMPONENTS, "bfloat16")
    mixed = {"transformer": "float16", "text_encoder": "bfloat16", "vae": "bfloat16"}
    for device in ("cuda", "cpu"):  # the checkpoint's dtype on every device
        assert rule("bfloat16", "auto", device) == bf16
        assert rule("float16", "auto", device) == mixed
        assert rule("bfloat16", "fp16", device) == mixed  # Gemma and the DC-AE overflow in fp16
        assert rule("float16", "fp32", device) == dict.fromkeys(presets.COMPONENTS, "float32")
    assert rule("float32", "auto", "cuda") == bf16 and rule(None, "auto", "cuda") == bf16
    assert rule("float32", "auto", "cpu") == dict.fromkeys(presets.COMPONENTS, "float32")  # the tiny models
    for preset in presets.PRESETS:
        got = rule(preset.dtype, "auto", "cpu")["transformer"]
        assert got == ("float32" if preset.is_tiny else preset.dtype), preset.name
    assert presets.fp8_refusal(bf16) is None and "float16" in presets.fp8_refusal(mixed)


@pytest.mark.parametrize("variant, saved, expected", [
    ("bf16", torch.bfloat16, {"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "bfloat16"}),
    ("fp16", torch.float16, {"transformer": "float16", "text_encoder": "bfloat16", "vae": "bfloat16"}),
    (None, torch.bfloat16, {"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "bfloat16"}),
])
def test_auto_follows_a_local_checkpoints_dtype_on_the_cpu(tiny_models, tmp_path, sana, variant, saved, expected):
    """A non-preset checkpoint saved as the hub repos ship them: the variant (or, without one, the stored
    dtype) decides, and an fp16 checkpoint keeps Gemma and the DC-AE in bf16."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(tiny_models["sana"]), dtype=saved)
    pipe.save_pretrained(str(tmp_path / "model"), variant=variant)
    process = sana("generate", "a red fox", "--model", tmp_path / "model", "--seed", 1, "--steps", 2,
                   "-o", tmp_path / "x.png", "--json", check_json=True)
    assert process.returncode == 0, process.stderr
    assert process.json["model"]["dtype"] == expected["transformer"]
    loaded = load(resolve(str(tmp_path / "model")))
    assert {name: str(d).removeprefix("torch.") for name, d in loaded.dtypes.items()} == expected
    assert {name: {str(d).removeprefix("torch.") for d in found} for name, found in dtypes_of(loaded).items()} \
        == {name: {value} for name, value in expected.items()}


def test_fp8_refusal_comes_before_any_loading(sana, tmp_path):
    process = sana("generate", "a cat", "--model", "sana-multiling-1024", "--fp8", "--device", "cpu", "--json")
    assert process.returncode == 2
    assert "--fp8 needs the transformer in bf16, not float16" in one_line_error(process)
    assert json.loads(process.stdout)["exit_code"] == 2


# ---- --max-memory ---------------------------------------------------------------------------------------

GiB = 2**30


def test_max_memory_plans_the_4096_decode_within_the_budget_on_an_80_gb_card():
    """The full-size DC-AE in bf16 at 4096x4096 with a stand-in 80 GB card: without a cap auto takes the
    full decode (the fast one, ~35 GiB); with --max-memory 12 and 4 GiB already held by the weights it
    takes strips whose estimated peak fits the 8 GiB left."""
    from sana_cli.engine import vae as decode

    from .conftest import full_size_dcae

    vae = full_size_dcae().to(torch.bfloat16)
    free = 79 * GiB
    assert decode.choose(vae, 4096, 4096, free_bytes=decode.budget_bytes(free, None, 4 * GiB)) == ("full", None)
    budget = decode.budget_bytes(free, 12 * GiB, 4 * GiB)
    assert budget == 8 * GiB
    strategy, rows = decode.choose(vae, 4096, 4096, free_bytes=budget)
    assert strategy == "strips"
    per_row = decode.full_decode_bytes(vae, 4096, 4096) / (4096 // decode._tail_scale(vae))
    assert rows * per_row <= 0.85 * budget
    assert decode.budget_bytes(free, 2 * GiB, 4 * GiB) == 0  # already over: the thinnest strips


def test_max_memory_offloads_only_when_the_weights_do_not_fit():
    from sana_cli.engine.loading import needs_offload

    sana_4k = int((1.6e9 + 2.6e9 + 0.3e9) * 2)  # transformer, Gemma 2 2B and DC-AE in bf16: ~8.4 GiB
    assert not needs_offload(sana_4k, 12 * GiB)
    assert needs_offload(sana_4k, 8 * GiB)


class StandInCuda:
    """torch.cuda as far as the memory cap uses it, for an 80 GB card that is device 3 of the process."""

    def __init__(self):
        self.calls = []

    def current_device(self):
        return 3

    def get_device_properties(self, index):
        return type("Properties", (), {"total_memory": 80 * GiB})()

    def set_per_process_memory_fraction(self, fraction, index):
        self.calls.append((fraction, index))


def test_max_memory_is_a_hard_cap_on_the_caching_allocator():
    from sana_cli.engine.loading import cap_cuda_memory

    cuda = StandInCuda()
    assert cap_cuda_memory(cuda, torch.device("cuda"), 12 * GiB) == pytest.approx(0.15)
    assert cap_cuda_memory(cuda, torch.device("cuda", 1), 200 * GiB) == 1.0
    assert cuda.calls == [(pytest.approx(0.15), 3), (1.0, 1)]


def test_auto_decodes_keep_the_cuda_cache_and_empty_it_only_for_a_fallback(tiny_models, monkeypatch):
    """The CUDA branch of the auto decode on a stand-in GPU (torch.cuda's memory readings replaced, the model's
    device set to cuda:0 while its tensors stay on the CPU): free memory counts the caching allocator's unused
    blocks instead of emptying the cache before every decode; only a fallback empties it."""
    from sana_cli.engine import vae as decode
    from sana_cli.engine.runner import decode_frames

    loaded = load(resolve("tiny"))
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * GiB)
    gpu = torch.device("cuda", 0)
    assert decode.free_memory_bytes(gpu) == 21 * GiB  # 1 free at the driver + 20 cached and unused
    assert decode.in_use_bytes(gpu) == 10 * GiB
    assert decode.budget_bytes(decode.free_memory_bytes(gpu), 12 * GiB, decode.in_use_bytes(gpu)) == 2 * GiB
    loaded.device = gpu
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _, decoded = decode_frames(loaded, latents, "auto")
        assert decoded.strategy == "full" and not decoded.fallbacks
    assert calls == []

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(decode, "_full", out_of_memory)  # a full decode that does not fit after all
    _, decoded = decode_frames(loaded, latents, "auto")
    assert decoded.fallbacks == ("full",) and decoded.strategy.startswith("strips:")
    assert calls == ["empty_cache"]  # once, for the fallback


def test_max_memory_steers_the_auto_decode_end_to_end(sana, tiny_models, tmp_path):
    """On the CPU the budget (here from SANA_MAX_MEMORY, smaller than the process itself) leaves nothing
    for a full decode, so auto decodes in strips; the JSON carries both peaks (null off CUDA)."""
    args = ["generate", "a red fox", "--model", "tiny", "--seed", 1, "--steps", 2, "--json"]
    free = sana(*args, "-o", tmp_path / "free.png", check_json=True)
    capped = sana(*args, "-o", tmp_path / "capped.png", env={"SANA_MAX_MEMORY": "0.01"}, check_json=True)
    assert free.returncode == 0 and capped.returncode == 0, capped.stderr
    assert free.json["images"][0]["decode"] == "full"
    assert capped.json["images"][0]["decode"].startswith("strips:")
    assert capped.json["peak_memory_bytes"] is None and capped.json["peak_reserved_bytes"] is None
    assert np.abs(pixels(tmp_path / "free.png") - pixels(tmp_path / "capped.png")).max() <= 1


# ---- out-of-memory recognition and each rank's own GPU ----------------------------------------------------

@pytest.mark.parametrize("exc", [
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    torch.AcceleratorError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
                           "assertions."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_cuda_library_allocation_failures_are_out_of_memory(exc, tiny_models, tmp_path):
    """Recognised as out of memory, so the decode falls back to strips and a batch retries alone."""
    from sana_cli.engine import vae as decode

    assert decode.is_out_of_memory(exc)
    loaded = load(resolve("tiny"))
    calls = {}

    def fail_full_decode(module, args):
        if not calls:  # the first decode attempt (full) fails; the strips after it do not
            calls["done"] = True
            raise exc

    handle = loaded.pipe.vae.decoder.conv_in.register_forward_pre_hook(fail_full_decode)
    try:
        report = run(plan_for(tmp_path), loaded, keep_text_encoder=True)
    finally:
        handle.remove()
    assert report.results[0].ok and report.results[0].fallbacks == ("full",)
    assert report.results[0].decode.startswith("strips:")


def test_a_bare_cuda_device_means_this_ranks_own_gpu():
    from sana_cli.engine.distributed import Processes, device_for
    from sana_cli.engine.loading import with_index

    rank_3 = Processes(index=3, count=4, device="cuda:3")
    assert device_for("cuda", rank_3) == "cuda:3" and device_for("auto", rank_3) == "cuda:3"
    assert device_for("cuda:0", rank_3) == "cuda:0" and device_for("cpu", rank_3) == "cpu"
    assert device_for("cuda", None) == "cuda"
    assert with_index(torch.device("cuda"), StandInCuda()) == torch.device("cuda", 3)  # what offload receives
    assert with_index(torch.device("cuda", 1), StandInCuda()) == torch.device("cuda", 1)
    assert with_index(torch.device("cpu"), StandInCuda()) == torch.device("cpu")


def test_the_recorded_commit_is_read_from_the_cache_as_untrusted_input(tmp_path, monkeypatch):
    """The metadata's `commit` comes from the HF cache's refs file, through the same reader that
    refuses a broken one; a broken or missing refs file records no commit instead of failing."""
    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import _cached_commit

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    ref = resolve("sana-1600m-1024")
    refs = tmp_path / ("models--" + ref.source.replace("/", "--")) / "refs"
    assert _cached_commit(ref) is None
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert _cached_commit(ref) == "a" * 40
    (refs / "main").write_bytes(b"\xff not a commit")
    assert _cached_commit(ref) is None


# ---- the fp16 preset layout through image-to-image and ControlNet ------------------------------------------

@pytest.mark.parametrize("model, request_", [
    ("tiny-sprint", {"image": "start", "strength": 0.5}),
    ("tiny", {"controlnet": "tiny-controlnet", "control_image": "start", "control_scale": 0.8}),
], ids=["sprint-img2img", "controlnet"])
def test_img2img_and_controlnet_keep_the_fp16_layout(model, request_, tiny_models, tmp_path):
    """An fp16 transformer beside bf16 Gemma and DC-AE (the fp16 presets' layout): the input image's latents, the
    ControlNet's inputs and outputs and the noise are cast to what each module runs in, nothing is recast, and
    the noise is drawn on the execution device."""
    from sana_cli.storage.images import read_metadata

    start = tmp_path / "start.png"
    Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")).save(start)
    request_ = {key: str(start) if value == "start" else value for key, value in request_.items()}
    loaded = load(resolve(model), LoadOptions(dtype="fp16"))
    expected = {"transformer": {torch.float16}, "text_encoder": {torch.bfloat16}, "vae": {torch.bfloat16}}
    assert dtypes_of(loaded) == expected
    plan = plan_for(tmp_path, model=model, steps=2, **request_)
    report = run(plan, loaded, keep_text_encoder=True)
    assert not report.failed, [r.error for r in report.results]
    assert pixels(report.results[0].written.path).std() > 0
    assert dtypes_of(loaded) == expected
    loaded.check_placement()
    if "controlnet" in request_:
        controlnet = loaded.pipeline_for_job(plan.jobs[0]).controlnet
        assert {p.dtype for p in controlnet.parameters()} == {torch.float16}
    meta = read_metadata(report.results[0].written.path)["sana"]
    assert meta["generator"] == loaded.device.type and meta["dtype"] == "float16"
