"""`sana video`: the tiny SANA-Video model, planning (frames and sizes against the VAE's factors), the
pipeline calls against diffusers' own, and the MP4 / WebM files read back by PyAV."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def video_model(tiny_models):
    """The tiny SANA-Video model loaded through the loader `sana video` uses."""
    from sana_cli.engine.loading import load
    from sana_cli.models import modelref
    from sana_cli.planning.plan import LoadOptions

    return load(modelref.resolve("tiny-video"), LoadOptions(device="cpu"))


def test_tiny_video_model_loads_and_makes_frames(video_model, tiny_models):
    """The tiny model is a real SanaVideoPipeline (3-D transformer, Wan VAE, tiny Gemma) saved with
    save_pretrained; loaded by the loader, a plain pipeline call on it gives frames of the size asked."""
    import torch
    from diffusers import AutoencoderKLWan, SanaVideoPipeline, SanaVideoTransformer3DModel

    assert (tiny_models["video"] / "model_index.json").is_file()
    pipe = video_model.pipe
    assert isinstance(pipe, SanaVideoPipeline)
    assert isinstance(pipe.transformer, SanaVideoTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert video_model.ref.is_video
    frames = pipe(prompt="a cat running", height=64, width=96, frames=9, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(1), use_resolution_binning=False, output_type="np").frames
    assert frames.shape == (1, 9, 64, 96, 3)
    assert np.isfinite(frames).all() and frames.std() > 0.01
    assert not np.array_equal(frames[0, 0], frames[0, 8])  # frames differ over time


PROMPT = "a corgi running on the beach"


def _png_frames(directory, stem: str) -> np.ndarray:
    from PIL import Image

    paths = sorted(directory.glob(f"{stem}-*.png"))
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def _decoded(path) -> np.ndarray:
    """Every frame of a video file as PyAV (FFmpeg) decodes it, RGB."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _direct_pipeline(tiny_models, *, image=None, **call):
    """A plain diffusers pipeline on the tiny model's directory: the reference the CLI must equal."""
    from diffusers import SanaImageToVideoPipeline, SanaVideoPipeline

    pipe = SanaVideoPipeline.from_pretrained(str(tiny_models["video"]))
    if image is not None:
        pipe = SanaImageToVideoPipeline(**pipe.components)
        call["image"] = image
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(frame) for frame in pipe(**call, use_resolution_binning=False, output_type="pil").frames[0]]


@pytest.fixture(scope="module")
def rendered(tiny_models, tmp_path_factory):
    """One text-to-video run of the installed `sana` into an MP4 with its frames kept as PNGs."""
    from .conftest import run_sana

    root = tmp_path_factory.mktemp("video")
    process = run_sana("video", PROMPT, "--model", "tiny-video", "--frames", 9, "--seed", 1, "-W", 96, "-H", 64,
                       "--negative-prompt", "a cat", "--frames-dir", root / "frames", "-o", root / "clip.mp4",
                       timeout=600)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == str(root / "clip.mp4")
    return root


def test_video_frames_equal_a_direct_sana_video_pipeline_call(rendered, tiny_models):
    """Pixel-exact: the frames `sana video` decoded (kept losslessly as PNGs by --frames-dir) equal those of a
    plain SanaVideoPipeline call with the card's motion-score suffix, the same seed, size, steps and guidance."""
    import torch

    expected = _direct_pipeline(tiny_models, prompt=PROMPT + " motion score: 30.", negative_prompt="a cat",
                                height=64, width=96, frames=9, num_inference_steps=4, guidance_scale=6.0,
                                generator=torch.Generator("cpu").manual_seed(1))
    mine = _png_frames(rendered / "frames", "clip")
    assert mine.shape == (9, 64, 96, 3)
    assert np.array_equal(mine, np.stack(expected))


