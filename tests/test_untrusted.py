"""Files sana-cli did not write are attacker input: images from anywhere, tampered manifests, broken
Hugging Face caches, FIFOs, links to /dev/zero. Every test here builds its crafted files itself and runs
the installed `sana` in a subprocess, under real limits where a runaway read is the failure."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import stat
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_cli.storage.images import encode_image
from sana_cli.planning.reproduce import NOT_OPTIONS, OPTIONS

from .conftest import SANA, limited, one_line_error, run_sana, shell_env

GIB = 2**30


def png(width: int, height: int, text: dict[str, str] | None = None, *, valid_pixels: bool = True) -> bytes:
    """A PNG built chunk by chunk: any size for a few hundred kilobytes (rows of zeros compress ~1000:1)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    texts = b"".join(chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
                     for key, value in (text or {}).items())
    if valid_pixels:
        compressor, row = zlib.compressobj(6), b"\0" * (1 + 3 * width)
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        data = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + header + texts + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def crafted_image(path: Path, meta: dict | None) -> Path:
    """A small image carrying any `sana` metadata, written by sana-cli's own encoder."""
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    fmt = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[path.suffix]
    if meta is None:
        image.save(path, format=fmt)
    else:
        path.write_bytes(encode_image(image, fmt, meta))
    return path


