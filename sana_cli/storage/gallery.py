"""What a batch made, for people: a self-contained HTML gallery and a CI step summary. PIL and the
standard library only, no torch, so a report can be rebuilt from a manifest on any machine.

    from sana_cli.manifest import read_manifests
    from sana_cli.report import write_gallery
    write_gallery("gallery/", read_manifests("gallery/"), result.to_dict())

Everything taken from a manifest is data, not markup: prompts and errors are HTML-escaped, and a
manifest `file` that would point outside the output directory is shown as an error, never read.
Images are opened only as PNG, JPEG or WebP (safeio). Thumbnails are written only into the real
`thumbnails/` directory under flat names, through a descriptor of that directory, so neither a
tampered manifest nor a symlink can make the report write or delete anything elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

from ..safeio import UnsafeFile, image_file, image_problem, is_regular_or_absent, open_regular
from .files import _abandoned, atomic_write_bytes, is_temp_file, temp_path_for
from .manifest import read_manifests

GALLERY = "index.html"
THUMBNAILS = "thumbnails"
THUMBNAIL_MAX_SIDE = 256
_THUMBNAIL_QUALITY = 85
# GitHub rejects a step summary over 1 MiB; list at most this many failures in it.
_MAX_SUMMARY_FAILURES = 50

# The only scripts the page runs. The Content-Security-Policy allows exactly these (by hash), so a
# prompt that somehow escaped escaping still could not run.
_ONLOAD = "this.dataset.loaded='1'"
_ONERROR = "this.dataset.loaded='0';this.closest('figure').classList.add('broken')"


def _csp_hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'unsafe-hashes' {_csp_hash(_ONLOAD)} {_csp_hash(_ONERROR)}")


@dataclass
class Entry:
    """One output file as the gallery shows it: its latest record and what is on disk."""

    file: str
    record: dict
    path: Path | None  # absolute path of the image, None when `file` leaves the output directory
    ok: bool  # an image that exists and could be thumbnailed
    error: str | None = None
    thumbnail: str | None = None  # relative to the output directory
    thumbnail_size: tuple[int, int] | None = None
    later_error: str | None = None  # a newer attempt failed, the older image is still there


# ---- choosing what to show -------------------------------------------------------------------------

def latest_entries(output_dir: str | Path, records: list[dict]) -> list[Entry]:
    """One Entry per manifest `file`, in plan order. The last record of a file counts, except that an
    image record whose file exists wins over a later error (a failed retry leaves the old image)."""
    output_dir = Path(output_dir)
    last_any: dict[str, dict] = {}
    last_image: dict[str, dict] = {}
    for record in records:
        name = record.get("file")
        if not isinstance(name, str) or not name or record.get("event") not in ("image", "error"):
            continue
        last_any[name] = record
        if record.get("event") == "image":
            last_image[name] = record
    entries = []
    for name, last in last_any.items():
        path = _inside(output_dir, name)
        image = last_image.get(name)
        if path is None:
            entries.append(Entry(name, last, None, False, error="manifest names a file outside the output directory"))
        elif image is not None and path.is_file():
            later = last.get("error") if last is not image and last.get("event") == "error" else None
            entries.append(Entry(name, image, path, True, later_error=later))
        elif last.get("event") == "error":
            entries.append(Entry(name, last, path, False, error=str(last.get("error") or "generation failed")))
        else:
            entries.append(Entry(name, last, path, False, error="the image file is missing from the output directory"))
    entries.sort(key=lambda e: (_number(e.record.get("index")), e.file))
    return entries


def _inside(output_dir: Path, name: str) -> Path | None:
    if os.path.isabs(name) or "\\" in name:
        return None
    path = (output_dir / name).resolve()
    try:
        path.relative_to(output_dir.resolve())
    except ValueError:
        return None
    return path


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("inf")


# ---- thumbnails ------------------------------------------------------------------------------------

def thumbnail_name(file: str) -> str:
    """The thumbnail's file name inside thumbnails/: `<file>.jpg` for a plain file name (what batch
    writes), else a hash of the name, so it never holds a path separator or starts with a dot."""
    if file and "/" not in file and "\\" not in file and not file.startswith(".") and len(file.encode()) <= 200:
        return file + ".jpg"
    return "t-" + hashlib.sha256(file.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ".jpg"


def thumbnail_path(output_dir: str | Path, file: str) -> Path:
    """Where the thumbnail of `file` (relative to output_dir) goes: thumbnails/<flat name>.jpg."""
    return Path(output_dir) / THUMBNAILS / thumbnail_name(file)


def render_thumbnail(image_path: str | Path, max_side: int = THUMBNAIL_MAX_SIDE) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of a thumbnail (longest side <= max_side) and its size. Only PNG, JPEG or WebP files
    of at most the largest size sana-cli writes are decoded; JPEG at a reduced scale. A video's (MP4, WebM)
    thumbnail is its first frame."""
    with _still_of(image_path) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, much faster for 4K
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # in place: no full-size copy
        image = ImageOps.exif_transpose(image)  # on the small image (the box is square, so order is free)
        if image.mode not in ("RGB", "L"):
            background = Image.new("RGB", image.size, "white")
            rgba = image.convert("RGBA")
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=_THUMBNAIL_QUALITY, optimize=True)
        return buffer.getvalue(), image.size


