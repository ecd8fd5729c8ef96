"""Checking values that come from outside (options, batch rows, HTTP fields): prompts, finite numbers,
counts, seeds. Pure Python."""

from __future__ import annotations

import json
import math
import unicodedata

from ..errors import UsageError

SEED_LIMIT = 2**63
MAX_GUIDANCE = 30.0  # guidance and PAG scale; the model cards use 4.5-5 and 2-3


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= width else text[: width - 1] + "…", ensure_ascii=False)


# ---- validation helpers shared by generate and batch ---------------------------------------------

_BLANK_LETTERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}  # fillers and the blank braille cell


def _visible(ch: str) -> bool:
    return unicodedata.category(ch)[0] not in "ZCM" and ch not in _BLANK_LETTERS


def check_prompt(prompt: str, what: str = "the prompt", allow_empty: bool = False) -> str:
    """A prompt is text with at least one visible character (only spaces, zero-width or other
    invisible characters count as empty), valid UTF-8 and without NUL."""
    if not isinstance(prompt, str):
        raise UsageError(f"{what} must be text, got {type(prompt).__name__}")
    bad = next((i for i, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:  # undecodable bytes from the command line arrive as lone surrogates
        raise UsageError(f"{what} is not valid UTF-8 (bad byte at character {bad + 1})",
                         hint="pass text in UTF-8")
    if "\x00" in prompt:
        raise UsageError(f"{what} contains a NUL character")
    if allow_empty and not prompt.strip():
        return prompt
    if not prompt.strip():
        raise UsageError(f"{what} is empty")
    if not any(_visible(ch) for ch in prompt):
        raise UsageError(f"{what} is empty (it has only invisible characters)")
    return prompt


def check_finite(name: str, value) -> float:
    """A number that is neither a bool, NaN nor infinite: the first check of every scale."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return value


def check_scale(name: str, value) -> float:
    """guidance and PAG scale: finite, 0..MAX_GUIDANCE (infinite guidance gives a black image)."""
    check_finite(name, value)
    if value < 0:
        raise UsageError(f"{name} must be 0 or more, got {value}")
    if value > MAX_GUIDANCE:
        raise UsageError(f"{name} must be at most {MAX_GUIDANCE:g}, got {value}")
    return value


def check_count(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{name} must be a whole number in {low}..{high}, got {value!r}")
    return value


def check_seed(seed: int, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"{name} must be a whole number in 0..2^63-1, got {seed!r}")
    return seed