def stand_in_gs(tmp_path: Path) -> tuple[dict, Path]:
    """A `gs` first on PATH that records every call: Pillow runs it to render PostScript/EPS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gs-called"
    script = bin_dir / "gs"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> '{record}'\necho 10.0\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, record


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


# ---- 1. only the formats sana-cli writes -------------------------------------------------------------

def test_postscript_under_an_image_name_never_reaches_ghostscript(tmp_path, tiny_dir):
    env, record = stand_in_gs(tmp_path)
    fake = tmp_path / "x.png"
    fake.write_bytes(POSTSCRIPT)
    process = run_sana("info", fake, env=env)
    assert process.returncode == 2
    assert "not a PNG, JPEG or WebP file" in one_line_error(process)
    assert run_sana("info", fake, "--command", env=env).returncode != 0

    # --report: a manifest record naming the PostScript file shows a failed card.
    out = tmp_path / "out"
    out.mkdir()
    (out / "evil.png").write_bytes(POSTSCRIPT)
    (out / "results.jsonl").write_text(json.dumps({"event": "image", "file": "evil.png", "index": 9, "row": 9,
                                                   "prompt": "p", "key": "tampered"}) + "\n")
    (tmp_path / "p.txt").write_text("a cat\n")
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", out, "--report", "-q", env=env)
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""
    page = (out / "index.html").read_text()
    assert "cannot read the image: evil.png is not a readable image" in page

    # Resume: a planned output that is PostScript is a conflict, never opened as an image.
    plan = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", tmp_path / "resume", "--dry-run", "--json",
                    check_json=True).json
    planned = Path(plan["images"][0]["path"])
    planned.parent.mkdir()
    planned.write_bytes(POSTSCRIPT)
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", tmp_path / "resume", env=env)
    assert process.returncode == 2 and "were not made by this batch" in one_line_error(process)
    assert not record.exists(), record.read_text()


def test_metadata_is_read_without_decoding_pixels(tmp_path):
    """A 12000x12000 PNG of a few hundred KB: its metadata costs no pixel memory and prints no warning."""
    meta = {"prompt": "big", "model": "tiny", "width": 12000, "height": 12000}
    big = tmp_path / "big.png"
    big.write_bytes(png(12000, 12000, {"sana": json.dumps(meta)}))
    assert big.stat().st_size < 1 << 20
    process = subprocess.run(limited([SANA, "info", str(big), "--json"], memory=512 * 2**20),  # decoding: 432 MB
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""
    shown = json.loads(process.stdout)
    assert (shown["width"], shown["height"], shown["sana"]["prompt"]) == (12000, 12000, "big")


def test_gallery_refuses_a_huge_image_quietly_and_cheaply(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "huge.png").write_bytes(png(12000, 12000))
    (out / "results.jsonl").write_text(json.dumps({"event": "image", "file": "huge.png", "index": 1, "row": 1,
                                                                "key": "tampered"}) + "\n")
    script = ("import sys; from sana_cli.storage.gallery import write_report; "
              "write_report(sys.argv[1], {'output_dir': sys.argv[1]})")
    process = subprocess.run(limited([os.path.join(os.path.dirname(SANA), "python"), "-c", script, str(out)],
                                     memory=768 * 2**20), capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""  # no DecompressionBombWarning
    assert "larger than any image sana-cli writes" in (out / "index.html").read_text()


# ---- 2. paths from a manifest are confined where they are written ------------------------------------

def _tree(root: Path, skip: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.stat().st_mtime_ns if p.is_file() and not p.is_symlink()
                                       else None)
            for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_tampered_manifest_writes_nothing_outside_the_output_directory(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(out / "ok.png")
    Image.new("RGB", (64, 64), "green").save(out / "sub" / "nested.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "outside.png")
    (out / "link.png").symlink_to(tmp_path / "outside.png")
    names = ["ok.png", "sub/nested.png", "../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png",
             "link.png", "sub/../ok.png", "thumbnails/../../x.png", ".hidden.png"]
    (out / "results.jsonl").write_text("".join(json.dumps({"event": "image", "file": name, "index": i, "row": i,
                                                                          "key": "tampered"})
                                               + "\n" for i, name in enumerate(names)))
    before = _tree(tmp_path, out)
    from sana_cli.storage.gallery import write_report

    write_report(out, {"output_dir": str(out)})
    assert _tree(tmp_path, out) == before  # nothing outside out/ was created or touched
    thumbs = sorted(p.name for p in (out / "thumbnails").iterdir())
    assert all("/" not in name and not name.startswith(".") for name in thumbs)
    assert "ok.png.jpg" in thumbs and len(thumbs) == 3  # ok.png, sub/nested.png (hashed), sub/../ok.png (hashed)
    page = (out / "index.html").read_text()
    assert page.count("manifest names a file outside the output directory") == 2 * 5  # list and card


def test_symlinked_thumbnails_directory_is_never_followed(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (64, 64), "red").save(out / "ok.png")
    (out / "results.jsonl").write_text(json.dumps({"event": "image", "file": "ok.png", "index": 1, "row": 1,
                                                                "key": "tampered"}) + "\n")
    stale = elsewhere / ".ok.png.jpg.sana-tmp-otherhost-1-deadbeef"  # looks like a temp file left by a kill
    stale.write_bytes(b"not ours")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    (out / "thumbnails").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "p.txt").write_text("a cat\n")
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", out, "--report")
    assert process.returncode == 0, process.stderr  # a report problem is a warning
    assert "could not write the report" in process.stderr and "is a symlink" in process.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == [stale.name] and stale.read_bytes() == b"not ours"


def test_report_keeps_a_users_own_index_html_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("<h1>my notes</h1>")
    (tmp_path / "p.txt").write_text("a cat\n")
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", out, "--report")
    assert process.returncode == 0
    assert "index.html exists and was not written by sana-cli (pass --overwrite" in process.stderr
    assert (out / "index.html").read_text() == "<h1>my notes</h1>"
    (out / "index.html").unlink()
    assert run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", out, "--report").returncode == 0
    first = (out / "index.html").read_text()
    assert 'content="sana-cli"' in first
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", out, "--report")  # ours: remade
    assert process.returncode == 0 and "could not write" not in process.stderr


# ---- 6. files that never end or never answer ----------------------------------------------------------

def test_step_summary_fifo_and_planned_output_fifo_never_hang(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    fifo = tmp_path / "summary"
    os.mkfifo(fifo)
    started = time.monotonic()
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", tmp_path / "out", "--report",
                       env={"GITHUB_STEP_SUMMARY": str(fifo)}, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "step summary appended" not in process.stderr
    plan = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", tmp_path / "fifo-out", "--dry-run",
                    "--json", check_json=True).json
    planned = Path(plan["images"][0]["path"])
    planned.parent.mkdir()
    os.mkfifo(planned)
    process = run_sana("batch", tmp_path / "p.txt", "--model", "tiny", "-o", tmp_path / "fifo-out", timeout=60)
    assert process.returncode == 2 and "were not made by this batch" in one_line_error(process)
    assert stat.S_ISFIFO(os.lstat(planned).st_mode)
    assert time.monotonic() - started < 110


def test_broken_hub_cache_refs_are_a_clear_error_for_generate(tmp_path):
    hf_home = tmp_path / "hf"
    refs = hf_home / "hub" / "models--someone--model" / "refs"
    refs.mkdir(parents=True)
    os.mkfifo(refs / "main")
    process = run_sana("generate", "a cat", "--model", "someone/model", "--size", 1024, "--dry-run",
                       env={"HF_HOME": str(hf_home)}, timeout=60)
    assert process.returncode == 4
    assert "HF cache entry of someone/model is unreadable" in one_line_error(process)
    (refs / "main").unlink()
    (refs / "main").symlink_to("/dev/zero")
    process = subprocess.run(limited([SANA, "generate", "a cat", "--model", "someone/model", "--size", "1024",
                                      "--dry-run"], memory=GIB),
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, HF_HOME=str(hf_home)))
    assert process.returncode == 4 and "is a character device" in one_line_error(process)


# ---- 3. nothing from a file reaches the terminal raw -------------------------------------------------

EVIL = "-\x1b]0;pwned\x07 \x1b[2J\x9b31m a\u202egnp.exe \u200bfox\u2066 \u0085\x7f 'quote' !$(touch pwned)\nline"
# What a terminal or a bidi renderer would act on, listed independently of sana-cli's own table.
_FORBIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def assert_terminal_safe(*streams: str) -> None:
    for text in streams:
        found = _FORBIDDEN.findall(text)
        assert not found, f"raw control characters {found!r} in:\n{text!r}"


def test_no_control_character_from_input_reaches_stdout_or_stderr(tmp_path):
    evil_meta = {"prompt": EVIL, "negative_prompt": EVIL, "model": "tiny", "model_id": "tiny:sana", "width": 128,
                 "height": 128, "steps": 2, "guidance": 4.5, "seed": 1, EVIL: EVIL}
    image = crafted_image(tmp_path / "evil.png", evil_meta)
    crafted_image(tmp_path / "evil.jpg", evil_meta)
    bad_model = crafted_image(tmp_path / "bad-model.png", {**evil_meta, "model": EVIL})
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": EVIL, "seed": 1}) + "\n"
                                         + json.dumps({"prompt": "x", "steps": EVIL}) + "\n")
    runs = [("info", image), ("info", tmp_path / "evil.jpg"), ("info", image, "--json"), ("info", image, "--command"),
            ("info", bad_model, "--command"), ("info", tmp_path / EVIL.replace("/", "")),
            ("generate", "--model", "tiny", "--seed", 1, "-o", f"{tmp_path}/g/", "--", EVIL),
            ("generate", "--model", "tiny", "--seed", 1, "--dry-run", "--", EVIL),
            ("generate", "a cat", "--model", EVIL), ("generate", "a cat", "--model", "tiny", "--pag-layers", EVIL),
            ("batch", tmp_path / "rows.jsonl", "--model", "tiny", "-o", tmp_path / "b", "--dry-run"),
            ("batch", tmp_path / "rows.jsonl", "--model", "tiny", "-o", tmp_path / "b", "--skip-invalid", "--report"),
            ("doctor", "--model", EVIL)]
    for args in runs:
        process = run_sana(*args, env={"SANA_PROGRESS_INTERVAL": "0"})
        assert "Traceback" not in process.stderr, args
        assert_terminal_safe(process.stdout, process.stderr)
    # The escapes are visible, so a person sees what is there.
    shown = run_sana("info", image).stdout
    assert "\\x1b]0;pwned\\x07" in shown and "\\u202e" in shown and "\\u200b" in shown


def test_a_real_terminal_gets_no_escape_sequence(tmp_path):
    """stdout and stderr on a pseudo-terminal, as a person runs it: every byte the terminal receives."""
    image = crafted_image(tmp_path / "evil.png", {"prompt": EVIL, "model": "tiny", "model_id": "tiny:sana",
                                                  "width": 128, "height": 128, "steps": 2, "guidance": 4.5,
                                                  "seed": 1})
    for args in (["info", str(image)], ["info", str(image), "--command"], ["info", str(image), "--json"],
                 ["generate", "a cat", "--model", EVIL]):
        master, slave = pty.openpty()
        process = subprocess.Popen([SANA, *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        received = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            received += chunk
        process.wait(timeout=30)
        os.close(master)
        text = received.decode("utf-8")
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text and "\x9b" not in text, args
        assert text.strip(), args


def test_json_is_strict_even_for_nan_in_metadata(tmp_path):
    meta = {"prompt": "p", "model": "tiny", "model_id": "tiny:sana", "width": 128, "height": 128, "steps": 2,
            "guidance": float("nan"), "seed": 1, "pag_scale": float("inf")}
    image = crafted_image(tmp_path / "nan.png", meta)
    process = run_sana("info", image, "--json")
    assert process.returncode == 0

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    shown = json.loads(process.stdout, parse_constant=refuse)
    assert shown["sana"]["guidance"] is None and shown["sana"]["pag_scale"] is None
    process = run_sana("info", image, "--command")
    assert process.returncode == 2 and "invalid 'guidance' (expected a finite number)" in one_line_error(process)


# ---- 4. `sana info --command` reproduces, over the whole parameter space ------------------------------

ROUND_TRIPS = [
    pytest.param(["--model", "tiny", "--seed", "1"], "a lighthouse", ".png", id="tiny-png"),
    pytest.param(["--model", "tiny", "--seed", "7", "--negative-prompt", "-blurry, 'low' quality"],
                 "🦊 狐狸 in the snow", ".jpg", id="negative-emoji-jpg"),
    pytest.param(["--model", "tiny", "--seed", "3", "--pag-scale", "2", "--pag-layers", "transformer_blocks.0"],
                 "- a list item from a .txt file", ".webp", id="pag-dash-prompt-webp"),
    pytest.param(["--model", "tiny", "--seed", "4", "--pag-scale", "1.5"], "--steps 99", ".png",
                 id="pag-default-layers"),
    pytest.param(["--model", "tiny", "--seed", "5", "-W", "256", "-H", "128", "--force-size"], "wide", ".png",
                 id="force-size"),
    pytest.param(["--model", "tiny", "--seed", "6", "--dtype", "bf16", "--guidance", "7.25", "--steps", "3"],
                 "bf16", ".png", id="dtype-bf16"),
    pytest.param(["--model", "tiny", "--seed", "8", "--dtype", "fp16", "--decode", "tiled"], "fp16 tiled", ".png",
                 id="dtype-fp16-tiled"),
    pytest.param(["--model", "tiny", "--seed", "9", "--quantize", "int8", "--steps", "2"], "int8", ".png",
                 id="quantize-int8"),
    pytest.param(["--model", "tiny-sprint", "--seed", str(2**63 - 1), "--steps", "1"], "sprint", ".webp",
                 id="sprint-max-seed"),
    pytest.param(["--model", "tiny-teacher", "--seed", "0", "--guidance", "0"], EVIL, ".png", id="teacher-evil-prompt"),
    pytest.param(["--model", "tiny", "--seed", "11", "--steps", "4", "--image", "{tmp}/start.png", "--strength", "0.5",
                  "--mask", "{tmp}/mask.png"], "inpaint", ".png", id="sana-img2img-mask"),
]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("options, prompt, suffix", ROUND_TRIPS)
def test_info_command_reproduces_the_same_pixels(options, prompt, suffix, tmp_path):
    if any("{tmp}" in option for option in options):  # input files: a start image and a mask
        Image.fromarray(np.random.RandomState(1).randint(0, 255, (128, 128, 3), np.uint8)).save(tmp_path / "start.png")
        Image.fromarray(np.tri(128, dtype=np.uint8) * 255).save(tmp_path / "mask.png")
        options = [option.format(tmp=tmp_path) for option in options]
    first = tmp_path / f"first{suffix}"
    made = run_sana("generate", *options, "-o", first, "--", prompt)
    assert made.returncode == 0, made.stderr
    meta = run_sana("info", first, "--json", check_json=True).json["sana"]
    mapped = {option.field for option in OPTIONS} | set(NOT_OPTIONS)
    assert set(meta) <= mapped, f"metadata fields the command does not map: {set(meta) - mapped}"
    shown = run_sana("info", first, "--command")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    command = shown.stdout.strip()
    assert "\n" not in command and " -- " in command
    assert_terminal_safe(command)
    env = shell_env()
    again = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180)
    assert again.returncode == 0, (command, again.stderr)
    second = tmp_path / f"first-again{suffix}"
    assert again.stdout.strip() == str(second)
    assert np.array_equal(_pixels(first), _pixels(second))
    # Everything but how it was asked is the same: the command names the resolved dtype, device and
    # decode (exact anywhere) where the first run may have said `auto`, and the key hashes what was asked.
    again_meta = run_sana("info", second, "--json", check_json=True).json["sana"]
    asked = ("key", "pixel_options")
    assert {k: v for k, v in again_meta.items() if k not in asked} == {k: v for k, v in meta.items() if k not in asked}
    assert again_meta["pixel_options"]["fp8"] == meta["pixel_options"]["fp8"]
    assert again_meta["pixel_options"].get("quantize") == meta["pixel_options"].get("quantize")
    assert not (tmp_path / "pwned").exists()


def _base_meta(**extra) -> dict:
    return {"prompt": "p", "model": "tiny", "model_id": "tiny:sana", "width": 128, "height": 128, "steps": 2,
            "guidance": 4.5, "seed": 1, **extra}


@pytest.mark.parametrize("meta, says", [
    (_base_meta(model=None), "names no model"),
    ({k: v for k, v in _base_meta().items() if k not in ("model", "model_id")}, "names no model"),
    (_base_meta(model="None", model_id="None"), "neither a preset, a hub id nor an absolute directory"),
    (_base_meta(model="org/x; touch pwned", model_id="org/x; touch pwned"), "neither a preset, a hub id"),
    (_base_meta(steps="4; touch pwned"), "invalid 'steps' (expected a whole number)"),
    (_base_meta(seed=True), "invalid 'seed'"),
    (_base_meta(dtype="float64"), "invalid 'dtype'"),
    (_base_meta(device="cuda; touch pwned"), "invalid 'device'"),
    (_base_meta(revision="../../etc", model="org/model", model_id="org/model"), "invalid 'revision'"),
    (_base_meta(prompt=""), "has no prompt"),
])
def test_command_from_tampered_metadata_is_refused(meta, says, tmp_path):
    process = run_sana("info", crafted_image(tmp_path / "t.png", meta), "--command")
    assert process.returncode == 2 and says in one_line_error(process)
    assert process.stdout == ""


def test_command_quotes_a_local_model_path_and_says_so(tmp_path, tiny_dir):
    model_dir = tmp_path / "my model; $(touch pwned)"
    shutil.copytree(tiny_dir, model_dir)
    first = tmp_path / "local.png"
    assert run_sana("generate", "a cat", "--model", model_dir, "--seed", 2, "-o", first).returncode == 0
    shown = run_sana("info", first, "--command")
    assert shown.returncode == 0
    assert f"--model '{model_dir}'" in shown.stdout
    assert "names the local model directory" in shown.stderr
    env = shell_env()
    again = subprocess.run(["bash", "-c", shown.stdout], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=180)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_pixels(first), _pixels(tmp_path / "local-again.png"))
    assert not (tmp_path / "pwned").exists()


def test_command_warns_about_fields_it_does_not_know(tmp_path):
    process = run_sana("info", crafted_image(tmp_path / "new.png", _base_meta(lora="x.safetensors")), "--command")
    assert process.returncode == 0
    assert "records lora, which this sana-cli does not know" in process.stderr


# ---- 5. `sana doctor`: generate's names, quoted fixes, broken caches diagnosed ---------------------------

@pytest.mark.parametrize("name", ["org/model", "org/x; touch pwned", "org/na me", "org/naｍe", "-rf/x", "org/.x",
                                  "org--x/y", "org/x\u202e", "a/b/c", "sana-4kk", "tiny"])
def test_doctor_accepts_exactly_the_model_names_generate_accepts(name, tmp_path):
    generate = run_sana("generate", "a cat", "--model", name, "--size", 128, "--force-size", "--dry-run",
                        cwd=tmp_path)
    doctor = run_sana("doctor", "--model", name, "--json", cwd=tmp_path)
    report = json.loads(doctor.stdout)
    check = next(c for c in report["checks"] if c["name"].startswith("model "))
    generate_refuses = generate.returncode != 0 and "HF cache" not in generate.stderr
    assert generate_refuses == (not check["ok"] and check["exit_code"] == generate.returncode), \
        (generate.stderr, check)
    for item in report["checks"]:
        assert "pwned" not in (item.get("fix") or "")
    assert not (tmp_path / "pwned").exists()


def test_doctor_quotes_every_fix_command(tmp_path):
    (tmp_path / "file").write_text("in the way")
    cache = tmp_path / "file" / "x; touch pwned #\n"
    process = run_sana("doctor", "--json", env={"SANA_CLI_CACHE": str(cache)}, cwd=tmp_path)
    fix = next(c for c in json.loads(process.stdout)["checks"] if c["name"] == "sana-cli cache")["fix"]
    assert fix.startswith(f"mkdir -p $'{tmp_path}/file/x; touch pwned #\\n' && chmod u+w $'")
    text = run_sana("doctor", env={"SANA_CLI_CACHE": str(cache)}, cwd=tmp_path)
    assert text.returncode == 4
    assert_terminal_safe(text.stdout, text.stderr)
    assert not (tmp_path / "pwned").exists()


def test_doctor_quotes_cuda_visible_devices_in_its_fix():
    """The CUDA build's branch, forced with a stand-in torch that has CUDA but sees no device."""
    from types import SimpleNamespace

    from sana_cli.engine import doctor

    torch = SimpleNamespace(version=SimpleNamespace(cuda="12.4"),
                            cuda=SimpleNamespace(is_available=lambda: False, device_count=lambda: 0))
    checks: list[dict] = []
    os.environ["CUDA_VISIBLE_DEVICES"] = "0; touch pwned"
    try:
        doctor._gpu(torch, True, checks)
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert checks[0]["fix"].endswith("and CUDA_VISIBLE_DEVICES='0; touch pwned'")