@contextlib.contextmanager
def _still_of(path: str | Path):
    """The picture a card shows: the image itself, or a video's first frame."""
    from ..planning.checks import VIDEO_SUFFIXES

    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        with image_file(path) as image:
            yield image
        return
    from ..safeio import MAX_IMAGE_PIXELS
    from .video import first_frame

    image = first_frame(path, MAX_IMAGE_PIXELS)
    try:
        yield image
    finally:
        image.close()


def make_thumbnail(image_path: str | Path, target: str | Path, max_side: int = THUMBNAIL_MAX_SIDE) -> tuple[int, int]:
    """Write a JPEG thumbnail (longest side <= max_side) atomically, unless an up-to-date one exists
    (newer than the image). Returns its size. target's directory is created; for the gallery's own
    thumbnails use write_gallery, which also refuses a symlinked thumbnails/ directory."""
    image_path, target = Path(image_path), Path(target)
    existing = _fresh_thumbnail_size(image_path, target, max_side)
    if existing is not None:
        return existing
    data, size = render_thumbnail(image_path, max_side)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data, overwrite=True)
    return size


def _fresh_thumbnail_size(image_path: Path, target: Path, max_side: int) -> tuple[int, int] | None:
    """The size of an up-to-date thumbnail already at target (a regular file, not a link, newer than
    the image), else None."""
    try:
        info = os.lstat(target)
        if not stat.S_ISREG(info.st_mode) or info.st_mtime_ns < image_path.stat().st_mtime_ns:
            return None
        with image_file(target) as existing:
            return existing.size if max(existing.size) <= max_side else None
    except Exception:  # noqa: BLE001 - missing or unreadable: make it
        return None


