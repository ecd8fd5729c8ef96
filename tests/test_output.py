"""The writer: atomic files, never overwriting by accident, metadata that round-trips in every format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_cli.storage import files, images, manifest as manifests, media
from sana_cli.errors import GenerationError, UsageError

META = {"sana_cli": "0.1.0", "prompt": "一只可爱的熊猫 🐼 eating \"bamboo\"\nsecond line", "negative_prompt": "blurry",
        "seed": 42, "steps": 20, "guidance": 4.5, "width": 64, "height": 32, "model": "tiny",
        "scheduler": "DPMSolverMultistepScheduler", "pag_scale": 0.0}


def noise_image(seed=0, size=(64, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp"])
def test_metadata_round_trips_in_every_format(tmp_path, name):
    written = media.write(media.Frames.still(noise_image()), tmp_path / name, META, overwrite=False)
    assert written.sha256 == files.sha256_file(tmp_path / name)
    meta = images.read_metadata(tmp_path / name)
    assert meta["sana"] == META
    assert meta["parameters"].startswith(META["prompt"])
    assert "Negative prompt: blurry" in meta["parameters"]
    assert ("Steps: 20, Sampler: DPMSolverMultistepScheduler, CFG scale: 4.5, Seed: 42, Size: 64x32"
            in meta["parameters"])
    assert (meta["width"], meta["height"]) == (64, 32)


def test_png_pixels_are_lossless_and_encoding_is_deterministic(tmp_path):
    image = noise_image(3)
    media.write(media.Frames.still(image), tmp_path / "a.png", META, overwrite=False)
    media.write(media.Frames.still(image), tmp_path / "b.png", META, overwrite=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(image))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_existing_file_is_never_replaced_without_overwrite(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists"):
        media.write(media.Frames.still(noise_image()), target, META, overwrite=False)
    assert target.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind
    media.write(media.Frames.still(noise_image()), target, META, overwrite=True)
    assert images.read_metadata(target)["sana"]["seed"] == 42


def test_stray_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = files.temp_path_for(tmp_path / "b.png")  # ours: this process is alive
    stray = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    for path in (stray, live):
        path.write_bytes(b"half")
    (tmp_path / "keep.png").write_bytes(b"x")
    assert files.is_temp_file(stray.name) and not files.is_temp_file("keep.png")
    assert files.remove_stray_temp_files(tmp_path) == [stray]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "keep.png"])


def record(index: int) -> dict:
    return {"event": "image", "index": index, "key": "k", "file": f"{index}.png"}


def test_a_torn_manifest_line_is_skipped_and_closed_never_rewritten(tmp_path):
    path = tmp_path / "results.jsonl"
    manifest = manifests.Manifest(path)
    manifest.append(record(1))
    manifest.append(record(2))
    manifest.close()
    with open(path, "ab") as handle:
        handle.write(b'{"event": "image", "ind')  # what kill -9 mid-write would leave
    torn = path.read_bytes()
    inode = path.stat().st_ino
    assert [r["index"] for r in manifests.read_manifests(tmp_path)] == [1, 2]
    assert path.read_bytes() == torn  # reading changes nothing
    again = manifests.Manifest(path)
    again.append(record(3))
    again.close()
    assert path.stat().st_ino == inode and path.read_bytes().startswith(torn)  # appended, never replaced
    assert path.read_bytes().endswith(b'"ind\n' + json.dumps(record(3), sort_keys=True).encode() + b"\n")
    assert [r["index"] for r in manifests.read_manifests(tmp_path)] == [1, 2, 3]


def test_a_full_disk_leaves_no_partial_file(tmp_path):
    """A real write failure: the file-size limit makes write() fail with EFBIG, as a full disk would."""
    code = (
        "import resource, signal, sys; from sana_cli.storage import media; from PIL import Image; import numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
        "img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))\n"
        "try:\n    media.write(media.Frames.still(img), sys.argv[1], {'prompt': 'x'}, overwrite=False)\n"
        "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("GenerationError cannot write")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="a file is in the way|cannot create"):
        files.ensure_directory(blocker / "sub")
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="not writable"):
            files.ensure_directory(locked)


def test_reading_a_non_image_is_a_usage_error(tmp_path):
    bogus = tmp_path / "x.png"
    bogus.write_text("not a png")
    with pytest.raises(UsageError, match="not a readable image"):
        images.read_metadata(bogus)
    with pytest.raises(UsageError, match="no such file"):
        images.read_metadata(tmp_path / "missing.png")


def test_write_failure_type(tmp_path):
    with pytest.raises(GenerationError):
        media.write(media.Frames.still(noise_image()), tmp_path / "missing-dir" / "a.png", META, overwrite=False)


# ---- the guarantees themselves: each test fails when its lock, fsync or rename is taken out ---------

HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "ab") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until told
"""


