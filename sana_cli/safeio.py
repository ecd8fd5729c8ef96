"""Reading files sana-cli did not write: images from anywhere, configs and cache files, manifests.

Such a file may be a FIFO that never answers, a link to /dev/zero that never ends, a huge file, a
PostScript program named `x.png`, or a decompression bomb. Everything here opens without blocking,
checks that it opened a regular file before reading a byte, reads at most a limit, and opens images
only as the formats sana-cli writes (PNG, JPEG, WebP), so Pillow never hands a file to an external
program such as Ghostscript.
"""

from __future__ import annotations

import json
import os
import stat
import warnings

MAX_JSON_BYTES = 16 * 2**20  # model_index.json, configs and weight indexes are kilobytes
MAX_IMAGE_BYTES = 1 << 30  # an 8192x8192 PNG of noise is about 200 MB
MAX_IMAGE_PIXELS = 8192 * 8192  # the largest image sana-cli writes (--force-size at the 8192 limit)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what sana-cli writes; nothing else is ever parsed


class UnsafeFile(OSError):
    """The path is not a regular file, or is larger than the limit for its kind."""


def open_regular(path: str | os.PathLike, limit: int | None = None, *, follow_links: bool = True):
    """A binary file object for path, which must be a regular file (a link to one is fine unless
    follow_links is false) of at most limit bytes. Opening never blocks (O_NONBLOCK: a FIFO without a
    writer returns at once) and the type is checked on the opened descriptor, so nothing can be swapped
    in between."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path} is {_kind(info.st_mode)}, not a regular file")
        if limit is not None and info.st_size > limit:
            raise UnsafeFile(f"{path} is {info.st_size} bytes, more than the {limit} a file of its kind may be")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most limit bytes (also if it grows while being read)."""
    with open_regular(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(f"{path} is more than the {limit} bytes a file of its kind may be")
    return data


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES):
    """Parsed JSON from a bounded regular file. FileNotFoundError passes through; anything else that
    is wrong with the file (type, size, encoding, syntax, nesting) is a ValueError or OSError."""
    data = read_bounded(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def open_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """A lazily decoded PIL image of a PNG, JPEG or WebP file: only the header has been read. Raises
    UnsafeFile / OSError / ValueError for anything else; never warns on stderr."""
    from PIL import Image

    handle = open_regular(path, MAX_IMAGE_BYTES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning and friends: we decide below
            image = Image.open(handle, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        handle.close()
        raise ValueError(f"{path} is too large to be an image sana-cli wrote ({exc})") from None
    except BaseException:
        handle.close()
        raise
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        handle.close()
        raise ValueError(f"{path} is {width}x{height}, larger than any image sana-cli writes")
    image._sana_handle = handle  # closed with the image (see close_image)
    return image


def close_image(image) -> None:
    image.close()
    handle = getattr(image, "_sana_handle", None)
    if handle is not None:
        handle.close()


class image_file:
    """`with image_file(path) as image:` open_image with the file closed afterwards, and Pillow's
    warnings (truncated EXIF, large images) kept off stderr for everything done inside."""

    def __init__(self, path, **options):
        self.path, self.options = path, options

    def __enter__(self):
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.simplefilter("ignore")
        try:
            self.image = open_image(self.path, **self.options)
        except BaseException:
            self._quiet.__exit__(None, None, None)
            raise
        return self.image

    def __exit__(self, *exc):
        try:
            close_image(self.image)
        finally:
            self._quiet.__exit__(*exc)
        return False


def image_problem(path, exc: BaseException) -> str:
    """One line saying why an image could not be read, without the library's internals."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(exc, UnidentifiedImageError):
        return f"{path} is not a readable image: not a PNG, JPEG or WebP file"
    if isinstance(exc, (UnsafeFile, ValueError)):
        return str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    if isinstance(exc, OSError):
        return f"{path} is not a readable image: {exc.strerror or exc}"
    return f"{path} is not a readable image: {exc}"


def is_regular_or_absent(path: str | os.PathLike) -> bool:
    """Whether path is a regular file (following links) or does not exist: what may be appended to
    or replaced without hanging on a FIFO or writing into a device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return not os.path.islink(path)  # a dangling link would create its target elsewhere
    except OSError:
        return False


# ---- safetensors headers -------------------------------------------------------------------------

MAX_SAFETENSORS_HEADER = 100 * 2**20
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class BadSafetensors(ValueError):
    """A file that is not a well-formed safetensors file; `truncated` when only its data is cut short."""

    def __init__(self, reason: str, truncated: bool = False):
        super().__init__(reason)
        self.truncated = truncated


def read_safetensors_header(path: str | os.PathLike, limit: int = MAX_SAFETENSORS_HEADER) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, read without torch and checked whole: every entry of the
    header is {dtype: a known type, shape: whole numbers >= 0, data_offsets: [begin, end]} with end - begin
    exactly the bytes its shape and dtype take, inside the file; metadata maps text to text. tensors is
    {name: (dtype, shape, (begin, end))}. Anything else (a non-numeric shape, an offset past the end, a header
    that is not JSON, a FIFO) raises BadSafetensors or OSError: a caller guards one call, not each field."""
    with open_regular(path) as handle:
        end = os.fstat(handle.fileno()).st_size
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= min(limit, max(0, end - 8)):
            raise BadSafetensors("the header size is not that of a safetensors file")
        raw = handle.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadSafetensors("the header is not JSON") from None
    if not isinstance(header, dict):
        raise BadSafetensors("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise BadSafetensors("its __metadata__ is not a map of text to text")
    data_bytes = end - 8 - size
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise BadSafetensors(f"the entry of {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_ITEM_BYTES:
            raise BadSafetensors(f"{name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_whole(n) for n in shape):
            raise BadSafetensors(f"{name!r} has a shape that is not a list of whole numbers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(n) for n in offsets) \
                or offsets[0] > offsets[1]:
            raise BadSafetensors(f"{name!r} has data_offsets that are not [begin, end]")
        count = 1
        for n in shape:
            count *= n
        if offsets[1] - offsets[0] != count * SAFETENSORS_ITEM_BYTES[dtype]:
            raise BadSafetensors(f"{name!r} declares {offsets[1] - offsets[0]} bytes for its shape {shape}")
        if offsets[1] > data_bytes:
            raise BadSafetensors(f"{name!r} ends past the end of the file", truncated=True)
        tensors[name] = (dtype, tuple(shape), (offsets[0], offsets[1]))
    return tensors, metadata


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