class ThumbnailDirectory:
    """output_dir/thumbnails opened as a directory descriptor (never through a symlink): every write
    and every clean-up of temp files happens relative to it, so nothing outside can be touched."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / THUMBNAILS
        try:
            os.mkdir(self.path)
        except FileExistsError:
            pass
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError:
            if os.path.islink(self.path):
                raise UnsafeFile(f"{self.path} is a symlink; sana-cli writes thumbnails only into a real "
                                 "directory (remove the link)") from None
            raise
        if not stat.S_ISDIR(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise UnsafeFile(f"{self.path} is not a directory")

    def close(self) -> None:
        os.close(self.fd)

    def remove_stray_temp_files(self) -> None:
        """Temp files a report killed mid-write left here (never those of a live writer)."""
        import time

        now = time.time()
        for entry in os.scandir(self.fd):
            if not is_temp_file(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and _abandoned(entry.name, now - info.st_mtime):
                    os.unlink(entry.name, dir_fd=self.fd)
            except FileNotFoundError:
                pass

    def fresh_size(self, name: str, image_path: Path, max_side: int) -> tuple[int, int] | None:
        return _fresh_thumbnail_size(image_path, self.path / name, max_side)

    def write(self, name: str, data: bytes) -> None:
        """Atomically write thumbnails/name: temp file created exclusively, fsynced, renamed."""
        if "/" in name or name in ("", ".", ".."):
            raise UnsafeFile(f"thumbnail name {name!r} is not a plain file name")
        temp = temp_path_for(name).name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(temp, flags, 0o644, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=self.fd)
            except FileNotFoundError:
                pass
            raise
        try:
            os.fsync(self.fd)
        except OSError:
            pass


# ---- the gallery -----------------------------------------------------------------------------------

def write_gallery(output_dir: str | Path, records: list[dict], summary: dict, *, title: str = "sana batch",
                  overwrite: bool = False) -> Path:
    """Write output_dir/index.html (atomically): a thumbnail card per image linking to the full image,
    failed images as highlighted cards with their error, and a header with the run's counts.

    records: manifest records (manifest.read_manifests(output_dir)); summary: BatchResult.to_dict() or
    any dict with some of its keys. Thumbnails go to output_dir/thumbnails/ and are remade only when
    missing or older than their image. An index.html that sana-cli did not write is replaced only
    with overwrite (FileExistsError otherwise)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / GALLERY
    if not overwrite and not _ours_or_absent(target):
        raise FileExistsError(f"{target} exists and was not written by sana-cli (pass --overwrite to replace it)")
    entries = latest_entries(output_dir, records)
    thumbnails = ThumbnailDirectory(output_dir)
    try:
        thumbnails.remove_stray_temp_files()  # left by a report killed mid-write
        for entry in entries:
            if not entry.ok:
                continue
            name, data = thumbnail_name(entry.file), None
            try:
                size = thumbnails.fresh_size(name, entry.path, THUMBNAIL_MAX_SIDE)
                if size is None:
                    data, size = render_thumbnail(entry.path)
            except Exception as exc:  # noqa: BLE001 - a crafted image is a failed card, not a crash
                entry.ok = False
                entry.error = f"cannot read the image: {image_problem(entry.file, exc)}"
                continue
            if data is not None:
                thumbnails.write(name, data)  # a failure here is the report's, not the image's
            entry.thumbnail_size = size
            entry.thumbnail = f"{THUMBNAILS}/{name}"
    finally:
        thumbnails.close()
    page = _page(entries, summary or {}, title)
    atomic_write_bytes(target, page.encode("utf-8"), overwrite=True)
    return target


_GENERATOR_MARK = b'<meta name="generator" content="sana-cli">'


def _ours_or_absent(path: Path) -> bool:
    """Whether path is absent or a gallery sana-cli wrote (its generator tag near the top)."""
    if not os.path.lexists(path):
        return True
    try:
        with open_regular(path) as handle:
            return _GENERATOR_MARK in handle.read(4096)
    except OSError:
        return False


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _href(relative: str) -> str:
    return _e(quote(Path(relative).as_posix(), safe="/"))


