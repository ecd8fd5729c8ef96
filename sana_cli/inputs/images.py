"""Input images (the img2img start image, the ControlNet control image, the inpainting mask): checked at
planning time, prepared the same way every time. Pure Pillow, no torch.

The rule, as the README states it:
- PNG, JPEG or WebP regular files only (safeio.open_image: bounded size, at most 8192x8192 pixels,
  never handed to another decoder); a truncated or undecodable file is a usage error.
- Each side at most 8192 pixels, and the cover-resize to the planned size makes at most 8192x8192 pixels
  (a 100000x1 strip is refused while planning, not resized into gigapixels).
- The EXIF orientation is applied first, as a photo viewer shows the picture.
- Any mode becomes RGB: transparency (RGBA, LA, a palette with transparency) is composited on white;
  16-bit grey (I;16, I) is scaled to 8 bits; CMYK is converted by Pillow's profile-less conversion.
- It is resized to cover the planned size (keeping its aspect ratio), with Lanczos, and centre-cropped
  to exactly width x height. An image already at the planned size is used as it is.
- Its identity (metadata and job key) is the sha256 of the file's bytes.

A mask (inpainting, white = repaint) is checked as an input image, and must have the start image's size (both
after their EXIF orientation), so the one resize and crop puts it over the same pixels. It becomes 8-bit grey:
transparency is composited on black (a transparent pixel is kept, so white strokes on a transparent layer mark
what to repaint), a palette through its colours, 16-bit grey by its top 8 bits, colour by its luminance (ITU-R
601). It is resized and cropped as the image is, then made binary: grey MASK_THRESHOLD or above is repainted.

On a server the bytes come from the client (inputs.supplied): the file opened is the server's copy of
them, and messages still name the path the client wrote.
"""

from __future__ import annotations

import hashlib
import os
import warnings

from ..errors import UsageError
from . import supplied
from ..safeio import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, close_image, image_problem, open_image, read_bounded

MAX_SIDE = 8192  # the longest side of an input image, as of any image sana-cli writes
MAX_RESIZE_PIXELS = MAX_IMAGE_PIXELS  # the cover-resize never makes a larger image than an input may be

MASK_THRESHOLD = 128  # a mask's grey level (0-255) from which a pixel is repainted
RULE = ("EXIF orientation applied; transparency composited on white; any mode to 8-bit RGB; resized with Lanczos "
        "to cover the planned size and centre-cropped to it")


def check_image(path, what: str, size: tuple[int, int] | None = None) -> tuple[str, str]:
    """(absolute path, sha256 of its bytes) of a readable input image; a usage error, one line, otherwise.
    Its sides and, given the planned size (width, height), the work of the cover-resize are bounded
    (check_bounds) before its pixels are decoded; then the whole image is decoded once, so a truncated file
    is found before anything loads."""
    if not isinstance(path, str) or not path.strip():
        raise UsageError(f"{what} is empty")
    source = supplied.local(path, what=what)
    try:
        data = read_bounded(source, MAX_IMAGE_BYTES)
        image = open_image(source)
        try:
            check_bounds(image.size, size, f"{what}: {path}")
        finally:
            close_image(image)
        image = _decoded(source)
        close_image(image)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every way a file is not a usable image is one line
        problem = image_problem(source, exc)
        raise UsageError(f"{what}: {problem.replace(str(source), path) if source != path else problem}") from None
    # On a server the path is the client's name for the file (already absolute from a CLI, a plain file name
    # from an upload): kept as it is, never made a path of the server's.
    return path if supplied.active() else os.path.abspath(path), hashlib.sha256(data).hexdigest()


