"""Batch files to rows: .txt (one prompt per line), .jsonl (one object per line) or .csv (header row),
or `-` for stdin. Every row is checked before anything runs; errors carry the line number.

Pure Python (no torch).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import stat
import sys
import threading
from dataclasses import dataclass, field

from ..errors import UsageError
from .fields import COLUMNS, column_type

# Per-row fields (the field table's columns) and the type each must have.
FIELDS = {column: column_type(row) for column, row in COLUMNS.items()}
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


MAX_PROMPT_BYTES = 2**20  # a prompt read from stdin; the text encoder reads ~300 tokens of it
WAIT_NOTICE_SECONDS = 2.0  # a pipe, FIFO or terminal that stays silent this long gets a notice


def _notice(text: str) -> None:
    """A line on stderr that may be lost (stderr closed or broken) without failing anything."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


class _WaitNotice(threading.Thread):
    """Prints one notice after `seconds` unless cancelled. It blocks SIGINT and SIGTERM: the kernel may
    deliver a signal to any thread that takes it, and one taken here would leave the main thread blocked
    in open() or read() of a silent FIFO, so Ctrl-C would be lost."""

    def __init__(self, seconds: float, text: str):
        super().__init__(daemon=True, name="sana-wait-notice")
        self.seconds, self.text, self._cancelled = seconds, text, threading.Event()

    def start(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):
            return super().start()
        # A new thread starts with its creator's mask: block here, start it, unblock here.
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)

    def run(self) -> None:
        if not self._cancelled.wait(self.seconds):
            _notice(self.text)

    def cancel(self) -> None:
        self._cancelled.set()


def read_input(path: str, limit: int, what: str, *, stop_at_nul: bool = False) -> bytes:
    """At most limit + 1 bytes of a file, FIFO or stdin ('-'): unlike safeio.read_bounded, which refuses
    anything but a regular file, a prompt source may be a pipe. Never waits silently: a terminal on
    stdin is told how to end the input, and a pipe or FIFO that stays silent gets a notice (Ctrl-C
    still stops it). With stop_at_nul, reading stops at a first chunk that holds NUL (binary)."""
    stdin = path == "-"
    if stdin:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # an in-process caller's stream
            stream = getattr(sys.stdin, "buffer", sys.stdin)
            data = stream.read(limit + 1) if stream is not None else b""
            return data.encode("utf-8") if isinstance(data, str) else data
        if os.isatty(fd):
            _notice(f"sana: reading {what} from the terminal; end it with Ctrl-D")
    timer = _WaitNotice(WAIT_NOTICE_SECONDS, f"sana: still waiting for {what} (nothing has arrived yet; Ctrl-C stops)")
    timer.start()
    try:
        if not stdin:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))  # a FIFO blocks here until a writer
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
                raise IsADirectoryError(path)
        try:
            chunks, total = [], 0
            while total <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - total))
                timer.cancel()
                if not chunk:  # end of input (on a terminal, Ctrl-D: never read past it)
                    break
                chunks.append(chunk)
                total += len(chunk)
                if stop_at_nul and len(chunks) == 1 and b"\x00" in chunk[:8192] and not chunk.startswith(_UTF16_BOMS):
                    break
            return b"".join(chunks)
        finally:
            if not stdin:
                os.close(fd)
    finally:
        timer.cancel()


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_prompt_stdin() -> str:
    """The prompt of `sana generate -`: UTF-8 from stdin, at most MAX_PROMPT_BYTES."""
    data = read_input("-", MAX_PROMPT_BYTES, "the prompt on stdin")
    if len(data) > MAX_PROMPT_BYTES:
        raise UsageError(f"the prompt on stdin is larger than {MAX_PROMPT_BYTES // 2**20} MiB",
                         hint="a prompt is a few hundred words; use `sana batch -` for many prompts")
    return _decode(data, "the prompt on stdin").strip()