def _page(entries: list[Entry], summary: dict, title: str) -> str:
    failed = [e for e in entries if not e.ok]
    cards = "\n".join(_card(e) for e in entries) or '<p class="empty">No images in the manifest.</p>'
    failure_links = ""
    if failed:
        items = "".join(f'<li><a href="#{_e(_anchor(e.file))}">{_e(e.file)}</a> (row {_e(e.record.get("row"))}): '
                        f'{_e(e.error)}</li>' for e in failed)
        failure_links = f'<section class="failures"><h2>{len(failed)} failed</h2><ul>{items}</ul></section>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sana-cli">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(title)}</h1>
{_header(summary, entries)}
</header>
{failure_links}
<main class="grid">
{cards}
</main>
</body>
</html>
"""


def _header(summary: dict, entries: list[Entry]) -> str:
    model = summary.get("model")
    if isinstance(model, dict):
        model_text = model.get("model") or model.get("model_id") or ""
        detail = ", ".join(str(model[k]) for k in ("model_id", "pipeline", "dtype", "device")
                           if model.get(k) and model.get(k) != model_text)
        model_text = f"{model_text} ({detail})" if detail else model_text
    else:
        shown = [e.record for e in entries if e.ok]
        model_text = model or (shown[-1].get("model") if shown else "") or ""
    invalid = summary.get("invalid_rows")
    invalid_count = len(invalid) if isinstance(invalid, list) else invalid
    rate = summary.get("images_per_second")
    times = [e.record.get("time") for e in entries if isinstance(e.record.get("time"), str)]
    facts = [("written", summary.get("written")), ("already done", summary.get("already_done")),
             ("failed", summary.get("failed")), ("invalid rows", invalid_count),
             ("images/s", f"{rate:g}" if isinstance(rate, (int, float)) else None),
             ("in gallery", f"{sum(e.ok for e in entries)} of {len(entries)}"), ("model", model_text or None),
             ("source", summary.get("source") or None), ("last image", max(times) if times else None),
             ("report made", datetime.now(timezone.utc).isoformat(timespec="seconds"))]
    items = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e('–' if v is None else v)}</dd></div>" for k, v in facts)
    stopped = summary.get("stopped_by_signal")
    banner = (f'<p class="stopped">Interrupted by signal {_e(stopped)}: rerun the same command to finish.</p>'
              if stopped else "")
    return f'<dl class="summary">{items}</dl>{banner}'


def _anchor(file: str) -> str:
    return "img-" + hashlib.sha1(file.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _card(entry: Entry) -> str:
    r = entry.record
    pag = r.get("pag_scale")
    uses_pag = isinstance(pag, (int, float)) and pag
    pag_text = f"{pag:g} on {r.get('pag_layers') or 'default layers'}" if uses_pag else "off"
    seconds = r.get("seconds")
    rows = [("prompt", r.get("prompt")), ("negative", r.get("negative_prompt") or None), ("seed", r.get("seed")),
            ("size", f"{r.get('width')}×{r.get('height')}" if r.get("width") and r.get("height") else None),
            ("steps", r.get("steps")), ("guidance", r.get("guidance")), ("PAG", pag_text),
            ("decode", r.get("decode")),
            ("time", f"{seconds:.2f} s" if isinstance(seconds, (int, float)) else None),
            ("made", r.get("time")), ("row", r.get("row"))]
    facts = "".join(f'<dt>{_e(k)}</dt><dd class="{_e(k)}">{_e(v)}</dd>' for k, v in rows if v not in (None, ""))
    name = f'<a href="{_href(entry.file)}">{_e(entry.file)}</a>' if entry.ok else _e(entry.file)
    if entry.ok:
        width, height = entry.thumbnail_size or (THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE)
        visual = (f'<a class="thumb" href="{_href(entry.file)}"><img src="{_href(entry.thumbnail)}" '
                  f'width="{width}" height="{height}" alt="{_e(r.get("prompt"))}" '
                  f'onload="{_e(_ONLOAD)}" onerror="{_e(_ONERROR)}"></a>')
        note = (f'<p class="note">A later attempt failed: {_e(entry.later_error)}</p>' if entry.later_error else "")
        css = "card"
    else:
        visual = f'<div class="error"><strong>failed</strong><pre>{_e(entry.error)}</pre></div>'
        note = ""
        css = "card failed"
    return (f'<figure class="{css}" id="{_anchor(entry.file)}">{visual}<figcaption>'
            f'<p class="file">{name}</p>{note}<dl>{facts}</dl></figcaption></figure>')


_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #222; --muted: #666; --bad: #c62828;
        --badbg: #fdecea; }
@media (prefers-color-scheme: dark) { :root { --bg: #151515; --card: #222; --ink: #eee; --muted: #aaa;
        --bad: #ff6b6b; --badbg: #3a1d1d; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 1rem; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--ink); }
h1 { margin: 0 0 .5rem; font-size: 1.4rem; }
dl.summary { display: flex; flex-wrap: wrap; gap: .4rem 1.5rem; margin: 0 0 1rem; }
dl.summary div { display: flex; gap: .3rem; }
dl.summary dt { color: var(--muted); }
dl.summary dd { margin: 0; font-weight: 600; }
.stopped, .failures { border-left: 4px solid var(--bad); background: var(--badbg); padding: .5rem 1rem; }
.failures h2 { font-size: 1rem; margin: 0; color: var(--bad); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 1rem; }
figure.card { margin: 0; padding: .5rem; background: var(--card); border-radius: 6px;
              border: 1px solid rgba(127,127,127,.25); overflow-wrap: anywhere; }
.thumb { display: flex; justify-content: center; align-items: center; min-height: 256px; }
.thumb img { max-width: 100%; height: auto; image-rendering: auto; }
figure.failed, figure.broken { border: 2px solid var(--bad); background: var(--badbg); }
figure.broken .thumb::after { content: "image missing"; color: var(--bad); font-weight: 600; }
.error { min-height: 120px; color: var(--bad); }
.error pre { white-space: pre-wrap; font-size: 12px; }
.note { color: var(--bad); margin: .2rem 0; }
figcaption .file { font-weight: 600; margin: .4rem 0; }
figcaption dl { display: grid; grid-template-columns: max-content 1fr; gap: .1rem .6rem; margin: 0; }
figcaption dt { color: var(--muted); }
figcaption dd { margin: 0; white-space: pre-wrap; }
"""


