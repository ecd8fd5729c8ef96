"""Input images (the img2img start image, the ControlNet control image): checked at planning time,
prepared the same way every time. Pure Pillow, no torch.

The rule, as the README states it:
- PNG, JPEG or WebP regular files only (safeio.open_image: bounded size, at most 8192x8192 pixels,
  never handed to another decoder); a truncated or undecodable file is a usage error.
- The EXIF orientation is applied first, as a photo viewer shows the picture.
- Any mode becomes RGB: transparency (RGBA, LA, a palette with transparency) is composited on white;
  16-bit grey (I;16, I) is scaled to 8 bits; CMYK is converted by Pillow's profile-less conversion.
- It is resized to cover the planned size (keeping its aspect ratio), with Lanczos, and centre-cropped
  to exactly width x height. An image already at the planned size is used as it is.
- Its identity (metadata and job key) is the sha256 of the file's bytes.
"""

from __future__ import annotations

import hashlib
import os
import warnings

from .errors import UsageError
from .safeio import MAX_IMAGE_BYTES, image_problem, open_image, close_image, read_bounded

RULE = ("EXIF orientation applied; transparency composited on white; any mode to 8-bit RGB; resized with Lanczos "
        "to cover the planned size and centre-cropped to it")


def check_image(path, what: str) -> tuple[str, str]:
    """(absolute path, sha256 of its bytes) of a readable input image; a usage error, one line, otherwise.
    The whole image is decoded once here, so a truncated file is found before anything loads."""
    if not isinstance(path, str) or not path.strip():
        raise UsageError(f"{what} is empty")
    try:
        data = read_bounded(path, MAX_IMAGE_BYTES)
        image = _decoded(path)
        close_image(image)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every way a file is not a usable image is one line
        raise UsageError(f"{what}: {image_problem(path, exc)}") from None
    return os.path.abspath(path), hashlib.sha256(data).hexdigest()


def _decoded(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = open_image(path)
        try:
            image.load()  # a truncated file fails here, not halfway through a run
        except BaseException:
            close_image(image)
            raise
    return image


def to_rgb(image):
    """An 8-bit RGB copy of any Pillow image, with the EXIF orientation applied and transparency on white."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grey (PNG opens it as I;16 or I): its top 8 bits
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit(image, width: int, height: int):
    """Cover-resize with Lanczos and centre-crop to exactly width x height (no change at that size)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def prepare(path: str, width: int, height: int):
    """The RGB image a run feeds the pipeline, by the module's rule."""
    image = _decoded(path)
    try:
        return fit(to_rgb(image), width, height)
    finally:
        close_image(image)