def check_bounds(image_size: tuple[int, int], size: tuple[int, int] | None, what: str) -> None:
    """Each side of an input image at most MAX_SIDE (the pixel count alone lets a 100000x1 strip through),
    and the image the cover-resize makes (fit) at most MAX_RESIZE_PIXELS: a 1-pixel-high strip covering
    128x128 would be resized to gigapixels before its crop. Sizes only: nothing is decoded. An EXIF rotation
    swaps the sides, so both orientations are bounded."""
    width, height = image_size
    if max(width, height) > MAX_SIDE:
        raise UsageError(f"{what} is {width}x{height}: a side is longer than the {MAX_SIDE} pixels an input image "
                         "may have")
    if size is None:
        return
    for w, h in ((width, height), (height, width)):
        resized = _cover(w, h, *size)
        if resized[0] * resized[1] > MAX_RESIZE_PIXELS:
            raise UsageError(f"{what} is {width}x{height}: covering {size[0]}x{size[1]} would resize it to "
                             f"{resized[0]}x{resized[1]} pixels, more than {MAX_RESIZE_PIXELS}",
                             hint="crop it closer to the aspect ratio of the size asked for")


def _cover(image_width: int, image_height: int, width: int, height: int) -> tuple[int, int]:
    """The size fit resizes an image to before its centre crop."""
    scale = max(width / image_width, height / image_height)
    return max(width, round(image_width * scale)), max(height, round(image_height * scale))


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


def _flattened(image, mode: str, background: tuple[int, int, int, int]):
    """An 8-bit copy of any Pillow image in `mode`, with the EXIF orientation applied, 16-bit grey by its top
    8 bits, a palette through its colours, and transparency composited on `background`."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit grey (PNG opens it as I;16 or I): its top 8 bits
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert(mode)
    return image.convert(mode)


def to_rgb(image):
    """An 8-bit RGB copy of any Pillow image, with the EXIF orientation applied and transparency on white."""
    return _flattened(image, "RGB", (255, 255, 255, 255))


def fit(image, width: int, height: int):
    """Cover-resize with Lanczos and centre-crop to exactly width x height (no change at that size)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    size = _cover(image.width, image.height, width, height)
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def prepare(path: str, width: int, height: int, digest: str | None = None):
    """The RGB image a run feeds the pipeline, by the module's rule; `digest` (the sha256 planning recorded)
    picks the supplied copy on a server."""
    image = _decoded(supplied.local(path, digest, "the input image"))
    try:
        return fit(to_rgb(image), width, height)
    finally:
        close_image(image)


def check_mask(path, what: str, image: str, image_what: str, size: tuple[int, int] | None = None,
               image_digest: str | None = None) -> tuple[str, str]:
    """(absolute path, sha256) of an inpainting mask, checked as an input image (check_image), whose size after
    its EXIF orientation is the start image's (`image`, already checked, whose bytes hash to image_digest)."""
    checked = check_image(path, what, size)
    mask_size = oriented_size(supplied.local(checked[0], checked[1], what))
    image_size = oriented_size(supplied.local(image, image_digest, image_what))
    if mask_size != image_size:
        raise UsageError(f"{what} is {mask_size[0]}x{mask_size[1]} and {image_what} {image_size[0]}x{image_size[1]}: "
                         "a mask must be the size of the image it masks")
    return checked


_SWAPS_SIDES = (5, 6, 7, 8)  # the EXIF orientations that rotate by 90 or 270 degrees


def oriented_size(path: str) -> tuple[int, int]:
    """An image's (width, height) as shown, after its EXIF orientation, from its header alone."""
    image = open_image(path)
    try:
        width, height = image.size
        orientation = image.getexif().get(0x0112)
    finally:
        close_image(image)
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def to_mask(image):
    """A mask's 8-bit grey copy (EXIF orientation applied, transparency on black), by the module's rule."""
    return _flattened(image, "L", (0, 0, 0, 255))


def prepare_mask(path: str, width: int, height: int, digest: str | None = None):
    """The binary mask a run uses (mode L, 255 = repaint, 0 = keep), resized and cropped as the image is;
    `digest` picks the supplied copy on a server, as for prepare."""
    image = _decoded(supplied.local(path, digest, "the mask"))
    try:
        grey = fit(to_mask(image), width, height)
    finally:
        close_image(image)
    return grey.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
