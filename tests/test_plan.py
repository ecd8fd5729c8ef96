"""Planning is pure Python: sizes, scale checks, seeds, names and GPU batches, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sana_cli.planning import fields as table, plan
from sana_cli.models import presets
from sana_cli.errors import EXIT_USAGE, EnvironmentProblem, UsageError
from sana_cli.models.modelref import resolve
from sana_cli.planning.plan import Request, model_for, plan_generate


def make(**kwargs) -> plan.Plan:
    request = Request(**{"prompt": "a cyberpunk cat with a neon sign", "seed": 1, "output": "/tmp/x/", **kwargs})
    return plan_generate(request, model_for(request))


@pytest.mark.parametrize("size, preset", [(512, "sana-1600m-512"), (1024, "sana-1600m-1024"), (2048, "sana-2k"),
                                          (4096, "sana-4k"), (1536, "sana-2k"), (768, "sana-1600m-1024")])
def test_size_without_model_picks_the_nearest_native_model(size, preset):
    result = make(width=size, height=size)
    assert result.model.name == preset
    assert (result.jobs[0].width, result.jobs[0].height) == (size, size)


def test_default_is_the_1024_model_at_its_native_size():
    result = make()
    assert result.model.name == presets.DEFAULT_MODEL
    job = result.jobs[0]
    assert (job.width, job.height, job.steps, job.guidance) == (1024, 1024, 20, 4.5)


def test_4k_model_uses_its_own_recommended_settings():
    job = make(model="sana-4k").jobs[0]
    assert (job.width, job.height, job.steps, job.guidance) == (4096, 4096, 20, 5.0)
    assert presets.get("sana-4k").flow_shift == 6.0


def test_4k_model_at_1024_is_refused_with_a_suggestion_not_silently_upscaled():
    with pytest.raises(UsageError) as info:
        make(model="sana-4k", width=1024, height=1024)
    assert info.value.exit_code == EXIT_USAGE
    assert "4096px model" in info.value.message and "sana-1600m-1024" in info.value.hint
    assert "--force-size" in info.value.hint


def test_force_size_renders_exactly_what_was_asked_and_says_so():
    result = make(model="sana-4k", width=1024, height=1024, force_size=True)
    assert (result.jobs[0].width, result.jobs[0].height) == (1024, 1024)
    assert any("--force-size" in note for note in result.notes)
    assert "rendered as asked (no resize)" in result.describe()


@pytest.mark.parametrize("width, height, fragment", [
    (1000, 1024, "not a multiple of 32"), (0, 1024, "must be positive"), (-64, 1024, "must be positive"),
    (9000 - 9000 % 32, 1024, "outside 32..8192"), (8192, 8192, "more than the 4096x4096"),
    (512, 4096, "aspect ratio"),
])
def test_bad_sizes_are_usage_errors(width, height, fragment):
    with pytest.raises(UsageError) as info:
        make(model="sana-4k", width=width, height=height)
    assert fragment in info.value.line()


def test_size_hint_names_the_neighbouring_multiples():
    with pytest.raises(UsageError) as info:
        make(width=1000, height=1000)
    assert "try 992 or 1024" in info.value.line()


def test_seeds_are_consecutive_and_drawn_when_missing():
    assert [j.seed for j in make(num_images=3, seed=41).jobs] == [41, 42, 43]
    drawn = make(seed=None).jobs[0].seed
    assert 0 <= drawn < 2**32
    assert make(seed=None).seed_rule.startswith("drawn")


def test_default_names_are_deterministic_from_prompt_and_seed(tmp_path):
    first = make(output=str(tmp_path) + "/", seed=7).jobs[0].path
    again = make(output=str(tmp_path) + "/", seed=7).jobs[0].path
    assert first == again == str(tmp_path / "a-cyberpunk-cat-with-a-neon-sign-7.png")


def test_output_file_and_numbered_files_for_several_images(tmp_path):
    single = make(output=str(tmp_path / "cat.webp")).jobs
    assert [j.path for j in single] == [str(tmp_path / "cat.webp")]
    several = make(output=str(tmp_path / "cat.jpg"), num_images=2).jobs
    assert [j.path for j in several] == [str(tmp_path / "cat-1.jpg"), str(tmp_path / "cat-2.jpg")]


def test_unknown_image_extension_is_refused(tmp_path):
    with pytest.raises(UsageError, match="use .png, .jpg or .webp"):
        make(output=str(tmp_path / "cat.gif"))


def test_existing_output_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "cat.png"
    target.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        make(output=str(target))
    assert make(output=str(target), overwrite=True).jobs[0].path == str(target)
    assert target.read_bytes() == b"precious"  # planning never writes


def test_slug_keeps_letters_of_any_script_and_drops_the_rest():
    assert plan.slugify("一只熊猫 🐼 eating, ink-drawing!!") == "一只熊猫-eating-ink-drawing"
    assert plan.slugify("🐼🎋") == "image"
    assert plan.slugify("CON") == "con_"
    assert len(plan.slugify("word " * 100)) <= 40
    assert "/" not in plan.slugify("../../etc/passwd") and ".." not in plan.slugify("../../etc/passwd")


def test_groups_split_by_parameters_and_batch_size():
    result = make(model="tiny", num_images=5, batch_size=2)
    assert result.groups == [[0, 1], [2, 3], [4]]
    jobs = result.jobs
    mixed = [jobs[0], jobs[1].__class__(**{**jobs[1].__dict__, "steps": 9}), jobs[2]]
    assert plan.group_jobs(mixed, 4) == [[0, 2], [1]]


def test_job_key_changes_with_anything_that_changes_pixels():
    base = make(model="tiny").jobs[0].key
    assert make(model="tiny").jobs[0].key == base
    assert make(model="tiny", steps=5).jobs[0].key != base
    assert make(model="tiny", negative_prompt="blur").jobs[0].key != base
    assert make(model="tiny", seed=2).jobs[0].key != base


def test_new_fields_leave_old_keys_alone_and_each_changes_the_key(tmp_path):
    # Keys made before LoRA, ControlNet and image-to-image existed (computed with that version) still match.
    assert make(model="tiny", prompt="a cat").jobs[0].key == "815acc8356b0f489"
    assert make(model="tiny-sprint", prompt="a cat", seed=5, steps=3).jobs[0].key == "2603b59fabb212e7"
    assert "loras" not in make(model="tiny").jobs[0].params()
    from safetensors.numpy import save_file
    import numpy as np
    from PIL import Image

    def lora_file(name, value):
        weights = {f"transformer.transformer_blocks.0.attn1.to_q.lora_{part}.weight": np.full(shape, value, np.float32)
                   for part, shape in (("A", (2, 8)), ("B", (8, 2)))}
        save_file(weights, str(tmp_path / name))
        return str(tmp_path / name)

    one, two = lora_file("one.safetensors", 1.0), lora_file("two.safetensors", 2.0)
    for name, colour in (("a.png", 1), ("b.png", 2)):
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(tmp_path / name)
    base = make(model="tiny").jobs[0].key
    keys = {make(model="tiny", **extra).jobs[0].key for extra in (
        {}, {"loras": (one,)}, {"loras": (two,)}, {"loras": (f"{one}:0.5",)}, {"loras": (one, two)},
        {"loras": (two, one)}, {"controlnet": "tiny-controlnet", "control_image": str(tmp_path / "a.png")},
        {"controlnet": "tiny-controlnet", "control_image": str(tmp_path / "b.png")},
        {"controlnet": "tiny-controlnet", "control_image": str(tmp_path / "a.png"), "control_scale": 0.5})}
    assert len(keys) == 9 and base in keys
    sprint = {make(model="tiny-sprint", **extra).jobs[0].key for extra in (
        {}, {"image": str(tmp_path / "a.png")}, {"image": str(tmp_path / "b.png")},
        {"image": str(tmp_path / "a.png"), "strength": 0.9})}
    assert len(sprint) == 4
    # Where an input file is does not matter, what it holds does.
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "a.png"
    moved.write_bytes((tmp_path / "a.png").read_bytes())
    assert make(model="tiny-sprint", image=str(moved)).jobs[0].key == make(model="tiny-sprint",
                                                                             image=str(tmp_path / "a.png")).jobs[0].key


def test_sprint_steps_and_features_are_checked():
    assert make(model="sprint").jobs[0].steps == 2
    for steps in (1, 3, 4):
        assert make(model="sprint", steps=steps).jobs[0].steps == steps
    with pytest.raises(UsageError, match="1-4 steps"):
        make(model="sprint", steps=5)
    with pytest.raises(UsageError, match="cannot use PAG"):
        make(model="sprint", pag_scale=2.0)
    with pytest.raises(UsageError, match="no negative prompt"):
        make(model="sprint", negative_prompt="blurry")
    with pytest.raises(UsageError, match="cannot use PAG"):
        make(model="sprint-teacher", pag_scale=2.0)


def test_pag_defaults_to_the_model_card_layer():
    job = make(pag_scale=2.0).jobs[0]
    assert (job.pag_scale, job.pag_layers) == (2.0, "transformer_blocks.8")
    assert make(pag_scale=0).jobs[0].pag_layers is None


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(UsageError) as info:
        make(model="sana-4K-model")
    assert "did you mean 'sana-4k'" in info.value.message


def test_missing_local_directory_is_an_environment_error(tmp_path):
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        resolve(str(tmp_path / "nope"))


def test_local_directory_config_is_read_without_loading(tiny_models):
    ref = resolve(str(tiny_models["sprint"]))
    assert (ref.kind, ref.pipeline, ref.native_size, ref.max_steps, ref.supports_pag) == (
        "local", "SanaSprintPipeline", 128, 4, False)
    teacher = resolve(str(tiny_models["teacher"]))
    assert teacher.pipeline == "SanaPipeline" and not teacher.supports_pag


def test_presets_table_covers_the_family_with_correct_variants():
    by_name = {p.name: p for p in presets.PRESETS}
    for name in ("sana-4k", "sana-2k", "sana-1600m-1024"):
        assert (by_name[name].variant, by_name[name].dtype) == ("bf16", "bfloat16")
    for name in ("sana-1600m-512", "sana-600m-1024", "sana-600m-512", "sana-multiling-1024"):
        assert (by_name[name].variant, by_name[name].dtype) == ("fp16", "float16")
    for name in ("sana-1.5-1.6b", "sana-1.5-4.8b", "sprint", "sprint-teacher"):
        assert by_name[name].variant is None
    assert by_name["sprint"].pipeline == "SanaSprintPipeline"
    assert by_name["sprint-teacher"].pipeline == "SanaPipeline"
    assert by_name["sana-4k"].repo == "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers"
    names = [n for p in presets.PRESETS for n in (p.name, *p.aliases)]
    assert len(names) == len(set(names))


def test_dry_run_plan_serialises_to_json():
    data = make(model="tiny", num_images=2).to_dict()
    assert json.loads(json.dumps(data))["groups"] == [[1, 2]]


def test_planning_never_imports_torch():
    code = ("import sys; from sana_cli.planning.plan import Request, model_for, plan_generate;"
            "r = Request(prompt='x', model='sana-4k', seed=1); plan_generate(r, model_for(r));"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','diffusers','transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("fp8, quantize, named", [(True, None, "--fp8"), (False, "fp8", "--fp8"),
                                                   (False, "int8", "--quantize int8"),
                                                   (False, "nf4", "--quantize nf4")])
def test_a_lora_with_quantized_weights_is_refused_while_planning(fp8, quantize, named, tiny_models, tmp_path):
    """A LoRA is fused into the transformer's weights, which fp8, int8 and nf4 replace: refused in the plan,
    before torch is imported."""
    from sana_cli.engine import tiny_build as tiny

    lora = tiny.build_lora(tmp_path / "lora", seed=1)
    code = ("import sys; from sana_cli.planning.plan import PixelOptions, Request, model_for, plan_generate\n"
            f"request = Request(prompt='a cat', model='tiny', loras=[{str(lora)!r}], "
            f"output={str(tmp_path)!r})\n"
            "try:\n"
            f"    plan_generate(request, model_for(request), PixelOptions(fp8={fp8}, quantize={quantize!r}))\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, 'torch' in sys.modules, exc)\n")
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert answer.startswith("UsageError False --lora cannot be combined with " + named + " "), answer
PAG_PATTERNS = ["transformer_blocks.1", "blocks.1", "blocks.0|blocks.1", "blocks.(0|1)", "attn1", "blocks.10",
                "transformer_blocks.5", "attn2", "blocks.1$", "transformer_blocks.1.attn1", "^attn1", "x"]


def test_the_pag_layer_rule_while_planning_is_diffusers_own(tiny_models):
    """check_pag_layers (planning, from the config) accepts exactly the patterns for which diffusers' PAG
    finds a layer in the real tiny transformer, and the pipeline refuses the others with the same line."""
    import sana_cli
    from diffusers import SanaPAGPipeline

    loaded = sana_cli.load("tiny", device="cpu").loaded
    components = {name: loaded.pipe.components[name]
                  for name in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    layers = plan.transformer_layers(resolve("tiny"))
    assert layers == 2
    for pattern in PAG_PATTERNS:
        pag = SanaPAGPipeline(**components, pag_applied_layers=[pattern])
        try:
            pag._set_pag_attn_processor(pag.pag_applied_layers, do_classifier_free_guidance=True)
            diffusers_accepts = True
        except ValueError:
            diffusers_accepts = False
        try:
            presets.check_pag_layers(pattern, layers, "tiny")
            planning_accepts = True
        except UsageError:
            planning_accepts = False
        assert planning_accepts == diffusers_accepts, pattern
        if not planning_accepts:
            with pytest.raises(UsageError, match="matches no self-attention layer of tiny"):
                loaded.pipeline_for(pattern)


def test_pag_layers_are_checked_while_planning_without_loading(tiny_models):
    for pattern, message in (("[", "is not a valid pattern"), (" , ", "names no layer"),
                             ("transformer_blocks.5", "matches no self-attention layer of tiny")):
        with pytest.raises(UsageError, match=message):
            plan_generate(Request(prompt="a", model="tiny", pag_scale=2.0, pag_layers=pattern), resolve("tiny"))
    # the default layer of every preset exists in the model when its config can be read
    plan_generate(Request(prompt="a", model="tiny", pag_scale=2.0), resolve("tiny"))
    process = subprocess.run([sys.executable, "-c", "import sys; from sana_cli.planning.plan import *; "
                              "from sana_cli.models.modelref import resolve; "
                              "plan_generate(Request(prompt='a', model='tiny', pag_scale=2.0), resolve('tiny')); "
                              "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert process.stdout.strip() == "False", process.stderr


# Two values for every field the field table marks as deciding pixels (table.PIXEL_FIELDS) and every
# PixelOptions field:
# the key test below walks those lists, so a field added there without a pair here fails it by name.
PIXEL_FIELD_PAIRS = {
    "prompt": ("a cat", "a dog"), "negative_prompt": ("", "blurry"), "seed": (1, 2), "width": (128, 160),
    "height": (128, 96), "steps": (2, 3), "guidance": (4.5, 5.0), "pag_scale": (0.0, 2.0),
    "pag_layers": (None, "transformer_blocks.0"),
    "loras": ((), (("a.safetensors", "1" * 64, 1.0),)),
    "controlnet": (None, "tiny-controlnet"), "controlnet_sha256": (None, "2" * 64),
    "control_image": (None, "/a/control.png"), "control_image_sha256": (None, "3" * 64), "control_scale": (None, 0.5),
    "image": (None, "/a/start.png"), "image_sha256": (None, "4" * 64), "strength": (None, 0.6),
    "mask": (None, "/a/mask.png"), "mask_sha256": (None, "5" * 64),
    "frames": (None, 9), "fps": (None, 16), "motion_score": (None, 30),
}
PIXEL_OPTION_PAIRS = {"device": ("cpu", "cuda"), "dtype": ("fp32", "bf16"), "fp8": (False, True),
                      "decode": ("full", "tiled"), "quantize": (None, "int8")}


def _key(pixels=plan.PixelOptions(), model="tiny", **changes) -> str:
    params = {name: pair[0] for name, pair in PIXEL_FIELD_PAIRS.items()}
    return plan.make_job(resolve(model), pixels, index=1, row=0, path="/out/a.png", **{**params, **changes}).key


def test_every_pixel_field_alone_changes_the_key_and_nothing_else_does():
    """Driven by the field table itself: each name in table.PIXEL_FIELDS and each PixelOptions field
    changes the key by itself; where an input file is (its path) and where the image goes do not."""
    from dataclasses import fields

    missing = [name for name in table.PIXEL_FIELDS if name not in PIXEL_FIELD_PAIRS]
    assert not missing, f"table.PIXEL_FIELDS has fields with no sample values in PIXEL_FIELD_PAIRS: {missing}"
    options = [f.name for f in fields(plan.PixelOptions)]
    missing = [name for name in options if name not in PIXEL_OPTION_PAIRS]
    assert not missing, f"PixelOptions has fields with no sample values in PIXEL_OPTION_PAIRS: {missing}"
    base = plan.PixelOptions(**{name: pair[0] for name, pair in PIXEL_OPTION_PAIRS.items()})
    reference = _key(base)
    assert _key(base) == reference
    for name in table.PIXEL_FIELDS:
        changed = _key(base, **{name: PIXEL_FIELD_PAIRS[name][1]})
        if name in table.KEY_SKIPS:  # a path: the file's hash (its own pixel field) is what counts
            assert f"{name}_sha256" in table.PIXEL_FIELDS, name
            assert changed == reference, f"moving the {name} file changed the key"
        else:
            assert changed != reference, f"the key ignores {name}"
    for name in options:
        changed = plan.PixelOptions(**{**{n: p[0] for n, p in PIXEL_OPTION_PAIRS.items()},
                                       name: PIXEL_OPTION_PAIRS[name][1]})
        assert _key(changed) != reference, f"the key ignores the pixel option {name}"
    assert _key(base, model="tiny-sprint") != reference
    # Not pixels: the output path, the position in a batch, the GPU index, which exact decode.
    job = plan.make_job(resolve("tiny"), base, index=7, row=9, path="/elsewhere/b.webp",
                        **{name: pair[0] for name, pair in PIXEL_FIELD_PAIRS.items()})
    assert job.key == reference
    for same in ({"device": "cuda:1"}, {"decode": "strips"}):
        one = plan.PixelOptions(**{**{n: p[0] for n, p in PIXEL_OPTION_PAIRS.items()}, "device": "cuda"})
        other = plan.PixelOptions(**{**{n: p[0] for n, p in PIXEL_OPTION_PAIRS.items()}, "device": "cuda", **same})
        assert _key(one) == _key(other), same
    # The load options that never change a pixel stay out of the key.
    load = plan.LoadOptions(device="cpu", dtype="fp32")
    for other in (plan.LoadOptions(device="cpu", dtype="fp32", low_memory=True, compile="on", max_memory_gib=3.0,
                                   offline=True, allow_pickle=True, verbose=True),):
        assert _key(other.pixels("full")) == _key(load.pixels("full"))
    # And through the planner: output directory, overwrite and GPU batch size leave the key alone.
    first = make(model="tiny", output="/tmp/x/").jobs[0].key
    assert make(model="tiny", output="/tmp/y/other.png", overwrite=True, batch_size=1).jobs[0].key == first


# ---- the field table: one row per per-image parameter ---------------------------------------------------

def test_both_commands_take_the_table_rows_as_the_same_options():
    from sana_cli.cli import cli
    from sana_cli.planning import fields

    generate, batch, video = ({p.name: p for p in cli.commands[name].params}
                              for name in ("generate", "batch", "video"))
    for row in fields.FIELDS:
        if not row.flags:
            assert row.name not in generate or row.name == "prompt", row.name  # the prompt is the argument
            continue
        if row.group == "video":  # `sana video`'s own rows
            assert row.name not in generate and row.name not in batch, row.name
            assert video[row.name].opts == list(row.flags) and video[row.name].help == row.help
            continue
        assert generate[row.name].opts == list(row.flags) and generate[row.name].help == row.help
        if row.in_batch:
            mine, theirs = batch[row.name], generate[row.name]
            assert (mine.opts, mine.metavar, mine.default, mine.multiple, mine.type.name) == (
                theirs.opts, theirs.metavar, theirs.default, theirs.multiple, theirs.type.name)
            assert mine.help == (row.batch_help or row.help)
    batch_help = cli.commands["batch"].help
    assert all(f'"{column}"' in batch_help for column in fields.COLUMNS), "a batch column missing from batch --help"


def test_the_columns_request_job_and_server_fields_are_the_table_rows():
    from dataclasses import fields as dataclass_fields

    from sana_cli.planning import batchfile, fields
    from sana_cli.planning.reproduce import NOT_OPTIONS, OPTIONS
    from sana_cli.server.wire import INPUT_FILE_FIELDS
    from sana_cli.server.openai_images import SANA_FIELDS

    assert {row.column: fields.column_type(row) for row in fields.FIELDS if row.column} == batchfile.FIELDS
    assert {f.name for f in dataclass_fields(plan.Request)} >= {row.name for row in fields.FIELDS if row.request}
    assert {f.name for f in dataclass_fields(plan.ImageJob)} >= set(fields.PIXEL_FIELDS)
    assert {f.name for f in dataclass_fields(plan.BatchDefaults)} >= {row.name for row in fields.DEFAULTS_FIELDS}
    reproduced = {option.field for option in OPTIONS}
    assert all((name in reproduced) != (name in NOT_OPTIONS) for name in fields.PIXEL_FIELDS)
    assert set(SANA_FIELDS) == {row.name for row in fields.FIELDS if row.http}
    assert fields.FILE_FIELDS == ("loras", "controlnet", "control_image", "image", "mask")
    assert not set(SANA_FIELDS) & set(fields.FILE_FIELDS)  # never a path from a client
    assert INPUT_FILE_FIELDS == fields.FILE_FIELDS


# A parameter added as one row of the table (fields.py read and run with the row added, before anything
# imports it), then taken by every planning-side consumer without another edit.
NEW_ROW = '''    Field("sharpness", "float | None", flags=("--sharpness",), metavar="X", help="How sharp, 0-1.",
          batch_help="Default sharpness.", column="sharpness", pixels=True, optional=True, range=(0.0, 1.0),
          reproduce="optional_number", http=True),
)

BY_NAME ='''

ADDED_ROW_SCRIPT = r'''
import importlib.util, json, sys
import sana_cli.planning
spec = importlib.util.find_spec("sana_cli.planning.fields")
source = open(spec.origin).read()
assert source.count("\n)\n\nBY_NAME =") == 1
source = source.replace("\n)\n\nBY_NAME =", "\n" + sys.argv[1], 1)
module = importlib.util.module_from_spec(spec)
sys.modules["sana_cli.planning.fields"] = module
exec(compile(source, spec.origin, "exec"), module.__dict__)
from click.testing import CliRunner
from sana_cli.cli import cli
from sana_cli.planning import batchfile, reproduce
from sana_cli.server import openai_images
out = {}
run = CliRunner().invoke(cli, ["generate", "a cat", "--model", "tiny", "--seed", "1", "--sharpness", "0.25",
                               "--dry-run", "--json", "-o", sys.argv[2] + "/g/"])
out["generate"] = json.loads(run.stdout)["images"][0]
bad = CliRunner().invoke(cli, ["generate", "a cat", "--model", "tiny", "--sharpness", "3", "--dry-run"])
out["bad"] = [bad.exit_code, bad.stderr.strip().splitlines()[-1]]
open(sys.argv[2] + "/rows.jsonl", "w").write('{"prompt": "a", "sharpness": 0.5}\n{"prompt": "b"}\n')
run = CliRunner().invoke(cli, ["batch", sys.argv[2] + "/rows.jsonl", "--model", "tiny", "--sharpness", "0.75",
                               "--dry-run", "--json", "-o", sys.argv[2] + "/b"])
out["batch"] = [image.get("sharpness") for image in json.loads(run.stdout)["images"]]
out["help"] = [name for name in ("generate", "batch")
               if "--sharpness" in CliRunner().invoke(cli, [name, "--help"]).stdout]
out["columns"] = "sharpness" in batchfile.FIELDS
meta = {"model": "tiny", "prompt": "a cat", "width": 128, "height": 128, "steps": 4, "guidance": 4.5, "seed": 1,
        "sharpness": 0.25}
out["command"] = reproduce.reproduce_command(meta)
out["http"] = openai_images.parse({"prompt": "a cat", "sharpness": 0.5}).sana
print(json.dumps(out))
'''


def test_a_parameter_added_as_one_table_row_reaches_options_columns_key_reproduce_and_http(tiny_models, tmp_path):
    process = subprocess.run([sys.executable, "-c", ADDED_ROW_SCRIPT, NEW_ROW, str(tmp_path)], capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    out = json.loads(process.stdout)
    assert out["generate"]["sharpness"] == 0.25
    plain = make(model="tiny").jobs[0]
    assert out["generate"]["key"] != plain.key  # it decides pixels, so it is in the key
    assert out["bad"] == [2, "sana: error: --sharpness must be 0..1, got 3"]
    assert out["batch"] == [0.5, 0.75]  # the row's column, else the batch option
    assert out["help"] == ["generate", "batch"] and out["columns"] is True
    assert "--sharpness 0.25" in out["command"]
    assert out["http"] == {"sharpness": 0.5}


def test_a_model_name_too_long_for_a_path_is_a_usage_error_not_an_os_error():
    """A server plans models its clients name: a name longer than a file name may be is not a directory, and
    says so as any unknown model does (an OSError here was a 500 on the HTTP routes)."""
    from sana_cli.errors import SanaError
    from sana_cli.models.modelref import classify

    with pytest.raises(SanaError) as caught:
        classify("0" * 256)
    assert caught.value.exit_code in (2, 4)