def test_a_manifest_append_waits_for_another_process_holding_the_lock(tmp_path):
    """Another process (a second `sana batch` on the same directory) holds the manifest's flock: an
    append must wait for it and land after it is released, never write beside it."""
    import threading

    path = tmp_path / "results.jsonl"
    manifest = manifests.Manifest(path)
    manifest.append(record(1))
    before = path.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        appending = threading.Thread(target=manifest.append, args=(record(2),))
        appending.start()
        appending.join(1.0)
        assert appending.is_alive(), "the append did not wait for the lock another process holds"
        assert path.read_bytes() == before, "the append wrote while another process held the lock"
    finally:
        holder.communicate("go\n", timeout=30)  # releases the lock
    appending.join(30)
    assert not appending.is_alive()
    manifest.close()
    assert [r["index"] for r in manifests.read_manifests(tmp_path)] == [1, 2]


class FsyncWatch:
    """Wraps os.fsync (the real call still runs) and notes what each call made durable: the file
    the descriptor names and its size at that moment."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        real = os.fsync

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            self.calls.append((target, os.fstat(fd).st_size))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd's file")
def test_each_manifest_append_is_fsynced_before_it_returns(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    manifest = manifests.Manifest(path)
    watch = FsyncWatch(monkeypatch)
    manifest.append(record(1))
    assert watch.calls == [(str(path), path.stat().st_size)]  # this file, with the whole line in it
    manifest.append(record(2))
    assert watch.calls[1:] == [(str(path), path.stat().st_size)]
    manifest.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd's file")
def test_an_image_is_fsynced_whole_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    watch = FsyncWatch(monkeypatch)
    target = tmp_path / "a.png"
    seen = []
    real_link, real_replace = os.link, os.replace
    monkeypatch.setattr(os, "link", lambda src, dst, **kw: (seen.append(("rename", len(watch.calls))),
                                                           real_link(src, dst, **kw))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: (seen.append(("rename", len(watch.calls))),
                                                              real_replace(src, dst, **kw))[1])
    media.write(media.Frames.still(noise_image()), target, META, overwrite=False)
    size = target.stat().st_size
    assert len(watch.calls) == 2, f"expected an fsync of the temp file, then of the directory: {watch.calls}"
    (temp, temp_size), (directory, _) = watch.calls
    assert files.is_temp_file(Path(temp).name) and Path(temp).parent == tmp_path and temp_size == size
    assert seen == [("rename", 1)]  # the data was durable before the name appeared
    assert directory == str(tmp_path)  # and the new name is made durable too
    media.write(media.Frames.still(noise_image(1)), target, META, overwrite=True)
    assert len(watch.calls) == 4 and seen[-1] == ("rename", 3) and watch.calls[3][0] == str(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd's file")
def test_a_thumbnail_is_fsynced_whole_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    from sana_cli.storage.gallery import ThumbnailDirectory

    thumbnails = ThumbnailDirectory(tmp_path)
    watch = FsyncWatch(monkeypatch)
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a, **kw: (renames.append(len(watch.calls)), real_replace(*a, **kw))[1])
    thumbnails.write("a.png", b"x" * 1000)
    thumbnails.close()
    assert len(watch.calls) == 2, f"expected an fsync of the temp file, then of the directory: {watch.calls}"
    (temp, size), (directory, _) = watch.calls
    assert files.is_temp_file(Path(temp).name) and size == 1000 and renames == [1]
    assert directory == str(thumbnails.path) and (thumbnails.path / "a.png").read_bytes() == b"x" * 1000


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_many_frames_are_refused_by_the_image_writers_and_nothing_is_written(tmp_path, name):
    """A still format holds one frame: a video's frames are refused in one line, never written as frame 0."""
    frames = media.Frames((noise_image(1), noise_image(2), noise_image(3)), kind="video", fps=16.0)
    with pytest.raises(UsageError) as caught:
        media.write(frames, tmp_path / name, META, overwrite=False)
    fmt = media.format_for(name)
    assert caught.value.line().startswith(f"cannot write 3 frames (a video) as a {fmt} image: it holds exactly one")
    assert "\n" not in caught.value.line()
    with pytest.raises(UsageError, match="cannot write 0 frames as a PNG image"):
        media.encode(media.Frames(()), "PNG", META)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_the_media_seam_writes_the_still_codecs_bytes_unchanged(tmp_path, name):
    """Images keep their exact bytes through the frames seam: what media.write puts on disk is byte for byte
    what the still-image codec makes of the one frame, and a one-frame video-kind result is written the same."""
    image = noise_image(4)
    fmt = media.format_for(name)
    written = media.write(media.Frames.still(image), tmp_path / name, META, overwrite=False)
    assert (tmp_path / name).read_bytes() == images.encode_image(image, fmt, META)
    assert written.sha256 == files.sha256_file(tmp_path / name)
    assert media.encode(media.Frames((image,), kind="video", fps=8.0), fmt, META) == images.encode_image(image, fmt,
                                                                                                         META)


def test_every_suffix_the_planner_accepts_has_an_encoder():
    """A format is a suffix row in the planner and an encoder here; one without the other fails this."""
    from sana_cli.planning.checks import VIDEO_SUFFIXES
    from sana_cli.planning.plan import IMAGE_SUFFIXES

    assert set(IMAGE_SUFFIXES.values()) | set(VIDEO_SUFFIXES.values()) == set(media.ENCODERS)
    with pytest.raises(UsageError, match="cannot write '.gif' images"):
        media.write(media.Frames.still(noise_image()), "a.gif", META, overwrite=False)
