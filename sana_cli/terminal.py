"""What reaches a person's terminal, and what reaches a JSON parser.

Text that came from files sana-cli did not write (a prompt in an image, a manifest, a model name) can
hold escape sequences that retitle the window, move the cursor or hide text, and right-to-left or
zero-width characters that make a line read differently from what it does. `printable` shows every
such character as a visible escape; it is applied where text is printed for people. `json_text` is
the one way JSON is printed: strict (no NaN or Infinity, which JavaScript's parser rejects) and with
the same characters written as \\uXXXX escapes, so the value is unchanged and the terminal is safe.
"""

from __future__ import annotations

import json
import math
import unicodedata

# Characters a terminal or a bidi renderer acts on: C0/C1 controls and DEL, and the format (Cf),
# line/paragraph separator (Zl, Zp), surrogate and private-use classes, which include the bidi
# overrides and isolates (U+202A-202E, U+2066-2069), marks (U+200E/F, U+061C) and zero-width
# characters (U+200B-200D, U+2060, U+FEFF).
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def is_unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\t":
        return "\\t"
    if char == "\r":
        return "\\r"
    if char == "\n":
        return "\\n"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text, *, keep_newlines: bool = False) -> str:
    """text with every control, bidi, invisible-format or unassigned character written as a visible
    escape (\\x1b, \\u202e ...). keep_newlines keeps line breaks for multi-line output."""
    text = "" if text is None else str(text)
    if not any(is_unsafe(char) for char in text):
        return text
    return "".join(_escape(char) if is_unsafe(char) and not (keep_newlines and char == "\n") else char
                   for char in text)


def has_unsafe(text: str) -> bool:
    return any(is_unsafe(char) for char in text)


def finite(value):
    """value with every NaN / Infinity float replaced by None (null), as JavaScript's JSON.stringify
    does; recursively through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def json_text(data, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON (non-finite numbers become null; anything else unserialisable its str()), with
    terminal-unsafe characters escaped as \\uXXXX. They can only occur inside strings, where the
    escape means the same character, so a parser reads exactly the original value."""
    text = json.dumps(finite(data), ensure_ascii=False, allow_nan=False, default=str, indent=indent,
                      sort_keys=sort_keys)
    if not has_unsafe(text.replace("\n", "")):
        return text
    return "".join(_json_escape(char) if char != "\n" and is_unsafe(char) else char for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters outside the BMP
    return f"\\u{0xd800 + (code >> 10):04x}\\u{0xdc00 + (code & 0x3ff):04x}"
