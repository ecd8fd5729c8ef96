"""LoRA, ControlNet and image-to-image on real tiny parts built here: a peft LoRA on the tiny
transformer, the tiny SanaControlNetModel and the tiny Sprint. Each image equals a direct diffusers call
with the same arguments; the metadata reproduces it through `sana info --command`; batch rows take the
new columns; a changed LoRA file is never taken for a finished image."""

from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import sana_cli
from sana_cli.inputs import images as inputs
from sana_cli.engine import lora as lora_engine, tiny_build as tiny
from sana_cli.inputs import lora
from sana_cli.errors import UsageError
from sana_cli.storage.images import read_metadata

from .conftest import run_sana, shell_env

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("parts")
    made = {"a": tiny.build_lora(root / "lora-a", seed=1), "b": tiny.build_lora(root / "lora-b", seed=2),
            "controlnet": tiny.ensure(tiny.CONTROLNET), "root": root}
    rng = np.random.RandomState(0)
    for name in ("control", "start"):
        Image.fromarray((rng.rand(128, 128, 3) * 255).astype("uint8")).save(root / f"{name}.png")
        made[name] = root / f"{name}.png"
    mask = np.zeros((128, 128), "uint8")
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(root / "mask.png")
    made["mask"] = root / "mask.png"
    return made


@pytest.fixture(scope="module")
def session(tiny_models):
    return sana_cli.load("tiny")


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def direct(pipe, steps, seed, **call) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, num_inference_steps=steps, height=128, width=128, use_resolution_binning=False,
                 generator=torch.Generator("cpu").manual_seed(seed), **call).images[0]
    return np.asarray(image)


_REFERENCES: dict = {}


def reference(tiny_models, *loras) -> np.ndarray:
    """The direct diffusers image for a LoRA set (3 steps, seed 4), computed once per set."""
    key = tuple((str(path), scale) for path, scale in loras)
    if key not in _REFERENCES:
        _REFERENCES[key] = direct(sana_pipe(tiny_models, *loras), steps=3, seed=4)
    return _REFERENCES[key]


def sana_pipe(tiny_models, *loras):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(tiny_models["sana"]), dtype=torch.float32)
    if loras:
        names = []
        for number, (path, scale) in enumerate(loras):
            pipe.load_lora_weights(str(path.parent), adapter_name=f"l{number}")
            names.append((f"l{number}", scale))
        pipe.set_adapters([n for n, _ in names], [s for _, s in names])
        pipe.fuse_lora(adapter_names=[n for n, _ in names])
    return pipe


def make(session, tmp_path, name, **request):
    target = tmp_path / name
    result = session.generate(PROMPT, seed=4, steps=3, output=str(target), **request)
    assert result.images[0].ok, result.images[0].error
    return target


def test_two_loras_equal_diffusers_set_adapters_and_fuse(session, parts, tiny_models, tmp_path):
    target = make(session, tmp_path, "ab.png", loras=[f"{parts['a']}:0.7", f"{parts['b'].parent}:-0.5"])
    expected = reference(tiny_models, (parts["a"], 0.7), (parts["b"], -0.5))
    assert np.array_equal(pixels(target), expected)
    plain = make(session, tmp_path, "plain.png")
    assert np.array_equal(pixels(plain), reference(tiny_models))
    assert not np.array_equal(pixels(plain), expected)  # the LoRAs really changed the image
    meta = read_metadata(target)["sana"]
    assert [item["scale"] for item in meta["loras"]] == [0.7, -0.5]
    assert meta["loras"][0]["sha256"] == lora.sha256_file(parts["a"], "a")
    assert "loras" not in read_metadata(plain)["sana"]


def test_a_session_switching_loras_gives_each_set_its_own_pixels(session, parts, tiny_models, tmp_path):
    first = make(session, tmp_path, "a1.png", loras=[str(parts["a"])])
    other = make(session, tmp_path, "b.png", loras=[str(parts["b"])])
    plain = make(session, tmp_path, "none.png")
    again = make(session, tmp_path, "a2.png", loras=[str(parts["a"])])
    assert np.array_equal(pixels(first), pixels(again))
    assert np.array_equal(pixels(first), reference(tiny_models, (parts["a"], 1.0)))
    assert np.array_equal(pixels(other), reference(tiny_models, (parts["b"], 1.0)))
    assert np.array_equal(pixels(plain), reference(tiny_models))


