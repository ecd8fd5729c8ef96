"""The HTML gallery and the CI step summary, on a real tiny-model batch plus hand-made records, and the
gallery rendered in a real headless Chromium (skipped only when no Chromium binary exists)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from sana_cli.storage.manifest import read_manifests
from sana_cli.storage.gallery import (append_step_summary, latest_entries, step_summary, thumbnail_path, write_gallery,
                                      write_report)

SCRIPT_PROMPT = "<script>alert(1)</script> a cat & \"dog\""
PROMPTS = ["a red fox in the snow", SCRIPT_PROMPT, "a cute panda eating bamboo"]
FAILED_FILE = "00009-a-panda-9.png"
FAILED_ERROR = "CUDA out of memory <b>at batch size 1</b> | tried strips"


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """A real three-image batch on the tiny model: (output dir, its BatchResult.to_dict())."""
    from sana_cli.api import batch

    root = tmp_path_factory.mktemp("report-batch")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    result = batch(str(prompts), model="tiny", output_dir=str(root / "out"))
    assert result.to_dict()["written"] == 3
    return root / "out", result.to_dict()


@pytest.fixture
def gallery_dir(real_batch, tmp_path):
    """A fresh copy of the batch output, so each test may write, delete and touch files."""
    source, summary = real_batch
    out = tmp_path / "out"
    shutil.copytree(source, out)
    return out, {**summary, "output_dir": str(out), "manifest": str(out / "results.jsonl")}


def with_failure(out: Path) -> list[dict]:
    """The batch's manifest plus one error record for an image that was never written."""
    records = read_manifests(out)
    error = {k: v for k, v in records[0].items() if k not in ("sha256", "bytes", "decode", "seconds")}
    error.update(event="error", index=9, row=9, file=FAILED_FILE, prompt="a panda", seed=9, error=FAILED_ERROR)
    return records + [error]


