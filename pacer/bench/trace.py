"""Workload traces: Azure LLM inference (timestamps + lengths), Sarathi/Vidur length files (ShareGPT,
arXiv) and Mooncake (timestamps, lengths and 512-token prefix blocks that requests share).

A malformed file fails with the file name and the 1-based line, never with a bare parse error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

FORMATS = ("azure", "lengths", "mooncake")

# Required CSV columns per format; the first row of the file must name them (extra columns are ignored).
_CSV_COLUMNS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "lengths": ("num_prefill_tokens", "num_decode_tokens"),
}
_FORMAT_HELP = ("azure (CSV: TIMESTAMP,ContextTokens,GeneratedTokens), lengths (CSV: num_prefill_tokens,"
                "num_decode_tokens,...), mooncake (JSON lines: timestamp ms, input_length, output_length, hash_ids)")
_EPOCH = datetime(1970, 1, 1)


# ---- traces -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace, lengths in the trace's own tokens. Output may be 0 here (the trace says so);
    `build_workload` sends at least 1 because OpenAI servers reject max_tokens=0."""

    timestamp_s: float | None  # seconds from the trace's first request; None for length-only traces
    prompt_tokens: int  # >= 1
    output_tokens: int  # >= 0
    hash_ids: tuple[int, ...] = ()  # Mooncake: ids of the 512-token prefix blocks the prompt is made of


class TraceError(ValueError):
    """A trace file that cannot be read; the message starts with `file:line:` (1-based, header is line 1)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


class _RowError(Exception):
    """A bad field; the reader adds the file and line."""


def read_trace(path: str | Path, fmt: str | None = None) -> list[TraceRecord]:
    """Read a whole trace; `fmt=None` detects the format from the first line. Timestamps must not go backwards."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)} (or None to detect), got {fmt!r}")
    name = str(path)
    lines = [(number, text) for number, text in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1)
             if text.strip()]
    if not lines:
        raise TraceError(name, 1, f"empty trace; expected one of: {_FORMAT_HELP}")
    fmt = fmt or _detect_format(name, lines[0])
    rows = _read_mooncake(name, lines) if fmt == "mooncake" else _read_csv(name, lines, fmt)
    records: list[TraceRecord] = []
    first = previous = None
    for line, time_us, prompt, output, hash_ids in rows:
        time_s = None
        if time_us is not None:
            if previous is not None and time_us < previous:
                raise TraceError(name, line, f"timestamp goes backwards by {(previous - time_us) / 1e6:.6f} s; "
                                 "traces must be sorted by time")
            first = time_us if first is None else first
            previous = time_us
            time_s = (time_us - first) / 1e6
        records.append(TraceRecord(time_s, prompt, output, hash_ids))
    return records


# line, absolute time in microseconds (integers for Azure, so that differences are exact), prompt, output, hash ids
_Row = tuple[int, float | None, int, int, tuple[int, ...]]


def _detect_format(name: str, first: tuple[int, str]) -> str:
    line, text = first
    if text.lstrip().startswith("{"):
        return "mooncake"
    columns = {column.strip() for column in next(csv.reader([text]))}
    for fmt, needed in _CSV_COLUMNS.items():
        if set(needed) <= columns:
            return fmt
    raise TraceError(name, line, f"unknown trace format (first line {text[:80]!r}); known formats: {_FORMAT_HELP}")


def _read_csv(name: str, lines: list[tuple[int, str]], fmt: str) -> Iterator[_Row]:
    (header_line, header), body = lines[0], lines[1:]
    columns = {column.strip(): i for i, column in enumerate(next(csv.reader([header])))}
    missing = [column for column in _CSV_COLUMNS[fmt] if column not in columns]
    if missing:
        raise TraceError(name, header_line, f"{fmt} trace needs column(s) {', '.join(missing)} in its header")
    if fmt == "azure":
        time_col, prompt_col, output_col = (columns[c] for c in _CSV_COLUMNS["azure"])
    else:
        time_col, (prompt_col, output_col) = None, (columns[c] for c in _CSV_COLUMNS["lengths"])
    names = {i: column for column, i in columns.items()}
    for (line, _), row in zip(body, csv.reader(text for _, text in body)):
        try:
            time_us = None if time_col is None else _microseconds(_cell(row, time_col, names), names[time_col])
            prompt = _int(_cell(row, prompt_col, names), names[prompt_col], 1)
            output = _int(_cell(row, output_col, names), names[output_col], 0)
        except _RowError as error:
            raise TraceError(name, line, str(error)) from None
        yield line, time_us, prompt, output, ()


def _cell(row: list[str], i: int, names: dict[int, str]) -> str:
    if i >= len(row) or not row[i].strip():
        raise _RowError(f"missing {names[i]}")
    return row[i].strip()


def _read_mooncake(name: str, lines: list[tuple[int, str]]) -> Iterator[_Row]:
    for line, text in lines:
        try:
            row = _mooncake_row(text)
        except _RowError as error:
            raise TraceError(name, line, str(error)) from None
        yield (line, *row)


def _mooncake_row(text: str) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise _RowError(f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
    timestamp = _json_field(obj, "timestamp")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or not timestamp >= 0:
        raise _RowError(f"timestamp must be a number of milliseconds >= 0, got {timestamp!r}")
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list):
        raise _RowError(f"hash_ids must be a list of integers, got {hash_ids!r}")
    return (timestamp * 1000, _int(_json_field(obj, "input_length"), "input_length", 1),
            _int(_json_field(obj, "output_length"), "output_length", 0),
            tuple(_int(h, "hash_ids", 0) for h in hash_ids))


def _json_field(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise _RowError(f"missing {key}")
    return obj[key]


def _int(value: str | Any, column: str, minimum: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise _RowError(f"{column} must be an integer, got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _RowError(f"{column} must be an integer, got {value!r}")
    if value < minimum:
        raise _RowError(f"{column} must be >= {minimum}, got {value}")
    return value


def _microseconds(text: str, column: str) -> int:
    """Azure's `2023-11-16 18:15:46.6805900` (7 fractional digits; Python keeps 6) as microseconds since 1970, naive
    times taken as UTC: only differences matter, and no local timezone (or DST jump) may leak in."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _RowError(f"{column} is not a date and time: {text!r}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def turn_gaps(records: Sequence[TraceRecord]) -> list[float]:
    """Seconds from each request to the next turn of its conversation, in a trace whose prompts name their blocks
    (Mooncake's `hash_ids`): the later request whose prompt begins with all of an earlier one's full blocks (its
    last block, perhaps partial, aside; two at least, so that a shared system prompt alone makes no conversation).
    A gap holds the earlier turn's answer time as well as the user's thought: the trace has no finish times."""
    latest: dict[tuple[int, ...], float] = {}  # a prompt's full blocks -> when the latest such prompt arrived
    gaps = []
    for record in records:
        blocks = record.hash_ids
        if record.timestamp_s is None:
            continue
        for k in range(len(blocks) - 1, 1, -1):  # the longest history it extends
            if blocks[:k] in latest:
                gaps.append(record.timestamp_s - latest[blocks[:k]])
                break
        if len(blocks) > 2:
            latest[blocks[:-1]] = record.timestamp_s
    return gaps
