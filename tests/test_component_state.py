"""Per-call component state has one owner. The base, PAG, ControlNet and image-to-image pipelines of a loaded
model share one transformer, VAE, text encoder and scheduler; whatever one call leaves on them (attention
processors, scheduler timesteps and indices, a fused LoRA) must not reach a later call. Each test renders job B
after a different kind of job A in one session and compares B's pixels, exactly, with B rendered first in a
fresh session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sana_cli
from sana_cli.engine import tiny_build as tiny
from sana_cli.errors import GenerationError

PROMPT = "a lighthouse at dusk"
PLAIN = dict(seed=11, steps=3)
SPRINT = dict(seed=12, steps=2)


@pytest.fixture(scope="module")
def start_and_control(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(3)
    for name in ("control", "start"):
        Image.fromarray((rng.rand(128, 128, 3) * 255).astype("uint8")).save(root / f"{name}.png")
    tiny.ensure(tiny.CONTROLNET)
    return {"control": str(root / "control.png"), "start": str(root / "start.png")}


def render(session, path, **request) -> np.ndarray:
    result = session.generate(PROMPT, output=str(path), **request)
    assert result.images[0].ok, result.images[0].error
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


_FIRST: dict = {}


def first_in_a_fresh_session(model: str, tmp_path_factory, **request) -> np.ndarray:
    """B rendered as the first call of a newly loaded model (once per model and request)."""
    key = (model, tuple(sorted(request.items())))
    if key not in _FIRST:
        _FIRST[key] = render(sana_cli.load(model), tmp_path_factory.mktemp("first") / "b.png", **request)
    return _FIRST[key]


def test_plain_after_pag_equals_plain_first(tiny_models, tmp_path, tmp_path_factory):
    """A PAG call that returns puts the loaded attention processors back (diffusers does; prepare_call would)."""
    expected = first_in_a_fresh_session("tiny", tmp_path_factory, **PLAIN)
    session = sana_cli.load("tiny")
    render(session, tmp_path / "a.png", seed=3, steps=3, pag_scale=2.0)
    assert np.array_equal(render(session, tmp_path / "b.png", **PLAIN), expected)


class _FailOnce:
    """A transformer block whose next call raises, as an out-of-memory error in the middle of a denoise would."""

    def __init__(self, block):
        self.block, self.armed = block, True
        self.forward = block.forward

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.forward(*args, **kwargs)


def test_plain_and_pag_after_a_failed_pag_call_equal_each_first(tiny_models, tmp_path, tmp_path_factory):
    """A PAG call swaps perturbed-attention processors into the shared transformer and puts the old ones back
    only when it returns. One that raised mid-denoise left them there: the next plain call used them (and
    failed: they expect a PAG-sized batch), and the next PAG call took them for the originals, so they stayed
    for good. Here the failure is injected into the last transformer block during the PAG call."""
    expected_plain = first_in_a_fresh_session("tiny", tmp_path_factory, **PLAIN)
    pag = dict(seed=13, steps=3, pag_scale=2.0)
    expected_pag = first_in_a_fresh_session("tiny", tmp_path_factory, **pag)
    session = sana_cli.load("tiny")
    block = session.loaded.pipe.transformer.transformer_blocks[-1]
    failing = _FailOnce(block)
    block.forward = failing
    try:
        with pytest.raises(GenerationError, match="^out of memory"):
            session.generate(PROMPT, output=str(tmp_path / "a.png"), seed=3, steps=3, pag_scale=2.0)
    finally:
        block.forward = failing.forward
    assert not failing.armed
    assert not (tmp_path / "a.png").exists()
    assert np.array_equal(render(session, tmp_path / "b.png", **PLAIN), expected_plain)
    assert np.array_equal(render(session, tmp_path / "c.png", **pag), expected_pag)
    assert np.array_equal(render(session, tmp_path / "d.png", **PLAIN), expected_plain)


def test_plain_after_controlnet_equals_plain_first(tiny_models, start_and_control, tmp_path, tmp_path_factory):
    """Guard: ControlNet conditioning travels in the call's arguments; nothing of it stays on shared parts."""
    expected = first_in_a_fresh_session("tiny", tmp_path_factory, **PLAIN)
    session = sana_cli.load("tiny")
    render(session, tmp_path / "a.png", seed=3, steps=3, controlnet="tiny-controlnet",
           control_image=start_and_control["control"], control_scale=1.5)
    assert np.array_equal(render(session, tmp_path / "b.png", **PLAIN), expected)


def test_sprint_after_img2img_equals_sprint_first(tiny_models, start_and_control, tmp_path, tmp_path_factory):
    """Guard: image-to-image moves the shared scheduler's begin index to where its strength starts; a later
    text-to-image call starts from the first timestep all the same."""
    expected = first_in_a_fresh_session("tiny-sprint", tmp_path_factory, **SPRINT)
    session = sana_cli.load("tiny-sprint")
    render(session, tmp_path / "a.png", seed=3, steps=4, image=start_and_control["start"], strength=0.5)
    assert np.array_equal(render(session, tmp_path / "b.png", **SPRINT), expected)


def test_a_scheduler_left_mid_schedule_does_not_reach_the_next_call(tiny_models, tmp_path, tmp_path_factory):
    """Guard for the scheduler's own state: whatever an earlier call (or another pipeline sharing it) left in
    it, the next call starts from the loaded scheduler. Here the state a call interrupted at its first step
    would leave, and more (a begin index, a step index, a solver history), is planted before the call."""
    expected = first_in_a_fresh_session("tiny", tmp_path_factory, **PLAIN)
    session = sana_cli.load("tiny")
    render(session, tmp_path / "a.png", seed=3, steps=5)
    scheduler = session.loaded.pipe.scheduler
    scheduler._step_index, scheduler._begin_index = 3, 2
    scheduler.model_outputs = [torch.ones(1, 4, 4, 4)] * len(scheduler.model_outputs)
    scheduler.lower_order_nums = 1
    assert np.array_equal(render(session, tmp_path / "b.png", **PLAIN), expected)


def test_prepare_call_checks_placement_before_the_call(tiny_models, tmp_path):
    """The one owner also checks every component's dtype and device: a transformer cast behind the runner's
    back fails the image with the internal-error line instead of changing its pixels."""
    session = sana_cli.load("tiny")
    session.loaded.pipe.transformer.to(torch.float64)
    moved = "a model component moved or changed dtype: transformer is float64 on cpu"
    with pytest.raises(GenerationError, match=moved):
        session.generate(PROMPT, output=str(tmp_path / "b.png"), **PLAIN)
    assert not (tmp_path / "b.png").exists()


def test_prepare_call_checks_the_controlnets_placement_too(tiny_models, start_and_control, tmp_path):
    """A ControlNet pipeline adds a module of its own beside the shared ones: it is checked before each call
    like them (the transformer's dtype, the model's device)."""
    session = sana_cli.load("tiny")
    request = dict(seed=3, steps=2, controlnet="tiny-controlnet", control_image=start_and_control["control"])
    render(session, tmp_path / "a.png", **request)
    (controlnet_pipe,) = session.loaded._controlnets.values()
    controlnet_pipe.controlnet.to(torch.float64)
    moved = "a model component moved or changed dtype: controlnet is float64 on cpu, planned float32 on cpu"
    with pytest.raises(GenerationError, match=moved):
        session.generate(PROMPT, output=str(tmp_path / "b.png"), **request)
    assert not (tmp_path / "b.png").exists()