def read_text(path: str) -> tuple[str, str]:
    """The file (or stdin for '-') as text, and a name for messages. Rejects binary and non-UTF-8;
    UTF-16 with a byte-order mark (what Windows tools often write) is read too."""
    name = "stdin" if path == "-" else path
    try:
        data = read_input(path, MAX_BYTES, name, stop_at_nul=True)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory, not a batch file") from exc
    except PermissionError as exc:
        raise UsageError(f"{path}: permission denied") from exc
    if len(data) > MAX_BYTES:
        raise UsageError(f"{name} is larger than {MAX_BYTES // 2**20} MiB; split it")
    return _decode(data, name), name


def _decode(data: bytes, name: str) -> str:
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{name} starts like UTF-16 but is not valid UTF-16", hint="save it as UTF-8") from exc
    head = data[:8192]
    if b"\x00" in head:
        even, odd = head[0::2].count(0) / max(1, len(head[0::2])), head[1::2].count(0) / max(1, len(head[1::2]))
        if len(head) >= 4 and abs(even - odd) > 0.5:  # ASCII text in UTF-16: every other byte is 0
            raise UsageError(f"{name} looks like UTF-16 without a byte-order mark", hint="save it as UTF-8")
        raise UsageError(f"{name} is a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{name} is not UTF-8 (first bad byte on line {line})",
                         hint="save it as UTF-8") from exc


def split_lines(text: str) -> list[str]:
    """Lines as the formats define them: only \\n (or \\r\\n) ends a line. str.splitlines would also
    split on \\v, \\f, \\x1c-\\x1e, \\x85, U+2028 and U+2029, which JSON strings may hold unescaped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def detect_format(path: str, text: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    lowered = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".txt", "txt")):
        if lowered.endswith(suffix):
            return fmt
    first = next((line.strip() for line in split_lines(text) if line.strip()), "")
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
    for number, line in enumerate(split_lines(text), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            rows.append(Row(line=number, prompt=prompt))
    return rows


def _parse_jsonl(text: str) -> tuple[list[Row], list[RowError]]:
    rows, errors = [], []
    for number, line in enumerate(split_lines(text), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            errors.append(RowError(number, f"field {exc.args[0]!r} appears twice"))
            continue
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
    except csv.Error as exc:
        return [], [RowError(reader.line_num, f"not valid CSV ({exc})")]
    header = [column.strip() for column in header]
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        return [], [RowError(1, f"the CSV header repeats column(s) {', '.join(repr(c) for c in repeated)}")]
    if "prompt" not in header:
        return [], [RowError(1, f"the CSV header has no 'prompt' column (columns: {', '.join(header) or 'none'})")]
    rows, errors = [], []
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a bare carriage return in an unquoted cell: the rest cannot be split
            errors.append(RowError(reader.line_num, f"not valid CSV ({exc}); quote cells that hold line breaks"))
            break
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
    if kind is tuple:  # LoRAs: one "PATH_OR_HUB_ID[:SCALE]" string (CSV, JSONL) or a list of them (JSONL)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
            raise ValueError(f"'{key}' must be a string or a list of strings, got {value!r}")
        return tuple(items)
    if from_text and kind is not str:
        text = value.strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise ValueError(f"'{key}' must be {wanted}, got {text!r}") from None
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


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """JSON allows a key twice and keeps the last; a row that sets a field twice is a mistake."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _duplicate_names(rows: list[Row]) -> list[RowError]:
    """Explicit names must be unique, ignoring case (macOS and Windows file systems fold case) and
    surrounding spaces (which names lose)."""
    seen: dict[str, int] = {}
    errors = []
    for row in rows:
        name = row.get("name")
        if name is None:
            continue
        key = name.strip().casefold()
        if key in seen:
            errors.append(RowError(row.line, f"name {name!r} is already used on line {seen[key]}"))
        else:
            seen[key] = row.line
    return errors