def _remove_deep(top: Path) -> None:
    chain = [top]
    while (chain[-1] / "d").is_dir():
        chain.append(chain[-1] / "d")
    (chain[-1] / "f").unlink()
    for directory in reversed(chain):
        directory.rmdir()


def _cache_entry(hf_home: Path, repo: str) -> Path:
    entry = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    return entry


REPO_4K = "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(entry: Path) -> Path:
    (entry / "refs" / "main").write_text(COMMIT)
    snapshot = entry / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.mark.parametrize("breakage", ["refs-not-utf8", "refs-fifo", "refs-dev-zero", "refs-loop", "index-dev-zero",
                                      "index-deep-json", "deep-directories", "unreadable-directory"])
def test_doctor_diagnoses_a_broken_cache_instead_of_crashing(breakage, tmp_path):
    hf_home = tmp_path / "hf"
    entry = _cache_entry(hf_home, REPO_4K)
    if breakage == "refs-not-utf8":
        (entry / "refs" / "main").write_bytes(b"\xff\xfe\x00garbage")
    elif breakage == "refs-fifo":
        os.mkfifo(entry / "refs" / "main")
    elif breakage == "refs-dev-zero":
        (entry / "refs" / "main").symlink_to("/dev/zero")
    elif breakage == "refs-loop":
        (entry / "refs" / "main").symlink_to(entry / "refs" / "other")
        (entry / "refs" / "other").symlink_to(entry / "refs" / "main")
    elif breakage == "index-dev-zero":
        (_snapshot(entry) / "model_index.json").symlink_to("/dev/zero")
    elif breakage == "index-deep-json":
        (_snapshot(entry) / "model_index.json").write_text("[" * 200_000 + "]" * 200_000)
    elif breakage == "deep-directories":
        deep = _snapshot(entry)
        for _ in range(1100):  # deeper than Python's recursion limit
            deep = deep / "d"
            deep.mkdir()
        (deep / "f").write_bytes(b"x")
    elif breakage == "unreadable-directory":
        if os.geteuid() == 0:
            (entry / "refs").rmdir()
            (entry / "refs").symlink_to(entry / "refs")  # root reads anything; a link to itself cannot be read
        else:
            (entry / "refs").chmod(0)
    process = subprocess.run(limited([SANA, "doctor", "--model", "sana-4k", "--offline", "--json"], memory=6 * GIB),
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HOME=str(hf_home)))
    (entry / "refs").chmod(0o755) if not (entry / "refs").is_symlink() else None
    if breakage == "deep-directories":  # pytest's recursive clean-up could not remove it
        _remove_deep(entry / "snapshots" / COMMIT / "d")
    assert process.returncode == 4, process.stderr
    assert "Traceback" not in process.stderr
    error = one_line_error(process)
    report = json.loads(process.stdout)
    assert report["exit_code"] == 4 and not report["ok"]
    if breakage.startswith("refs") or breakage == "unreadable-directory":
        assert report["models"]["sana-4k"]["status"] == "unreadable"
        assert "cannot be read" in error and "fix: rm -rf " in error
    else:
        assert report["models"]["sana-4k"]["status"] in ("partial", "missing")
        assert "offline mode is on" in error