def test_a_kept_model_holds_a_bounded_set_of_adapters_and_loads_an_evicted_one_again(session, parts, tiny_models,
                                                                                     tmp_path, monkeypatch):
    """A model kept for many calls (a server's) keeps at most MAX_LOADED_ADAPTERS adapters: loading another
    deletes the least recently used one the call does not need, and asking for it again loads it again, with
    its own pixels."""
    monkeypatch.setattr(lora_engine, "MAX_LOADED_ADAPTERS", 1)
    parts_c = tiny.build_lora(tmp_path / "lora-c", seed=3)  # new to the session, whatever it loaded before
    name_a, name_c = (lora_engine.adapter_name(lora.sha256_file(path, "x")) for path in (parts["a"], parts_c))
    first = make(session, tmp_path, "c1.png", loras=[str(parts_c)])
    assert session.loaded.lora_state["loaded"] == {name_c}
    other = make(session, tmp_path, "a.png", loras=[str(parts["a"])])
    assert session.loaded.lora_state["loaded"] == {name_a}
    assert lora_engine._adapter_modules(session.loaded.pipe.transformer, name_c) == []  # deleted, not just idle
    again = make(session, tmp_path, "c2.png", loras=[str(parts_c)])
    assert session.loaded.lora_state["loaded"] == {name_c}
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(other))
    assert np.array_equal(pixels(other), reference(tiny_models, (parts["a"], 1.0)))
    both = make(session, tmp_path, "ac.png", loras=[str(parts["a"]), str(parts_c)])  # a call needs both: kept
    assert session.loaded.lora_state["loaded"] == {name_a, name_c} and pixels(both).shape == (128, 128, 3)