class Page(HTMLParser):
    """The parts of the gallery the tests look at: figures, their <img>s and every link."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: list[dict] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self._figure: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = {**attrs, "classes": (attrs.get("class") or "").split(), "images": [], "text": ""}
            self.figures.append(self._figure)
        elif tag == "img":
            self.images.append(attrs)
            self.links.append(attrs["src"])
            if self._figure is not None:
                self._figure["images"].append(attrs)
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "script":
            raise AssertionError(f"a <script> element in the page: {attrs}")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._figure is not None:
            self._figure["text"] += data


def test_gallery_thumbnails_links_and_escaping(gallery_dir):
    out, summary = gallery_dir
    index = write_gallery(out, with_failure(out), summary, title="nightly <eval>")
    assert index == out / "index.html"
    text = index.read_text(encoding="utf-8")
    page = Page(text)

    images = [r for r in read_manifests(out) if r["event"] == "image"]
    assert len(images) == 3 and len(page.figures) == 4 and len(page.images) == 3
    for record in images:
        thumb = thumbnail_path(out, record["file"])
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
            assert image.size == (record["width"], record["height"])  # 128px: not upscaled
    anchors = [link for link in page.links if link.startswith("#")]
    files = [link for link in page.links if not link.startswith("#")]
    for link in files:  # relative, and each one resolves to a file in the output directory
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (out / unquote(parts.path)).resolve()
        assert target.is_file() and target.is_relative_to(out.resolve()), link
    assert sorted(unquote(link) for link in files if not link.startswith("thumbnails/")) == \
        sorted([r["file"] for r in images] * 2)  # the thumbnail and the file name both link the image
    for img in page.images:
        assert img["onload"] == "this.dataset.loaded='1'"
        assert img["onerror"] == "this.dataset.loaded='0';this.closest('figure').classList.add('broken')"
        assert "loading" not in img  # lazy images would not load in a headless --dump-dom

    # Prompts are text: the raw tag never appears, the escaped one does, and the alt text round-trips.
    assert "<script>alert(1)</script>" not in text and "<eval>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a cat &amp; &quot;dog&quot;" in text
    assert SCRIPT_PROMPT in [img["alt"] for img in page.images]
    assert "http://" not in text and "https://" not in text and "<link" not in text

    failed = [f for f in page.figures if "failed" in f["classes"]]
    assert len(failed) == 1 and not failed[0]["images"]
    assert FAILED_FILE in failed[0]["text"] and FAILED_ERROR in failed[0]["text"]
    assert "CUDA out of memory &lt;b&gt;at batch size 1&lt;/b&gt;" in text
    assert anchors == [f'#{failed[0]["id"]}']  # listed at the top, linked to its card


def test_header_counts_come_from_the_summary(gallery_dir):
    out, summary = gallery_dir
    summary = {**summary, "written": 7, "already_done": 5, "failed": 2, "images_per_second": 1.5,
               "invalid_rows": [{"line": 4, "error": "bad"}, {"line": 8, "error": "worse"}]}
    text = write_gallery(out, with_failure(out), summary).read_text(encoding="utf-8")
    facts = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", text.split("</header>")[0]))
    assert facts["written"] == "7" and facts["already done"] == "5" and facts["failed"] == "2"
    assert facts["invalid rows"] == "2" and facts["images/s"] == "1.5" and facts["in gallery"] == "3 of 4"
    assert facts["model"].startswith("tiny (tiny:sana")
    # A summary with nothing in it still makes a page.
    page = Page(write_gallery(out, read_manifests(out), {}).read_text(encoding="utf-8"))
    assert len(page.images) == 3


def test_large_image_thumbnail_and_staleness(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (600, 300), "red").save(out / "wide.png")
    Image.new("RGBA", (100, 700), (0, 0, 255, 128)).save(out / "tall.webp")
    records = [{"event": "image", "index": 0, "row": 1, "file": "wide.png", "prompt": "wide"},
               {"event": "image", "index": 1, "row": 2, "file": "tall.webp", "prompt": "tall"}]
    write_gallery(out, records, {})
    wide, tall = thumbnail_path(out, "wide.png"), thumbnail_path(out, "tall.webp")
    assert Image.open(wide).size == (256, 128) and Image.open(tall).size == (37, 256)
    assert Image.open(wide).getpixel((128, 64))[0] > 240  # still red

    before = wide.stat().st_mtime_ns
    write_gallery(out, records, {})
    assert wide.stat().st_mtime_ns == before  # up to date: not rewritten

    Image.new("RGB", (600, 300), "blue").save(out / "wide.png")
    future = wide.stat().st_mtime + 10
    os.utime(out / "wide.png", (future, future))
    write_gallery(out, records, {})
    assert wide.stat().st_mtime_ns != before and Image.open(wide).getpixel((128, 64))[2] > 240  # remade
    assert not [p for p in (out / "thumbnails").iterdir() if p.name.startswith(".")]  # no temp files left


def test_last_record_per_file_wins(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("retried.png", "later-failed.png"):
        Image.new("RGB", (64, 64), "green").save(out / name)

    def record(event, file, **extra):
        return {"event": event, "index": len(file), "row": 1, "file": file, "prompt": file, **extra}

    records = [record("error", "retried.png", error="oom"), record("image", "retried.png"),
               record("image", "later-failed.png"), record("error", "later-failed.png", error="disk full"),
               record("image", "deleted.png"), record("error", "never.png", error="nan"),
               record("image", "../outside.png"), {"event": "image"}, {"note": "not a record"}]
    entries = {e.file: e for e in latest_entries(out, records)}
    assert set(entries) == {"retried.png", "later-failed.png", "deleted.png", "never.png", "../outside.png"}
    assert entries["retried.png"].ok and entries["retried.png"].later_error is None
    assert entries["later-failed.png"].ok and entries["later-failed.png"].later_error == "disk full"
    assert not entries["deleted.png"].ok and "missing" in entries["deleted.png"].error
    assert not entries["never.png"].ok and entries["never.png"].error == "nan"
    assert not entries["../outside.png"].ok and "outside" in entries["../outside.png"].error

    (tmp_path / "outside.png").write_bytes(b"not read")
    page = Page(write_gallery(out, records, {}).read_text(encoding="utf-8"))
    assert len(page.images) == 2
    assert len([f for f in page.figures if "failed" in f["classes"]]) == 3
    assert not (tmp_path / "thumbnails").exists() and not (out / "outside.png.jpg").exists()
    assert "A later attempt failed: disk full" in "".join(f["text"] for f in page.figures)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render(browser: str, page: Path, profile: Path) -> Page:
    """Load the page in headless Chromium and parse the DOM after its scripts ran."""
    process = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and "<figure" in process.stdout, process.stderr[-2000:]
    return Page(process.stdout)


def test_gallery_renders_in_headless_chromium(gallery_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome binary on PATH (apt-get install chromium)")
    out, summary = gallery_dir
    index = write_gallery(out, with_failure(out), summary)

    dom = render(browser, index, tmp_path / "profile")
    assert len(dom.images) == 3
    assert [img.get("data-loaded") for img in dom.images] == ["1", "1", "1"], dom.images
    assert not [f for f in dom.figures if "broken" in f["classes"]]

    # A thumbnail that went missing after the page was written shows as broken.
    gone = dom.images[1]["src"]
    (out / unquote(gone)).unlink()
    dom = render(browser, index, tmp_path / "profile")
    loaded = {img["src"]: img.get("data-loaded") for img in dom.images}
    assert loaded.pop(gone) == "0" and set(loaded.values()) == {"1"}
    broken = [f for f in dom.figures if "broken" in f["classes"]]
    assert len(broken) == 1 and broken[0]["images"][0]["src"] == gone


def test_step_summary_markdown_and_append(gallery_dir, tmp_path, monkeypatch):
    out, summary = gallery_dir
    summary = {**summary, "ok": False, "failed": 1, "invalid_rows": [{"line": 4, "error": "unknown field 'sed'"}]}
    markdown = step_summary(summary, with_failure(out))
    rows = dict(re.findall(r"^\| ([a-z/ ]+) \| ([\d.]+) \|$", markdown, re.M))
    assert rows["planned"] == "3" and rows["written"] == "3" and rows["failed"] == "1"
    assert rows["already done"] == "0" and rows["invalid rows"] == "1" and float(rows["images/s"]) > 0
    failure_rows = [line for line in markdown.splitlines() if FAILED_FILE in line]
    assert len(failure_rows) == 1 and failure_rows[0].startswith("| 9 |")
    assert "&lt;b&gt;at batch size 1&lt;/b&gt; &#124; tried strips" in failure_rows[0]  # one table cell
    assert "| 4 | unknown field 'sed' |" in markdown
    assert str(out / "results.jsonl") in markdown and str(out / "index.html") in markdown
    assert markdown.startswith("## ❌")

    target = tmp_path / "summary.md"
    target.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert append_step_summary(markdown) is True
    assert append_step_summary("second") is True
    assert target.read_text(encoding="utf-8") == "# earlier step\n" + markdown + "second\n"

    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert append_step_summary(markdown) is False
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no-such-dir" / "summary.md"))
    assert append_step_summary(markdown) is False


def test_step_summary_of_a_clean_run_without_records():
    markdown = step_summary({"ok": True, "written": 2, "failed": 0, "output_dir": "g", "manifest": "g/results.jsonl"},
                            [])
    assert markdown.startswith("## ✅ sana batch: 2 written, 0 failed")
    assert "Failed images" not in markdown and "g/index.html" in markdown


def test_write_report_does_both(gallery_dir, tmp_path, monkeypatch):
    out, summary = gallery_dir
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    done = write_report(out, summary)
    assert done == {"gallery": str(out / "index.html"), "step_summary": True}
    assert "| written | 3 |" in target.read_text(encoding="utf-8")
    assert len(list((out / "thumbnails").glob("*.jpg"))) == 3
    json.dumps(done)


def test_report_module_does_not_import_torch():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, sana_cli.storage.gallery; assert 'torch' not in sys.modules, 'torch imported'"
    process = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(root)),
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, process.stderr