# ---- CI step summary -------------------------------------------------------------------------------

def step_summary(summary: dict, records: list[dict], *, gallery: str | None = None) -> str:
    """GitHub-flavoured Markdown for $GITHUB_STEP_SUMMARY: counts, failed images (row and error, as
    the output directory stands after this run), invalid rows, the manifest and gallery paths."""
    summary = summary or {}
    output_dir = summary.get("output_dir")
    invalid_rows = summary.get("invalid_rows")
    invalid = ([i if isinstance(i, dict) else {"error": i} for i in invalid_rows]
               if isinstance(invalid_rows, list) else [])
    invalid_count = len(invalid_rows) if isinstance(invalid_rows, list) else invalid_rows
    if records and output_dir:
        failures = [{"row": e.record.get("row"), "file": e.file, "error": e.error}
                    for e in latest_entries(output_dir, records) if not e.ok]
    elif records:
        failures = [{"row": r.get("row"), "file": r.get("file"), "error": r.get("error")}
                    for r in _last_per_file(records) if r.get("event") == "error"]
    else:
        failures = [{"row": f.get("row"), "file": f.get("path"), "error": f.get("error")}
                    for f in summary.get("failures") or [] if isinstance(f, dict)]
    # The headline counts the failed images listed below (the directory as it stands), so it never
    # says "0 failed" above a table of failures; this run's own count gets its own row when it differs.
    run_failed = summary.get("failed")
    failed_count = len(failures) if (records or failures) else (run_failed or 0)
    ok = summary.get("ok", not summary.get("stopped_by_signal")) and not failures
    status = "✅" if ok else ("⏹️" if summary.get("stopped_by_signal") else "❌")
    lines = [f"## {status} sana batch: {_md(summary.get('written', '?'))} written, {_md(failed_count)} failed", ""]
    rate = summary.get("images_per_second")
    rows = [("planned", summary.get("images_planned")), ("written", summary.get("written")),
            ("already done", summary.get("already_done")), ("failed", failed_count),
            ("failed this run", run_failed if isinstance(run_failed, int) and run_failed != failed_count else None),
            ("invalid rows", invalid_count),
            ("images/s", f"{rate:g}" if isinstance(rate, (int, float)) else None)]
    lines += ["| | count |", "|---|---:|"]
    lines += [f"| {label} | {_md(value)} |" for label, value in rows if value is not None]
    model = summary.get("model")
    if isinstance(model, dict) and model.get("model"):
        lines += ["", f"Model: <code>{_md(model.get('model'))}</code>"
                      + (f" (<code>{_md(model.get('model_id'))}</code>, {_md(model.get('device'))}, "
                         f"{_md(model.get('dtype'))})" if model.get("model_id") else "")]
    if summary.get("stopped_by_signal"):
        lines += ["", f"**Interrupted** by signal {_md(summary['stopped_by_signal'])}: rerun to finish."]
    if failures:
        lines += ["", f"### Failed images ({len(failures)})", "", "| row | file | error |", "|---:|---|---|"]
        lines += [f"| {_md(f['row'])} | <code>{_md(f['file'])}</code> | {_md(f['error'])} |"
                  for f in failures[:_MAX_SUMMARY_FAILURES]]
        if len(failures) > _MAX_SUMMARY_FAILURES:
            lines.append(f"\n… and {len(failures) - _MAX_SUMMARY_FAILURES} more (see the manifest).")
        lines += ["", "Rerun the same command to retry the failed images; finished ones are kept."]
    if invalid:
        lines += ["", f"### Invalid rows ({len(invalid)})", "", "| line | error |", "|---:|---|"]
        lines += [f"| {_md(i.get('line'))} | {_md(i.get('error'))} |" for i in invalid[:_MAX_SUMMARY_FAILURES]]
    paths = []
    if summary.get("manifest"):
        paths.append(f"- Manifest: <code>{_md(summary['manifest'])}</code>")
    gallery = gallery or (os.path.join(output_dir, GALLERY) if output_dir else None)
    if gallery:
        paths.append(f"- Gallery: <code>{_md(gallery)}</code> (open it from the uploaded artifact)")
    if paths:
        lines += [""] + paths
    return "\n".join(lines) + "\n"