def test_pag_with_a_lora_equals_diffusers_pag_on_the_fused_transformer(session, parts, tiny_models, tmp_path):
    from diffusers import SanaPAGPipeline

    target = make(session, tmp_path, "pag.png", loras=[str(parts["a"])], pag_scale=2.0,
                  pag_layers="transformer_blocks.1")
    base = sana_pipe(tiny_models, (parts["a"], 1.0))
    components = {k: base.components[k] for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    pag = SanaPAGPipeline(**components, pag_applied_layers=["transformer_blocks.1"])
    assert np.array_equal(pixels(target), direct(pag, steps=3, seed=4, pag_scale=2.0))


def test_controlnet_equals_diffusers_controlnet_pipeline(session, parts, tiny_models, tmp_path):
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    target = make(session, tmp_path, "cn.png", controlnet="tiny-controlnet", control_image=str(parts["control"]),
                  control_scale=0.8)
    base = sana_pipe(tiny_models)
    controlnet = SanaControlNetModel.from_pretrained(str(parts["controlnet"]))
    pipe = SanaControlNetPipeline(**{k: base.components[k] for k in ("tokenizer", "text_encoder", "vae",
                                                                      "transformer", "scheduler")},
                                  controlnet=controlnet)
    with Image.open(parts["control"]) as control:
        expected = direct(pipe, steps=3, seed=4, control_image=control.convert("RGB"),
                          controlnet_conditioning_scale=0.8)
    assert np.array_equal(pixels(target), expected)
    assert not np.array_equal(pixels(target), reference(tiny_models))
    meta = read_metadata(target)["sana"]
    assert meta["pipeline"] == "SanaControlNetPipeline" and meta["control_scale"] == 0.8
    assert meta["control_image_sha256"] == inputs.check_image(str(parts["control"]), "x")[1]


def test_img2img_equals_diffusers_sprint_img2img(parts, tiny_models, tmp_path):
    from diffusers import SanaSprintImg2ImgPipeline

    target = tmp_path / "i2i.png"
    result = sana_cli.generate(PROMPT, model="tiny-sprint", seed=6, steps=2, image=str(parts["start"]), strength=0.5,
                               output=str(target))
    assert result.images[0].ok
    pipe = SanaSprintImg2ImgPipeline.from_pretrained(str(tiny_models["sprint"]), dtype=torch.float32)
    with Image.open(parts["start"]) as start:
        expected = direct(pipe, steps=2, seed=6, image=start.convert("RGB"), strength=0.5)
    assert np.array_equal(pixels(target), expected)
    assert read_metadata(target)["sana"]["pipeline"] == "SanaSprintImg2ImgPipeline"


@pytest.mark.parametrize("model, request_", [
    pytest.param("tiny", dict(loras=["{a}:0.6"], controlnet="tiny-controlnet", control_image="{control}",
                              control_scale=1.5), id="lora-controlnet"),
    pytest.param("tiny-sprint", dict(image="{start}", strength=0.75, steps=4), id="img2img"),
    pytest.param("tiny", dict(image="{start}", strength=0.5, mask="{mask}", pag_scale=2.0, steps=3),
                 id="sana-inpaint-pag"),
])
def test_info_command_reproduces_lora_controlnet_and_img2img(model, request_, parts, tmp_path):
    def fill(value):
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value.format(a=parts["a"], control=parts["control"], start=parts["start"], mask=parts["mask"]) \
            if isinstance(value, str) else value

    first = tmp_path / "first.png"
    sana_cli.generate(PROMPT, model=model, seed=2, output=str(first), **{k: fill(v) for k, v in request_.items()})
    meta = read_metadata(first)["sana"]
    assert {"loras", "controlnet", "control_image", "image"} & set(meta)
    shown = run_sana("info", first, "--command")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    env = shell_env()
    again = subprocess.run(["bash", "-c", shown.stdout.strip()], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=180)
    assert again.returncode == 0, again.stderr
    second = tmp_path / "first-again.png"
    assert np.array_equal(pixels(first), pixels(second))
    asked = ("key", "pixel_options")  # the command names the resolved dtype and device where the first said auto
    again = read_metadata(second)["sana"]
    assert {k: v for k, v in again.items() if k not in asked} == {k: v for k, v in meta.items() if k not in asked}


def test_batch_rows_take_lora_control_image_and_scale_columns(session, parts, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        f'{{"prompt": "{PROMPT}", "seed": 4, "name": "lora", "lora": ["{parts["a"]}:0.7", "{parts["b"]}:-0.5"]}}\n'
        f'{{"prompt": "{PROMPT}", "seed": 4, "name": "cn", "control_image": "{parts["control"]}", '
        f'"control_scale": 0.8}}\n'
        f'{{"prompt": "{PROMPT}", "seed": 4, "name": "plain"}}\n')
    from sana_cli.planning.plan import BatchDefaults

    result = session.batch(str(rows), output_dir=str(tmp_path / "out"),
                           defaults=BatchDefaults(steps=3, controlnet="tiny-controlnet"))
    assert not result.failed and len(result.written) == 3
    assert np.array_equal(pixels(tmp_path / "out" / "lora.png"),
                          pixels(make(session, tmp_path, "l.png", loras=[f"{parts['a']}:0.7",
                                                                           f"{parts['b']}:-0.5"])))
    assert np.array_equal(pixels(tmp_path / "out" / "cn.png"),
                          pixels(make(session, tmp_path, "c.png", controlnet="tiny-controlnet",
                                      control_image=str(parts["control"]), control_scale=0.8)))
    assert np.array_equal(pixels(tmp_path / "out" / "plain.png"), pixels(make(session, tmp_path, "p.png")))


def test_a_one_shot_batch_goes_back_from_a_lora_row_to_a_plain_row(session, parts, tmp_path):
    """Without a session too, a row without a LoRA after one with a LoRA gets the base weights back."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"prompt": "{PROMPT}", "seed": 4, "name": "lora", "lora": "{parts["a"]}:0.7"}}\n'
                    f'{{"prompt": "{PROMPT}", "seed": 4, "name": "plain"}}\n')
    process = run_sana("batch", rows, "--model", "tiny", "--steps", 3, "-o", tmp_path / "out", "--no-server")
    assert process.returncode == 0, process.stderr
    assert np.array_equal(pixels(tmp_path / "out" / "plain.png"), pixels(make(session, tmp_path, "p.png")))
    assert not np.array_equal(pixels(tmp_path / "out" / "lora.png"), pixels(tmp_path / "out" / "plain.png"))


def test_batch_image_and_strength_columns_plan_img2img_jobs(parts, tmp_path):
    from sana_cli.api import plan_batch_file

    rows = tmp_path / "rows.csv"
    rows.write_text(f"prompt,image,strength,lora\nfox,{parts['start']},0.5,{parts['a']}:0.25\nfox,{parts['start']},,\n")
    plan, invalid, _ = plan_batch_file(str(rows), model="tiny-sprint", output_dir=str(tmp_path / "o"))
    assert not invalid
    first, second = plan.jobs
    assert (first.strength, second.strength) == (0.5, 0.6) and first.image == str(parts["start"])
    assert first.loras[0][2] == 0.25 and second.loras == ()
    assert len(plan.groups) == 2  # different LoRA sets never share a GPU batch


def test_resume_never_takes_an_image_made_with_a_changed_lora_file(session, parts, tmp_path):
    mine = tmp_path / "mine.safetensors"
    shutil.copy(parts["a"], mine)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"prompt": "{PROMPT}", "seed": 4, "name": "fox", "lora": "{mine}"}}\n')
    out = tmp_path / "out"
    from sana_cli.planning.plan import BatchDefaults

    defaults = BatchDefaults(steps=3)
    assert len(session.batch(str(rows), output_dir=str(out), defaults=defaults).written) == 1
    before = pixels(out / "fox.png")
    assert session.batch(str(rows), output_dir=str(out), defaults=defaults).already_done == 1  # unchanged: resumed
    shutil.copy(parts["b"], mine)  # the same file name, other weights
    with pytest.raises(UsageError, match="were not made by this batch with these settings"):
        session.batch(str(rows), output_dir=str(out), defaults=defaults)
    assert np.array_equal(pixels(out / "fox.png"), before)
    redone = session.batch(str(rows), output_dir=str(out), defaults=defaults, overwrite=True)
    assert len(redone.written) == 1 and redone.already_done == 0
    assert not np.array_equal(pixels(out / "fox.png"), before)


def test_a_lora_diffusers_cannot_load_is_exit_2_naming_it_before_any_image(session, parts, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"  # passes the header check (no size known for ff convs); peft refuses it
    save_file({"transformer.transformer_blocks.0.ff.conv_inverted.lora_A.weight": torch.ones(2, 99, 1, 1),
               "transformer.transformer_blocks.0.ff.conv_inverted.lora_B.weight": torch.ones(20, 2, 1, 1)}, str(bad))
    with pytest.raises(UsageError, match=f"LoRA {bad} does not fit tiny"):
        session.generate(PROMPT, seed=1, steps=1, output=str(tmp_path / "x.png"), loras=[str(bad)])
    assert not (tmp_path / "x.png").exists()
    make(session, tmp_path, "after.png")  # the session still works


# ---- pure parts: the spec rule, the header check, the input-image rule ------------------------------

@pytest.mark.parametrize("text, source, scale", [
    ("style.safetensors", "style.safetensors", 1.0),
    ("style.safetensors:0.8", "style.safetensors", 0.8),
    ("/data/run:2/style.safetensors", "/data/run:2/style.safetensors", 1.0),
    ("/data/run:2:1.0", "/data/run:2", 1.0),
    ("org/name@v1:-1.5", "org/name@v1", -1.5),
    ("org/name", "org/name", 1.0),
    ("c:lora", "c:lora", 1.0),
])
def test_lora_spec_rule(text, source, scale):
    assert lora.parse_spec(text) == (source, scale)


@pytest.mark.parametrize("text, says", [("x:nan", "finite"), ("x:inf", "finite"), ("x:-inf", "finite"),
                                        ("x:4.5", "in -4..4"), ("", "empty")])
def test_lora_spec_refusals(text, says):
    with pytest.raises(UsageError, match=says):
        lora.parse_spec(text)


def test_header_check_names_what_does_not_fit():
    config = tiny.transformer_config("sana")
    good = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (2, 8),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (8, 2)}
    lora.check_fits(good, "x", "tiny", config)
    cases = [
        ({**good, "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (2, 2240)}, "is 8->8 there"),
        ({"transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": (2, 8),
          "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": (8, 2)}, "has 2 transformer blocks"),
        ({**good, "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (8, 4)}, "rank layout"),
        ({"unet.down.lora_down.weight": (2, 8), "unet.down.lora_up.weight": (8, 2)}, "kohya"),
        ({"transformer.text_model.x.lora_A.weight": (2, 8), "transformer.text_model.x.lora_B.weight": (8, 2)},
         "which a Sana transformer does not have"),
    ]
    for shapes, says in cases:
        with pytest.raises(UsageError, match=says):
            lora.check_fits(shapes, "x", "tiny", config)


def test_input_images_any_mode_exif_and_the_cover_crop_rule(tmp_path):
    # EXIF orientation 6 (rotate 90 clockwise to view): a 40x20 file shows as 20x40, the left half red.
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 40, 10))  # the top half of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = inputs.prepare(str(tmp_path / "rot.jpg"), 20, 40)
    assert shown.size == (20, 40)
    assert shown.getpixel((15, 20))[0] > 200 and shown.getpixel((4, 20))[2] > 200  # top became the right side
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert inputs.prepare(str(tmp_path / "clear.png"), 32, 32).getpixel((0, 0)) == (255, 255, 255)
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "la.png")
    assert inputs.prepare(str(tmp_path / "la.png"), 32, 32).getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((32, 32), 0xABCD, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert inputs.prepare(str(tmp_path / "grey16.png"), 32, 32).getpixel((0, 0)) == (0xAB,) * 3
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert inputs.prepare(str(tmp_path / "cmyk.jpg"), 32, 32).getpixel((5, 5))[0] > 250
    Image.new("P", (32, 32), 3).save(tmp_path / "p.webp", lossless=True)
    assert inputs.prepare(str(tmp_path / "p.webp"), 64, 64).size == (64, 64)
    # Cover and centre-crop: a 100x50 image to 64x64 scales to 128x64 and keeps its middle.
    striped = Image.new("RGB", (100, 50), (0, 255, 0))
    striped.paste((255, 0, 0), (0, 0, 25, 50))
    out = inputs.fit(inputs.to_rgb(striped), 64, 64)
    assert out.size == (64, 64) and out.getpixel((0, 32))[1] > 200  # the red quarter was cropped away
    same = Image.new("RGB", (64, 64), (1, 2, 3))
    assert inputs.fit(same, 64, 64) is same  # an image at the planned size is used as it is


# ---- a fuse that fails part way ------------------------------------------------------------------------

def oom_on_third_merge(monkeypatch):
    """peft's merge raises CUDA's out-of-memory error on its third layer, after two layers are fused (as a
    big card runs out part way through diffusers' layer-by-layer fuse)."""
    from peft.tuners.lora.layer import Linear

    original, calls = Linear.merge, {"n": 0}

    @functools.wraps(original)  # diffusers reads merge's signature
    def merge(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "merge", merge)
    return calls


def base_weights(loaded) -> dict:
    return {name.replace(".base_layer.", "."): p.detach().clone()
            for name, p in loaded.pipe.transformer.named_parameters() if ".lora_" not in name}


@pytest.mark.parametrize("kept", [True, False], ids=["session", "one-shot"])
def test_a_lora_fuse_that_fails_part_way_leaves_the_exact_base_weights(kept, parts, tiny_models, tmp_path,
                                                                        monkeypatch):
    from sana_cli.api import Session
    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import load
    from sana_cli.planning.plan import Request, model_for, plan_generate
    from sana_cli.engine.runner import run

    loaded = load(resolve("tiny"))  # its own model: the failure must not touch the module's session

    def image(name, *loras):
        request = Request(prompt=PROMPT, model="tiny", steps=3, seed=4, output=str(tmp_path / name),
                          loras=list(loras))
        plan = plan_generate(request, model_for(request))
        # A session (and the server) keeps the model for later calls; a one-shot run with one LoRA set keeps
        # no copy of the weights after its fuse, but needs one while it fuses.
        outcome = Session(loaded).run(plan) if kept else run(plan, loaded, keep_text_encoder=False)
        return outcome.results[0]

    first = image("first.png")
    before = base_weights(loaded)
    calls = oom_on_third_merge(monkeypatch)
    failure = image("lora.png", str(parts["a"]))
    assert loaded.lora_restorable is kept
    assert calls["n"] >= 3 and not failure.ok and "out of memory" in failure.error
    assert not (tmp_path / "lora.png").exists()
    after = base_weights(loaded)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed[:5]
    monkeypatch.undo()
    again = image("again.png")
    assert np.array_equal(pixels(again.written.path), pixels(first.written.path))  # no half LoRA in the weights
    if kept:  # and the LoRA still applies whole afterwards
        lora_image = image("lora-after.png", str(parts["a"]))
        assert np.array_equal(pixels(lora_image.written.path), reference(tiny_models, (parts["a"], 1.0)))


def test_changing_the_lora_set_copies_the_base_weights_back_into_the_same_tensors(session, parts, tmp_path):
    """Compiled graphs and offload hooks hold the parameters themselves: fusing, switching sets and going back
    to none change the values in place, on each parameter's own device; no parameter is ever replaced."""
    transformer = session.loaded.pipe.transformer
    make(session, tmp_path, "a.png", loras=[str(parts["a"])])  # the adapters are in, the base weights wrapped

    def storage():
        return {name: (p.data_ptr(), p.device, p.dtype) for name, p in transformer.named_parameters()
                if ".lora_" not in name}

    def values():
        return {name: p.detach().clone() for name, p in transformer.named_parameters() if ".lora_" not in name}

    before = storage()
    make(session, tmp_path, "b.png", loras=[str(parts["b"])])
    assert storage() == before
    make(session, tmp_path, "plain.png")
    assert storage() == before
    base = values()
    make(session, tmp_path, "a-again.png", loras=[str(parts["a"])])
    make(session, tmp_path, "plain-again.png")
    assert storage() == before
    assert all(torch.equal(base[name], value) for name, value in values().items())


def test_loading_a_lora_under_cpu_offload_keeps_the_hooks_and_the_gpu_index(parts, tiny_models, monkeypatch):
    """--low-memory on cuda:1 (a stand-in: accelerate's hooks are registered and nothing moves before a forward):
    diffusers takes the offload hooks off to load an adapter and puts them back with enable_model_cpu_offload()
    and no device, which must keep GPU 1, not fall back to GPU 0."""
    from diffusers.pipelines import pipeline_utils

    from sana_cli.models.modelref import resolve
    from sana_cli.engine.loading import load

    loaded = load(resolve("tiny"))
    loaded.pipe.enable_model_cpu_offload(device=torch.device("cuda", 1))
    monkeypatch.setattr(pipeline_utils, "get_device", lambda: "cuda")  # the accelerator this machine would have

    def hooks():
        return {name: str(module._hf_hook.execution_device) for name, module in loaded.pipe.components.items()
                if isinstance(module, torch.nn.Module) and getattr(module, "_hf_hook", None) is not None}

    before = hooks()
    assert before == {"text_encoder": "cuda:1", "transformer": "cuda:1", "vae": "cuda:1"}
    loras = lora.resolve_all([str(parts["a"])], loaded.ref)
    lora_engine.prepare(loaded, [loras], restorable=True)
    name = lora_engine.adapter_name(loras[0][1])
    assert lora_engine._adapter_modules(loaded.pipe.transformer, name)  # the adapter is in
    assert hooks() == before and loaded.pipe._offload_gpu_id == 1
def test_a_controlnet_directory_edited_in_place_is_never_taken_for_finished_images(parts, tmp_path):
    """The key covers the content of a local ControlNet's files, as it does a LoRA's: a batch rerun after the
    weights changed in place (same size, same name) renders again instead of resuming."""
    from safetensors.torch import load_file, save_file

    controlnet = tmp_path / "my-controlnet"
    shutil.copytree(parts["controlnet"], controlnet)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"prompt": "a fox", "seed": 1, "control_image": "{parts["control"]}"}}\n')
    args = ["batch", rows, "--model", "tiny", "--steps", 1, "--controlnet", controlnet, "-o", tmp_path / "out",
            "--json"]
    first = run_sana(*args, check_json=True)
    assert first.returncode == 0 and first.json["written"] == 1, first.stderr
    image = next((tmp_path / "out").glob("*.png"))
    meta = read_metadata(str(image))["sana"]
    assert len(meta["controlnet_sha256"]) == 64
    again = run_sana(*args, check_json=True)
    assert again.json["written"] == 0 and again.json["already_done"] == 1  # unchanged: resumed
    weights = next(controlnet.glob("*.safetensors"))
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 0.5
    save_file(state, str(weights))
    stale = run_sana(*args)  # the image there was made with other ControlNet weights: not this batch's
    assert stale.returncode == 2 and "not made by this batch with these settings" in stale.stderr
    edited = run_sana(*args, "--overwrite", check_json=True)
    assert edited.returncode == 0 and edited.json["written"] == 1, edited.stderr
    assert read_metadata(str(image))["sana"]["controlnet_sha256"] != meta["controlnet_sha256"]


def test_a_batch_with_several_loras_keeps_library_warnings_off_stderr(parts, tmp_path):
    """Loading a second LoRA made peft warn ("Already found a `peft_config` attribute") on stderr: every
    stderr line of a run is sana's own; --debug shows the libraries' warnings."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"prompt": "a", "lora": "{parts["a"]}"}}\n{{"prompt": "b", "lora": "{parts["b"]}"}}\n')
    process = run_sana("batch", rows, "--model", "tiny", "--steps", 1, "-o", tmp_path / "out")
    assert process.returncode == 0, process.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert [line for line in process.stderr.splitlines() if not line.startswith("sana: ")] == []