def test_the_mp4_reads_back_with_pyav_frames_size_fps_and_metadata(rendered):
    """Read by PyAV (FFmpeg), not by our reader: H.264 yuv420p, 9 frames of 96x64 at 16 fps, the sana metadata
    in the container's comment tag; the decoded frames equal the PNG frames within H.264's rounding (mean
    absolute difference under 4 levels of 255 on the tiny model's noise-like frames)."""
    import av

    path = rendered / "clip.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.width, stream.codec_context.height) == (96, 64)
        assert stream.average_rate == 16
        meta = json.loads(container.metadata["comment"])
        assert container.metadata["description"].startswith(PROMPT + "\nNegative prompt: a cat\n")
    assert (meta["prompt"], meta["frames"], meta["fps"], meta["motion_score"], meta["seed"]) == (PROMPT, 9, 16, 30, 1)
    assert (meta["width"], meta["height"], meta["pipeline"], meta["model"]) == (96, 64, "SanaVideoPipeline",
                                                                                "tiny-video")
    decoded = _decoded(path)
    assert decoded.shape == (9, 64, 96, 3)
    difference = np.abs(decoded.astype(int) - _png_frames(rendered / "frames", "clip").astype(int))
    assert difference.mean() < 4, difference.mean()
    # each PNG frame carries the video's metadata and its number
    from sana_cli.storage.images import read_metadata

    frame = read_metadata(rendered / "frames" / "clip-0003.png")["sana"]
    assert (frame["frame"], frame["key"]) == (3, meta["key"])


def test_info_command_reproduces_the_video(rendered):
    """`sana info clip.mp4` shows its parameters and `--command` prints the `sana video` command; run, it makes
    a video whose decoded frames equal the original's (the same frames through the same deterministic encoder)."""
    from .conftest import SANA, run_sana

    shown = run_sana("info", rendered / "clip.mp4")
    assert shown.returncode == 0 and shown.stdout.startswith(PROMPT + "\n"), shown.stderr
    command = run_sana("info", rendered / "clip.mp4", "--command")
    assert command.returncode == 0, command.stderr
    assert command.stdout.startswith("sana video --model tiny-video ")
    assert "--frames 9 --fps 16 --motion-score 30" in command.stdout
    again = shlex.split(command.stdout)
    assert again[0] == "sana"
    process = subprocess.run([SANA, *again[1:]], capture_output=True, text=True, timeout=600, cwd=rendered)
    assert process.returncode == 0, process.stderr
    assert np.array_equal(_decoded(rendered / "clip-again.mp4"), _decoded(rendered / "clip.mp4"))


@pytest.mark.parametrize("fmt,codec", [("MP4", "h264"), ("WEBM", "vp9")])
def test_video_encoding_is_deterministic_and_browser_playable(fmt, codec, tmp_path):
    """Equal frames and metadata give equal bytes (bitexact muxers, single-threaded encoders); both containers
    hold yuv420p video, the pixel format browsers play."""
    import av
    from PIL import Image

    from sana_cli.storage import media

    rng = np.random.default_rng(0)
    frames = media.Frames(tuple(Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)) for _ in range(5)),
                          kind="video", fps=8)
    meta = {"prompt": "a fox \u2603", "frames": 5}
    first = media.encode(frames, fmt, meta)
    assert media.encode(frames, fmt, meta) == first
    path = tmp_path / f"clip.{fmt.lower()}"
    written = media.write(frames, path, meta, overwrite=False)
    assert path.read_bytes() == first and written.bytes == len(first)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == (codec, "yuv420p")
        assert json.loads(container.metadata.get("comment") or container.metadata["COMMENT"]) == meta
    assert len(_decoded(path)) == 5


def test_image_to_video_frames_equal_a_direct_pipeline_call(tiny_models, tmp_path):
    """--image: SanaImageToVideoPipeline built from the loaded components, pixel-exact against a plain one
    fed the same first frame; the first frame's hash is in the key and the metadata."""
    import torch
    from PIL import Image

    from .conftest import run_sana

    rng = np.random.default_rng(3)
    first = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    first.save(tmp_path / "first.png")
    process = run_sana("video", PROMPT, "--model", "tiny-video", "--frames", 5, "--seed", 2, "--steps", 2,
                       "--image", tmp_path / "first.png", "--frames-dir", tmp_path / "frames", "-o",
                       tmp_path / "clip.webm", timeout=600)
    assert process.returncode == 0, process.stderr
    expected = _direct_pipeline(tiny_models, image=first, prompt=PROMPT + " motion score: 30.", negative_prompt="",
                                height=64, width=64, frames=5, num_inference_steps=2, guidance_scale=6.0,
                                generator=torch.Generator("cpu").manual_seed(2))
    assert np.array_equal(_png_frames(tmp_path / "frames", "clip"), np.stack(expected))
    from sana_cli.storage.video import read_video_metadata

    meta = read_video_metadata(tmp_path / "clip.webm")
    assert (meta["width"], meta["height"], meta["codec"], meta["fps"]) == (64, 64, "vp9", 16.0)
    assert meta["sana"]["pipeline"] == "SanaImageToVideoPipeline"
    assert meta["sana"]["image_sha256"] == hashlib.sha256((tmp_path / "first.png").read_bytes()).hexdigest()


