"""Batch files to rows: .txt (one prompt per line), .jsonl (one object per line) or .csv (header row),
or `-` for stdin. Every row is checked before anything runs; errors carry the line number.

Pure Python (no torch).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field

from .errors import UsageError

# Per-row fields and the type each must have.
FIELDS = {
    "prompt": str, "negative_prompt": str, "seed": int, "size": int, "width": int, "height": int,
    "steps": int, "guidance": float, "pag_scale": float, "name": str, "n": int,
}
FORMATS = ("auto", "txt", "jsonl", "csv")
MAX_BYTES = 256 * 2**20  # a prompt file larger than this is almost certainly not one


@dataclass(frozen=True)
class Row:
    """One row of a batch file: the prompt and whatever it overrides."""

    line: int
    prompt: str
    overrides: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.overrides.get(key, default)


@dataclass
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class BatchFileError(UsageError):
    """Invalid rows; .errors lists them all."""

    def __init__(self, source: str, errors: list[RowError]):
        shown = "; ".join(str(e) for e in errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        super().__init__(f"{source}: {len(errors)} invalid row(s): {shown}",
                         hint="fix them, or pass --skip-invalid to skip them",
                         details={"invalid_rows": [{"line": e.line, "error": e.message} for e in errors]})
        self.source = source
        self.errors = errors


def read_text(path: str) -> tuple[str, str]:
    """The file (or stdin for '-') as text, and a name for messages. Rejects binary and non-UTF-8."""
    name = "stdin" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else _read_bytes(path)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory, not a batch file") from exc
    except PermissionError as exc:
        raise UsageError(f"{path}: permission denied") from exc
    if b"\x00" in data[:8192]:
        raise UsageError(f"{name} is a binary file, not a text batch file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{name} is not UTF-8 (first bad byte on line {line})",
                         hint="save it as UTF-8") from exc
    return text, name


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise UsageError(f"{path} is larger than {MAX_BYTES // 2**20} MiB; split it")
    return data


def detect_format(path: str, text: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    lowered = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".txt", "txt")):
        if lowered.endswith(suffix):
            return fmt
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return "jsonl" if first.startswith("{") else "txt"


def parse(text: str, fmt: str) -> tuple[list[Row], list[RowError]]:
    """Rows and per-line errors. Never raises for bad rows: the caller decides (exit 2 or skip)."""
    if fmt == "txt":
        return _parse_txt(text), []
    if fmt == "jsonl":
        return _parse_jsonl(text)
    if fmt == "csv":
        return _parse_csv(text)
    raise UsageError(f"unknown batch format {fmt!r}; use txt, jsonl or csv")


def load(path: str, fmt: str = "auto") -> tuple[list[Row], list[RowError], str]:
    """Read and type-check a batch file: (good rows, row errors, source name). File-level problems
    (missing, binary, not UTF-8) raise UsageError; bad rows are returned for the caller to report
    together with the rows that fail planning."""
    text, name = read_text(path)
    rows, errors = parse(text, detect_format(path, text, fmt))
    errors += _duplicate_names(rows)
    bad_lines = {e.line for e in errors}
    return [row for row in rows if row.line not in bad_lines], errors, name


def settle(errors: list[RowError], source: str, skip_invalid: bool, rows_left: int) -> list[RowError]:
    """Exit 2 listing every bad row (unless skip_invalid), or when no row is left to render."""
    errors = sorted(errors, key=lambda e: e.line)
    if errors and not skip_invalid:
        raise BatchFileError(source, errors)
    if rows_left == 0:
        raise UsageError(f"{source} has no prompts" + (" left after skipping invalid rows" if errors else ""))
    return errors


def _parse_txt(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            rows.append(Row(line=number, prompt=prompt))
    return rows


def _parse_jsonl(text: str) -> tuple[list[Row], list[RowError]]:
    rows, errors = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            errors.append(RowError(number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(data, dict):
            errors.append(RowError(number, f"expected a JSON object, got {type(data).__name__}"))
            continue
        _check(number, data, rows, errors, from_text=False)
    return rows, errors


def _parse_csv(text: str) -> tuple[list[Row], list[RowError]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        return [], []
    header = [column.strip() for column in header]
    if "prompt" not in header:
        return [], [RowError(1, f"the CSV header has no 'prompt' column (columns: {', '.join(header) or 'none'})")]
    rows, errors = [], []
    for record in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            errors.append(RowError(number, f"{len(record)} cells for {len(header)} columns"))
            continue
        data = {key: value for key, value in zip(header, record) if value.strip() != "" or key == "prompt"}
        _check(number, data, rows, errors, from_text=True)
    return rows, errors


def _check(number: int, data: dict, rows: list[Row], errors: list[RowError], *, from_text: bool) -> None:
    """Type-check one row's fields; append a Row or a RowError."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        errors.append(RowError(number, f"unknown field(s) {', '.join(repr(k) for k in unknown)}"
                               f" (known: {', '.join(FIELDS)})"))
        return
    values = {}
    for key, value in data.items():
        try:
            values[key] = _convert(key, value, from_text)
        except ValueError as exc:
            errors.append(RowError(number, str(exc)))
            return
    prompt = values.pop("prompt", None)
    if prompt is None or not prompt.strip():
        errors.append(RowError(number, "the prompt is missing or empty"))
        return
    rows.append(Row(line=number, prompt=prompt, overrides=values))


def _convert(key: str, value, from_text: bool):
    kind = FIELDS[key]
    if value is None:
        raise ValueError(f"'{key}' is null")
    if from_text and kind is not str:
        text = value.strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"'{key}' must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"'{key}' must be a whole number, got {value!r}")
        return int(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"'{key}' must be a finite number")
    return float(value)


def _duplicate_names(rows: list[Row]) -> list[RowError]:
    """Explicit names must be unique, ignoring case (macOS and Windows file systems fold case)."""
    seen: dict[str, int] = {}
    errors = []
    for row in rows:
        name = row.get("name")
        if name is None:
            continue
        key = name.casefold()
        if key in seen:
            errors.append(RowError(row.line, f"name {name!r} is already used on line {seen[key]}"))
        else:
            seen[key] = row.line
    return errors
