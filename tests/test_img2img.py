"""Image-to-image and inpainting on the SanaPipeline models (the tiny one, real diffusers parts).

The reference is written out here from the flow-matching formula, not taken from sana-cli: x0 is the DC-AE latent
of the start image times the VAE's scaling_factor; the schedule for the steps is the scheduler's own; the last
steps - int(steps - steps * strength) steps run, from x = (1 - s) * x0 + s * noise at the sigma s of the first of
them (the noise itself when every step runs); each step is the transformer with classifier-free guidance, and for
flow Euler the update x += (s_next - s) * v written by hand; inpainting puts (1 - s_next) * x0 + s_next * noise
back outside the mask after each step. The image is the VAE's decode of the result."""

from __future__ import annotations

import copy
import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sana_cli
from sana_cli.storage.images import read_metadata

PROMPT = "a red fox in the snow"
STEPS = 6
SEED = 3
SIZE = 128


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img-inputs")
    rng = np.random.RandomState(5)
    # A smooth start image (what a photo is like), so the VAE round trip and the strengths are measurable.
    ramp = np.linspace(0, 1, SIZE)
    start = np.stack([np.outer(ramp, ramp), np.outer(1 - ramp, ramp), np.outer(ramp, 1 - ramp)], -1)
    start = (start * 200 + rng.rand(SIZE, SIZE, 3) * 40).astype("uint8")
    Image.fromarray(start).save(root / "start.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255  # repaint the right half
    Image.fromarray(mask).save(root / "mask.png")
    # The same mask as an RGBA layer: white strokes on transparency (transparent = keep).
    layer = np.zeros((SIZE, SIZE, 4), np.uint8)
    layer[:, SIZE // 2:] = 255
    Image.fromarray(layer, "RGBA").save(root / "mask-rgba.png")
    return {"start": root / "start.png", "mask": root / "mask.png", "mask_rgba": root / "mask-rgba.png",
            "root": root}


@pytest.fixture(scope="module")
def session(tiny_models):
    return sana_cli.load("tiny")


@pytest.fixture(scope="module")
def euler_model(tiny_models, tmp_path_factory):
    """The tiny model with flow Euler (FlowMatchEulerDiscreteScheduler, shift 3) instead of Flow-DPM-Solver."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    target = tmp_path_factory.mktemp("euler") / "tiny-euler"
    shutil.copytree(tiny_models["sana"], target)
    shutil.rmtree(target / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(target / "scheduler")
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0 ** 2 / error)


def make(session, tmp_path, name, **request):
    target = tmp_path / name
    result = session.generate(PROMPT, seed=SEED, steps=STEPS, output=str(target), **request)
    assert result.images[0].ok, result.images[0].error
    return target


def kept(steps: int, strength: float) -> int:
    return steps - int(max(steps - min(steps * strength, steps), 0))


# ---- the reference ---------------------------------------------------------------------------------------

class Reference:
    """The flow-matching image-to-image of a SanaPipeline directory, written out (see the module docstring)."""

    def __init__(self, model_dir):
        from diffusers import SanaPipeline

        self.pipe = SanaPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
        defaults = inspect.signature(SanaPipeline.__call__).parameters
        with torch.no_grad():
            embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
                PROMPT, True, negative_prompt="", device=torch.device("cpu"), clean_caption=False,
                max_sequence_length=defaults["max_sequence_length"].default,
                complex_human_instruction=defaults["complex_human_instruction"].default)
        self.embeds = torch.cat([negative, embeds])
        self.mask = torch.cat([negative_mask, mask])
        self.scaling = self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def x0(self, path) -> torch.Tensor:
        with Image.open(path) as image:  # to [-1, 1] by the pipeline's image processor, whose memory layout
            pixels_ = self.pipe.image_processor.preprocess(image.convert("RGB"))  # the encoder's rounding follows
        return self.pipe.vae.encode(pixels_).latent * self.scaling

    @torch.no_grad()
    def decode(self, latents) -> np.ndarray:
        image = self.pipe.vae.decode(latents / self.scaling).sample
        image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        return (image * 255).round().astype(np.int16)

    @torch.no_grad()
    def run(self, start, strength, *, guidance=4.5, mask=None, euler_by_hand=False):
        """(pixels, final latents, x0, transformer calls) of one image-to-image run from `start`."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(STEPS)
        sigmas, timesteps = scheduler.sigmas.float(), scheduler.timesteps
        skip = STEPS - kept(STEPS, strength)
        if not euler_by_hand:  # the solver's own step, on the kept tail of the schedule
            scheduler.timesteps, scheduler.sigmas = timesteps[skip:], scheduler.sigmas[skip:]
            scheduler.num_inference_steps = STEPS - skip
        x0 = self.x0(start)
        noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(SEED))
        x = noise if skip == 0 else (1 - sigmas[skip]) * x0 + sigmas[skip] * noise
        calls = 0
        for i in range(skip, STEPS):
            t = timesteps[i]
            out = self.pipe.transformer(torch.cat([x, x]), encoder_hidden_states=self.embeds,
                                        encoder_attention_mask=self.mask, timestep=t.expand(2),
                                        return_dict=False)[0].float()
            calls += 1
            uncond, text = out.chunk(2)
            velocity = uncond + guidance * (text - uncond)
            if euler_by_hand:
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity
            else:
                x = scheduler.step(velocity, t, x, return_dict=False)[0]
            if mask is not None:
                known = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
                x = mask * x + (1 - mask) * known
        return self.decode(x), x, x0, calls


def right_half_mask() -> torch.Tensor:
    """The inputs' mask at latent size (the tiny DC-AE: 4 pixels a latent): the right 16 of 32 columns."""
    mask = torch.zeros(1, 1, SIZE // 4, SIZE // 4)
    mask[..., SIZE // 8:] = 1
    return mask


@pytest.fixture(scope="module")
def dpm_reference(tiny_models):
    return Reference(tiny_models["sana"])


# ---- tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.5, 0.2])
def test_flow_euler_img2img_equals_the_formula_written_by_hand(strength, euler_model, inputs, tmp_path):
    reference = Reference(euler_model)
    expected, _, _, calls = reference.run(inputs["start"], strength, euler_by_hand=True)
    assert calls == {0.5: 3, 0.2: 2}[strength]
    target = tmp_path / "euler.png"
    sana_cli.generate(PROMPT, model=str(euler_model), seed=SEED, steps=STEPS, image=str(inputs["start"]),
                      strength=strength, output=str(target))
    assert np.array_equal(pixels(target), expected)
    text_to_image = tmp_path / "t2i.png"
    sana_cli.generate(PROMPT, model=str(euler_model), seed=SEED, steps=STEPS, output=str(text_to_image))
    assert not np.array_equal(pixels(target), pixels(text_to_image))


@pytest.mark.parametrize("strength", [0.5, 0.2])
def test_flow_dpm_img2img_equals_the_reference_on_the_kept_tail_of_the_schedule(strength, session, dpm_reference,
                                                                                inputs, tmp_path):
    expected, _, _, _ = dpm_reference.run(inputs["start"], strength)
    target = make(session, tmp_path, "dpm.png", image=str(inputs["start"]), strength=strength)
    assert np.array_equal(pixels(target), expected)
    meta = read_metadata(target)["sana"]
    assert meta["pipeline"] == "SanaPipeline" and meta["strength"] == strength
    assert meta["image"] == str(inputs["start"])
    import hashlib

    assert meta["image_sha256"] == hashlib.sha256(inputs["start"].read_bytes()).hexdigest()


def test_strength_one_is_the_text_to_image_image_exactly(session, inputs, tmp_path):
    plain = make(session, tmp_path, "t2i.png")
    full = make(session, tmp_path, "full.png", image=str(inputs["start"]), strength=1.0)
    assert np.array_equal(pixels(full), pixels(plain))
    half = make(session, tmp_path, "half.png", image=str(inputs["start"]), strength=0.5)
    assert not np.array_equal(pixels(half), pixels(plain))
    assert read_metadata(full)["sana"]["key"] != read_metadata(plain)["sana"]["key"]  # the image is in the key


def test_each_strength_runs_the_documented_number_of_steps(session, inputs, tmp_path):
    from sana_cli.reporting.events import Step

    transformer = session.loaded.pipe.transformer
    calls = []
    hook = transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        for strength, steps in ((1.0, 6), (0.5, 3), (0.2, 2), (0.1, 1)):
            calls.clear()
            totals = set()
            events = lambda event: totals.add(event.total) if isinstance(event, Step) else None  # noqa: E731
            session.generate(PROMPT, seed=SEED, steps=STEPS, output=str(tmp_path / f"{strength}.png"),
                             image=str(inputs["start"]), strength=strength, events=events)
            assert (strength, len(calls)) == (strength, steps)
            assert totals == {steps}  # the progress counts the steps that run
    finally:
        hook.remove()


def test_small_strengths_stay_near_the_start_image(session, dpm_reference, inputs, tmp_path):
    """PSNR against the VAE's round trip of the start image (the tiny DC-AE has random weights, so decode(encode(x))
    is not x) falls as the strength grows, down to text-to-image's. Measured with 50 steps: strength 0.02 (1 step,
    from sigma 0.058) 29.3 dB, 0.1 (5 steps) 19.0 dB, 0.5 (25 steps) 13.4 dB, 1.0 (text-to-image) 12.5 dB. (The
    tiny transformer's random velocities are what moves the image; a trained one moves it towards the prompt.)"""
    round_trip = dpm_reference.decode(dpm_reference.x0(inputs["start"]))
    figures = {}
    for strength in (0.02, 0.1, 0.5, 1.0):
        target = tmp_path / f"{strength}.png"
        session.generate(PROMPT, seed=SEED, steps=50, output=str(target), image=str(inputs["start"]),
                         strength=strength)
        figures[strength] = psnr(pixels(target), round_trip)
    assert figures[0.02] > 27, figures
    assert figures[0.02] > figures[0.1] > figures[0.5] > figures[1.0], figures


@pytest.mark.parametrize("mask_name", ["mask", "mask_rgba"])
def test_inpainting_keeps_the_unmasked_latents_exactly_and_repaints_the_rest(mask_name, session, dpm_reference,
                                                                             inputs, tmp_path):
    from safetensors.torch import load_file

    target = tmp_path / "inpaint.png"
    result = session.generate(PROMPT, seed=SEED, steps=STEPS, output=str(target), image=str(inputs["start"]),
                              strength=0.8, mask=str(inputs[mask_name]), keep_latents=True)
    assert result.images[0].ok, result.images[0].error
    expected, _, x0, _ = dpm_reference.run(inputs["start"], 0.8, mask=right_half_mask())
    assert np.array_equal(pixels(target), expected)
    latents = load_file(str(tmp_path / "inpaint.latents.safetensors"))["latents"]
    keep = slice(0, SIZE // 8)
    assert torch.equal(latents[..., keep], x0[..., keep])  # the known half ends as the image's latents
    assert not torch.allclose(latents[..., SIZE // 8:], x0[..., SIZE // 8:], atol=0.05)
    round_trip = dpm_reference.decode(x0)
    image = pixels(target)
    inside = psnr(image[:, SIZE // 2:], round_trip[:, SIZE // 2:])
    outside = psnr(image[:, :SIZE // 2 - 8], round_trip[:, :SIZE // 2 - 8])  # 8 px from the seam
    # Measured: outside 33.8 dB (its latents are exact; the decoder mixes in some of the repainted half),
    # inside 12.4 dB; text-to-image is 12.5 dB from the round trip.
    assert outside > 30 and inside < 20, (outside, inside)
    meta = read_metadata(target)["sana"]
    import hashlib

    assert meta["mask_sha256"] == hashlib.sha256(inputs[mask_name].read_bytes()).hexdigest()
    unmasked = make(session, tmp_path, "plain.png", image=str(inputs["start"]), strength=0.8)
    assert read_metadata(unmasked)["sana"]["key"] != meta["key"] and "mask" not in read_metadata(unmasked)["sana"]


def test_pag_and_controlnet_start_from_an_image_too(session, inputs, tmp_path):
    transformer = session.loaded.pipe.transformer
    pag = dict(pag_scale=2.0, pag_layers="transformer_blocks.1")
    plain_pag = make(session, tmp_path, "pag.png", **pag)
    assert np.array_equal(pixels(make(session, tmp_path, "pag-full.png", image=str(inputs["start"]), strength=1.0,
                                      **pag)), pixels(plain_pag))
    calls = []
    hook = transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        half = make(session, tmp_path, "pag-half.png", image=str(inputs["start"]), strength=0.5, **pag)
    finally:
        hook.remove()
    assert len(calls) == 3 and not np.array_equal(pixels(half), pixels(plain_pag))
    assert read_metadata(half)["sana"]["pipeline"] == "SanaPAGPipeline"
    control = dict(controlnet="tiny-controlnet", control_image=str(inputs["start"]))
    plain_control = make(session, tmp_path, "cn.png", **control)
    assert np.array_equal(pixels(make(session, tmp_path, "cn-full.png", image=str(inputs["start"]), strength=1.0,
                                      **control)), pixels(plain_control))
    assert not np.array_equal(pixels(make(session, tmp_path, "cn-half.png", image=str(inputs["start"]),
                                          strength=0.5, **control)), pixels(plain_control))


def test_batch_rows_take_image_strength_and_mask_columns(session, inputs, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": PROMPT, "seed": SEED, "name": "i2i", "image": str(inputs["start"]), "strength": 0.5})
        + "\n" + json.dumps({"prompt": PROMPT, "seed": SEED, "name": "inpaint", "image": str(inputs["start"]),
                             "strength": 0.8, "mask": str(inputs["mask"])}) + "\n")
    from sana_cli.planning.plan import BatchDefaults

    result = session.batch(str(rows), output_dir=str(tmp_path / "out"), defaults=BatchDefaults(steps=STEPS))
    assert not result.failed and len(result.written) == 2
    assert np.array_equal(pixels(tmp_path / "out" / "i2i.png"),
                          pixels(make(session, tmp_path, "i.png", image=str(inputs["start"]), strength=0.5)))
    assert np.array_equal(pixels(tmp_path / "out" / "inpaint.png"),
                          pixels(make(session, tmp_path, "m.png", image=str(inputs["start"]), strength=0.8,
                                      mask=str(inputs["mask"]))))


def test_the_mask_rule_modes_threshold_orientation_and_size(tmp_path):
    """Any mode to grey with transparency on black, binary at 128, resized and cropped as the image; the size
    compared after each file's EXIF orientation."""
    from sana_cli.errors import UsageError
    from sana_cli.inputs import images

    def saved(name, image, **options):
        image.save(tmp_path / name, **options)
        return str(tmp_path / name)

    grey = np.zeros((8, 16), np.uint8)
    grey[:, 4:8], grey[:, 8:12], grey[:, 12:] = 127, 128, 255
    expected = (grey >= 128) * 255
    layer = np.zeros((8, 16, 4), np.uint8)
    layer[..., :3], layer[..., 3] = 255, grey  # white, as opaque as the grey ramp: transparent is kept
    palette = Image.fromarray(grey).convert("P")
    wide = np.zeros((8, 16), np.uint16)
    wide[:, 8:] = 128 * 256  # 16-bit grey: its top 8 bits
    for name, image in (("l.png", Image.fromarray(grey)), ("rgba.png", Image.fromarray(layer, "RGBA")),
                        ("p.png", palette), ("rgb.png", Image.fromarray(grey).convert("RGB")),
                        ("i16.png", Image.fromarray(wide))):
        made = np.asarray(images.prepare_mask(saved(name, image), 16, 8))
        want = expected if name != "i16.png" else (wide >= 128 * 256) * 255
        assert np.array_equal(made, want), name
    # resized and cropped as the image is: a 32x16 mask for a 16x16 render keeps its middle 16 columns
    half = np.zeros((16, 32), np.uint8)
    half[:, 16:] = 255
    made = np.asarray(images.prepare_mask(saved("half.png", Image.fromarray(half)), 16, 16))
    assert np.array_equal(made[:, :8], np.zeros((16, 8))) and np.array_equal(made[:, 8:], np.full((16, 8), 255))
    # A JPEG 64x32 whose EXIF turns it upright as 32x64 takes a 32x64 mask, not a 64x32 one.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = saved("photo.jpg", Image.new("RGB", (64, 32), (90, 90, 90)), exif=exif.tobytes())
    upright = saved("upright.png", Image.new("L", (32, 64), 255))
    assert images.check_mask(upright, "--mask", photo, "--image", (128, 128))[0] == upright
    with pytest.raises(UsageError, match="--mask is 64x32 and --image 32x64: a mask must be the size"):
        images.check_mask(saved("lying.png", Image.new("L", (64, 32), 255)), "--mask", photo, "--image", (128, 128))


def test_a_plain_call_after_image_to_image_equals_one_in_a_fresh_process(session, inputs, tmp_path):
    """The cut schedule is the per-call scheduler copy's alone: nothing of it reaches the next call."""
    fresh = tmp_path / "fresh.png"
    sana_cli.generate(PROMPT, model="tiny", seed=SEED, steps=STEPS, output=str(fresh))
    make(session, tmp_path, "inpaint.png", image=str(inputs["start"]), strength=0.3, mask=str(inputs["mask"]))
    assert np.array_equal(pixels(make(session, tmp_path, "after.png")), pixels(fresh))


def test_a_lora_and_int8_weights_start_from_an_image_too(tiny_models, inputs, tmp_path):
    """The start image goes through the same transformer whatever its weights: a fused LoRA, or int8 weights
    (quantize int8 runs on the CPU); strength 1 is each one's text-to-image image, 0.5 another."""
    from sana_cli.engine import tiny_build as tiny

    lora = tiny.build_lora(tmp_path / "lora", seed=1)
    for session_, extra in ((sana_cli.load("tiny"), dict(loras=[f"{lora}:0.8"])),
                            (sana_cli.load("tiny", quantize="int8"), {})):
        name = "lora" if extra else "int8"
        plain = make(session_, tmp_path, f"{name}.png", **extra)
        full = make(session_, tmp_path, f"{name}-full.png", image=str(inputs["start"]), strength=1.0, **extra)
        half = make(session_, tmp_path, f"{name}-half.png", image=str(inputs["start"]), strength=0.5, **extra)
        assert np.array_equal(pixels(full), pixels(plain)), name
        assert not np.array_equal(pixels(half), pixels(plain)), name
    base = make(sana_cli.load("tiny"), tmp_path, "base-half.png", image=str(inputs["start"]), strength=0.5)
    assert not np.array_equal(pixels(base), pixels(tmp_path / "lora-half.png"))  # the LoRA really took part