def test_video_dry_run_plans_without_torch(tmp_path):
    """--dry-run checks and prints the plan (the card's defaults for the real model) without importing torch."""
    code = ("import sys; from sana_cli.cli import main\n"
            "try:\n    main(['video', 'a corgi', '--model', 'sana-video-2b-480p', '--seed', '5', '--dry-run', '--json',"
            " '-o', %r])\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n" % str(tmp_path / "c.mp4"))
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    plan = json.loads(process.stdout)
    job = plan["images"][0]
    assert (job["width"], job["height"], job["frames"], job["fps"], job["steps"], job["guidance"],
            job["motion_score"]) == (832, 480, 81, 16, 50, 6.0, 30)
    assert plan["model"]["pipeline"] == "SanaVideoPipeline" and list(tmp_path.iterdir()) == []


def test_video_models_run_the_cards_dtypes():
    """--dtype auto: bf16 transformer and Gemma, fp32 Wan VAE on a GPU (the card's load); the VAE stays fp32
    under an explicit --dtype too, so `sana info --command`'s --dtype reproduces the same run."""
    from sana_cli.models.presets import component_dtypes

    assert component_dtypes("bfloat16", "auto", "cuda", video=True) == {
        "transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "float32"}
    assert component_dtypes("bfloat16", "bf16", "cuda", video=True)["vae"] == "float32"
    assert component_dtypes("bfloat16", "auto", "cuda") == dict.fromkeys(("transformer", "text_encoder", "vae"),
                                                                          "bfloat16")


def test_a_video_batch_resumes_after_kill_9(tiny_models, tmp_path):
    """Batch rows as videos of a SANA-Video model: killed with SIGKILL once the first video is written, the rerun
    keeps that file as it is (same bytes), makes the others, leaves no temp file and records each key once; its
    --report gallery shows each video's first frame."""
    import os
    import signal
    import time

    from .conftest import SANA

    rows = [{"prompt": "a dog running", "frames": 5, "steps": 2, "seed": 3},
            {"prompt": "a cat sitting", "frames": 9, "steps": 2, "name": "cat", "motion_score": 60},
            {"prompt": "a red fox", "frames": 5, "steps": 2, "fps": 8}]
    source = tmp_path / "videos.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    command = [SANA, "batch", str(source), "--model", "tiny-video", "-o", str(out), "--ext", "webm"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob("*.webm")) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    first = sorted(out.glob("*.webm"))
    assert first, "the first video was never written"
    kept = {path.name: path.read_bytes() for path in first}
    again = subprocess.run(command + ["--json", "--report"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["written"] + summary["already_done"] == 3 and summary["already_done"] >= len(kept)
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(["00001-a-dog-running-3.webm", "cat.webm", next(n for n in names if "red-fox" in n),
                            "results.jsonl", "index.html", "thumbnails"]), names
    # the gallery: a card per video, its thumbnail the first frame, linking to the file
    from PIL import Image

    gallery = (out / "index.html").read_text()
    for name in (n for n in names if n.endswith(".webm")):
        assert f'href="{name}"' in gallery
        with Image.open(out / "thumbnails" / f"{name}.jpg") as thumbnail:
            shown = np.asarray(thumbnail.convert("RGB")).astype(int)
        assert shown.shape == (64, 64, 3) and np.abs(shown - _decoded(out / name)[0]).mean() < 6
    for name, data in kept.items():
        assert (out / name).read_bytes() == data
    from sana_cli.storage.video import read_video_metadata

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    images = [record for record in records if record.get("event") == "image"]
    assert len({record["key"] for record in images}) == len(images) == 3
    for record in images:
        meta = read_video_metadata(out / record["file"])
        assert meta["sana"]["key"] == record["key"] and len(_decoded(out / record["file"])) == record["frames"]
    cat = read_video_metadata(out / "cat.webm")
    assert (cat["sana"]["frames"], cat["sana"]["motion_score"]) == (9, 60)
    assert read_video_metadata(next(out.glob("*red-fox*")))["fps"] == 8.0


def test_sana_decode_finishes_a_videos_kept_latents_into_the_same_file(tiny_models, tmp_path):
    """--keep-latents keeps a video's denoised latents (1, C, F, h, w) as for an image (and a failed decode keeps
    them the same way); `sana decode` loads only the VAE and writes the very same MP4, byte for byte. Latents
    whose frame count or fps the metadata contradicts are refused with one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .conftest import run_sana

    made = run_sana("video", PROMPT, "--model", "tiny-video", "--frames", 5, "--steps", 2, "--seed", 4,
                    "--keep-latents", "-o", tmp_path / "k.mp4", timeout=600)
    assert made.returncode == 0, made.stderr
    original = (tmp_path / "k.mp4").read_bytes()
    (tmp_path / "k.mp4").unlink()
    kept = tmp_path / "k.latents.safetensors"
    with safe_open(str(kept), framework="pt") as handle:
        info, latents = handle.metadata(), handle.get_tensor("latents")
    assert tuple(latents.shape) == (1, 16, 2, 8, 8)
    finished = run_sana("decode", kept, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert (tmp_path / "k.mp4").read_bytes() == original
    meta = json.loads(info["sana"])
    for name, changed in (("frames", {**meta, "frames": 9}), ("fps", {**meta, "fps": "fast"})):
        bad = tmp_path / f"bad-{name}.latents.safetensors"
        save_file({"latents": latents}, str(bad),
                  metadata={**info, "sana": json.dumps(changed), "image": f"bad-{name}.mp4"})
        refused = run_sana("decode", bad, timeout=600)
        assert refused.returncode == 2, refused.stderr
        from .conftest import one_line_error

        assert ("frames per second" if name == "fps" else "do not decode into the 9 frames") in \
            one_line_error(refused)
        assert not (tmp_path / f"bad-{name}.mp4").exists()


def test_tiled_video_decode_is_for_that_call_only(video_model):
    """--decode tiled turns the Wan VAE's tiling on for one decode and off again (the VAE is shared by every later
    call); the other strategies decode whole, exactly as the pipeline does."""
    import torch

    from sana_cli.engine.runner import decode_video

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 8, 8, generator=generator)
    vae = video_model.pipe.vae
    assert not vae.use_tiling
    tiled, account = decode_video(video_model, latents, "tiled", fps=8)
    assert account.strategy == "tiled" and not vae.use_tiling
    whole, account = decode_video(video_model, latents, "auto", fps=8)
    assert account.strategy == "full" and (tiled.kind, tiled.fps, len(tiled)) == ("video", 8, 5)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # the pipeline's arithmetic
    frames = video_model.pipe.video_processor.postprocess_video(expected, output_type="pil")[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole.frames, frames))


def test_the_python_api_makes_a_video(tiny_models, tmp_path):
    """sana_cli.video: the same plan and run as the command, in this process."""
    import sana_cli
    from sana_cli.errors import UsageError
    from sana_cli.storage.video import read_video_metadata

    result = sana_cli.video(PROMPT, model="tiny-video", frames=5, steps=1, seed=7, fps=12, device="cpu",
                            output=str(tmp_path / "a.webm"))
    assert [image.written.path for image in result.images] == [str(tmp_path / "a.webm")]
    meta = read_video_metadata(tmp_path / "a.webm")
    assert (meta["codec"], meta["fps"], meta["sana"]["frames"], meta["sana"]["seed"]) == ("vp9", 12.0, 5, 7)
    assert len(_decoded(tmp_path / "a.webm")) == 5
    with pytest.raises(UsageError, match="tiny is an image model"):
        sana_cli.video(PROMPT, model="tiny", output=str(tmp_path / "b.mp4"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.webm"]


def test_a_video_batch_adopts_its_videos_when_the_manifest_is_lost(tiny_models, tmp_path):
    """Without results.jsonl a rerun recognises a video it made by the key in the file's own container tags (as
    it does an image's), instead of taking it for a stranger's file in the way."""
    import sana_cli

    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"prompt": "a dog running", "frames": 5, "steps": 1, "name": "dog"}) + "\n")
    first = sana_cli.batch(str(source), model="tiny-video", output_dir=str(tmp_path / "out"), device="cpu")
    assert [path.name for path in (tmp_path / "out").glob("*.mp4")] == ["dog.mp4"] and len(first.written) == 1
    original = (tmp_path / "out" / "dog.mp4").read_bytes()
    (tmp_path / "out" / "results.jsonl").unlink()
    again = sana_cli.batch(str(source), model="tiny-video", output_dir=str(tmp_path / "out"), device="cpu")
    assert (len(again.written), again.already_done) == (0, 1)
    assert (tmp_path / "out" / "dog.mp4").read_bytes() == original
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert any(record.get("adopted") and record.get("file") == "dog.mp4" for record in records)