# ---- decided: the step summary's headline and thumbnails' orientation -----------------------------------

def test_step_summary_headline_counts_the_failures_it_lists(tmp_path):
    from sana_cli.storage.gallery import step_summary

    out = tmp_path / "out"
    out.mkdir()
    records = [{"event": "error", "file": "a.png", "row": 3, "index": 1, "error": "out of memory"}]
    markdown = step_summary({"ok": True, "written": 2, "failed": 0, "output_dir": str(out)}, records)
    assert markdown.startswith("## ❌ sana batch: 2 written, 1 failed")
    assert "| failed | 1 |" in markdown and "| failed this run | 0 |" in markdown
    assert "### Failed images (1)" in markdown


def test_thumbnail_follows_exif_orientation_after_shrinking(tmp_path):
    from sana_cli.storage.gallery import render_thumbnail

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (600, 300), "red").save(tmp_path / "r.jpg", exif=exif.tobytes())
    data, size = render_thumbnail(tmp_path / "r.jpg")
    assert size == (128, 256)


def test_input_image_limits_sit_below_pillows_and_the_largest_allowed_image_is_accepted(tmp_path):
    """sana-cli's own bounds (8192 per side, so at most 8192x8192 pixels) are tighter than Pillow's
    decompression-bomb limits, so sana-cli refuses first with its own line; the bad-input table's
    9000x8000 row is an image between the two. At the limit itself an input image is accepted."""
    from PIL import Image as PILImage

    from sana_cli.inputs import images as inputs
    from sana_cli import safeio
    from sana_cli.errors import UsageError

    assert safeio.MAX_IMAGE_PIXELS == inputs.MAX_SIDE ** 2
    assert safeio.MAX_IMAGE_PIXELS < 9000 * 8000 < PILImage.MAX_IMAGE_PIXELS < 2 * PILImage.MAX_IMAGE_PIXELS

    def black(name: str, width: int, height: int) -> str:
        rows = zlib.compress(b"\0" * (3 * width + 1) * height, 1)
        path = tmp_path / name
        path.write_bytes(png(1, 1)[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                         + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
        return str(path)

    largest = black("largest.png", 8192, 8192)
    assert inputs.check_image(largest, "--image", (128, 128))[0] == largest  # decoded whole, then accepted
    with pytest.raises(UsageError, match="is 8193x8192, larger than any image sana-cli writes"):
        inputs.check_image(black("wider.png", 8193, 8192), "--image", (128, 128))
    with pytest.raises(ValueError, match="is 9000x8000, larger than any image sana-cli writes"):
        safeio.open_image(black("between.png", 9000, 8000))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def test_supplied_files_are_the_only_input_files_a_server_opens(tmp_path):
    """Inside supplying(), an input file is the copy of the bytes with its sha256 (or, by name, the one file
    that name was sent as); a name sent as two different files, or a path nobody sent, is a usage error,
    never a read of that path. Outside, the path is the path."""
    from sana_cli.errors import UsageError
    from sana_cli.inputs import supplied
    from sana_cli.inputs.images import check_image

    from PIL import Image

    client = tmp_path / "client.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(client)
    copy = tmp_path / "copy.png"
    Image.new("RGB", (8, 8), (200, 100, 0)).save(copy)
    assert supplied.local(str(client)) == str(client)
    with supplied.supplying({"d1": str(copy), "d2": str(tmp_path / "other")},
                            {"/home/u/in.png": {"d1"}, "/home/u/twice.png": {"d1", "d2"}}):
        assert supplied.local("/home/u/in.png") == str(copy)
        assert supplied.local("/home/u/twice.png", "d2") == str(tmp_path / "other")
        for path in ("/home/u/twice.png", str(client)):
            with pytest.raises(UsageError, match="was not sent with the request"):
                supplied.local(path)
        # planning on a server hashes the copy and keeps the client's name for the file
        assert check_image("/home/u/in.png", "--image") == ("/home/u/in.png", _sha256(copy))
        with pytest.raises(UsageError, match="a server never opens a client's path"):
            check_image(str(client), "--image")
    assert not supplied.active()


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