def _last_per_file(records: list[dict]) -> list[dict]:
    latest: dict[str, dict] = {}
    for record in records:
        if record.get("file"):
            latest[record["file"]] = record
    return list(latest.values())


def _md(value) -> str:
    """Text safe inside a Markdown table cell or <code>: HTML-escaped, no pipes, no line breaks."""
    text = html.escape("" if value is None else str(value), quote=False)
    return text.replace("|", "&#124;").replace("`", "&#96;").replace("\r", " ").replace("\n", " ")


def append_step_summary(markdown: str) -> bool:
    """Append markdown to the file $GITHUB_STEP_SUMMARY names. False when it is unset or cannot be
    written (a summary is a courtesy; it never fails a run)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    # The file must be a regular one: opened without blocking and checked on the descriptor, so a
    # FIFO or a device there is refused instead of hanging the run or writing into a device.
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        if not is_regular_or_absent(path):
            return False
        fd = os.open(path, flags, 0o644)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.set_blocking(fd, True)
        data = (markdown if markdown.endswith("\n") else markdown + "\n").encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# ---- one call for the CLI --------------------------------------------------------------------------

def write_report(output_dir: str | Path, summary: dict, *, title: str = "sana batch", overwrite: bool = False) -> dict:
    """What `sana batch --report` does: read every manifest in output_dir, write the gallery, and
    append the step summary when running under GitHub Actions. Returns {"gallery", "step_summary"}.
    overwrite: replace an index.html that sana-cli did not write."""
    records = read_manifests(output_dir)
    gallery = write_gallery(output_dir, records, summary, title=title, overwrite=overwrite)
    appended = append_step_summary(step_summary(summary, records, gallery=str(gallery)))
    return {"gallery": str(gallery), "step_summary": appended}
