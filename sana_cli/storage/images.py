"""The still-image codec: one picture to PNG / JPEG / WebP bytes with its metadata, and the metadata read
back. PIL only, no torch. Files are written through storage.media (atomically, via storage.files).

Metadata goes in two dialects: an A1111-style `parameters` text (PNG text chunk, or EXIF
UserComment for JPEG/WebP) that existing prompt readers understand, and a `sana` JSON document
with everything needed to reproduce the image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import UsageError

_EXIF_USER_COMMENT = 0x9286
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_IFD = 0x8769


# ---- metadata --------------------------------------------------------------------------------------

def a1111_parameters(meta: dict) -> str:
    """The de-facto standard infotext: prompt, negative prompt, then 'Key: value' pairs."""
    lines = [meta.get("prompt", "")]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    pairs = [("Steps", meta.get("steps")), ("Sampler", meta.get("scheduler")), ("CFG scale", meta.get("guidance")),
             ("Seed", meta.get("seed")), ("Size", f"{meta.get('width')}x{meta.get('height')}"),
             ("Model", meta.get("model")), ("PAG scale", meta.get("pag_scale") or None),
             ("Version", f"sana-cli {meta.get('sana_cli', '')}".strip())]
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs if value not in (None, "")))
    return "\n".join(lines)


def encode_image(image: Image.Image, fmt: str, meta: dict, *, quality: int = 95) -> bytes:
    """Encode to PNG / JPEG / WebP bytes with both metadata dialects embedded. Deterministic for
    equal inputs (no timestamps), so sharded and resumed runs produce identical files. `quality` is
    JPEG's and WebP's (0..100); PNG is lossless."""
    buffer = io.BytesIO()
    sana_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    parameters = a1111_parameters(meta)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)  # iTXt when not Latin-1, so any prompt survives
        info.add_text("sana", sana_json)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    else:
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = "sana:" + json.dumps(meta, ensure_ascii=True, sort_keys=True)
        exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        options = {"quality": quality} if fmt == "JPEG" else {"quality": quality, "method": 4}
        image.convert("RGB").save(buffer, format=fmt, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def read_metadata(path: str | Path) -> dict:
    """Both metadata dialects from an image: {'sana': dict|None, 'parameters': str|None}.

    The file is untrusted: only a regular PNG, JPEG or WebP file is opened (see safeio), and only its
    header and metadata are read, never its pixels, so any size costs the same few kilobytes."""
    from ..safeio import image_file, image_problem

    try:
        with image_file(path, max_pixels=None) as image:
            fmt = image.format
            size = image.size
            # PNG text chunks before the pixel data are in .info after open (sana-cli writes them
            # there); PNG's .text and .getexif() would decode the whole image to look past it.
            text = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
            exif = image.getexif() if fmt in ("JPEG", "WEBP") else None
    except Exception as exc:  # noqa: BLE001 - whatever a crafted file makes Pillow raise is bad input
        raise UsageError(image_problem(path, exc)) from exc
    sana = text.get("sana")
    parameters = text.get("parameters")
    if exif is not None:
        description = exif.get(_EXIF_IMAGE_DESCRIPTION)
        if sana is None and isinstance(description, str) and description.startswith("sana:"):
            sana = description[len("sana:"):]
        comment = exif.get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
        if parameters is None and isinstance(comment, bytes):
            parameters = _decode_user_comment(comment)
    try:
        sana_meta = json.loads(sana) if sana else None
    except (ValueError, RecursionError):
        sana_meta = None
    return {"path": str(path), "format": fmt, "width": size[0], "height": size[1],
            "sana": sana_meta if isinstance(sana_meta, dict) else None, "parameters": parameters}


def _decode_user_comment(raw: bytes) -> str:
    header, body = raw[:8], raw[8:]
    if header == b"UNICODE\x00":
        # A1111 writes big-endian UTF-16; tolerate a little-endian writer too.
        text = body.decode("utf-16-be", errors="replace")
        return text if "\x00" not in text else body.decode("utf-16-le", errors="replace")
    return body.decode("utf-8", errors="replace")
