"""Reading JSON Lines telemetry (metrics.jsonl, telegrams.jsonl, control.jsonl) safely.

A writer that is killed mid-``write`` leaves a *torn* last line: bytes without the final
newline. Every writer in this package emits a record and its ``\\n`` in one write, so a line
is complete exactly when its newline is on disk. The reader therefore

* returns exactly the complete records (the torn tail is reported, never parsed — even when
  the torn bytes happen to be valid JSON, e.g. cut just before the newline);
* reports every complete line that is not a JSON object as corrupt, with its 1-based line
  number, and keeps going (one bad line must not hide a run's history);
* follows a live file (:class:`JsonlTail`, :func:`follow`) holding back a partial line until
  its newline arrives, and starts over when the file is replaced or truncated.

No torch here: the cockpit and the CLI import this.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .sink import decode_value


class TelemetryReadError(InputError):
    """A telemetry file cannot be read at all (missing, a directory, no permission)."""


@dataclass(frozen=True)
class CorruptLine:
    line_number: int  # 1-based
    reason: str
    text: str  # the first 200 characters of the line, for the message


@dataclass
class ReadResult:
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    corrupt: list[CorruptLine] = field(default_factory=list)
    torn_tail_bytes: int = 0  # bytes after the last newline (0: the file ends cleanly)
    complete_bytes: int = 0  # offset just after the last complete line
    line_numbers: list[int] = field(default_factory=list)  # 1-based line of each record

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def describe_problems(self) -> str:
        parts = [f"line {c.line_number}: {c.reason}" for c in self.corrupt]
        if self.torn_tail_bytes:
            parts.append(f"torn last line ({self.torn_tail_bytes} bytes, ignored)")
        return "; ".join(parts) or "none"


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a JSON object line, (None, reason) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    return record, None


def _split_complete(data: bytes, first_line_number: int, result: ReadResult, base_offset: int) -> int:
    """Parse the complete lines of ``data`` into ``result``; returns the number of bytes consumed."""
    end = data.rfind(b"\n")
    if end < 0:
        return 0
    line_number = first_line_number
    for raw in data[: end + 1].split(b"\n")[:-1]:
        if raw.strip():
            record, reason = parse_line(raw)
            if record is None:
                result.corrupt.append(CorruptLine(line_number, reason or "unreadable", raw[:200].decode("utf-8", "replace")))
            else:
                result.records.append(record)
                result.line_numbers.append(line_number)
        line_number += 1
    result.complete_bytes = base_offset + end + 1
    return end + 1


def read_jsonl(path: Path) -> ReadResult:
    """Every complete record of a JSON Lines file, corrupt lines reported, torn tail ignored."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise TelemetryReadError(f"Telemetry file {path} does not exist.",
                                 hint="Check the run directory (runs/<run-id>/metrics.jsonl).") from exc
    except OSError as exc:
        raise TelemetryReadError(f"Telemetry file {path} cannot be read: {exc.strerror or exc}.") from exc
    result = ReadResult(path)
    consumed = _split_complete(data, 1, result, 0)
    result.torn_tail_bytes = len(data) - consumed
    return result


def read_metrics(path: Path) -> ReadResult:
    """``read_jsonl`` for a metrics.jsonl (MetricEvent lines); kept as the name callers look for."""
    return read_jsonl(path)


def event_value(event: dict[str, Any]) -> float | None:
    """The float a MetricEvent stands for: NaN/inf restored from ``non_finite``."""
    return decode_value(event.get("value"), event.get("non_finite"))


def latest_values(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The last value seen for each metric name, in file order."""
    out: dict[str, float | None] = {}
    for r in records:
        if "metric" in r:
            out[str(r["metric"])] = event_value(r)
    return out


class JsonlTail:
    """Incremental reader of a live JSON Lines file; :meth:`poll` never blocks.

    Each poll reads the bytes appended since the last one and returns the records whose
    newline has arrived; a partial last line waits for the next poll. If the file shrinks or
    is replaced (different inode), reading starts over from its beginning. A missing file is
    an empty file (the writer may not have started yet). Corrupt complete lines are kept in
    :attr:`corrupt` with their line numbers.
    """

    def __init__(self, path: Path, *, from_start: bool = True):
        self.path = Path(path)
        self.corrupt: list[CorruptLine] = []
        self._offset = 0
        self._line_number = 1
        self._inode: int | None = None
        self._buffer = b""
        if not from_start:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return
            # skip to the end of the last complete line present now
            self._inode = st.st_ino
            with open(self.path, "rb") as fh:
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self._offset = end
            self._line_number = 1 + data[:end].count(b"\n")

    @property
    def offset(self) -> int:
        """Bytes of the file consumed as complete lines."""
        return self._offset

    def _reset(self, inode: int | None) -> None:
        self._offset, self._line_number, self._buffer, self._inode = 0, 1, b"", inode

    def poll(self) -> list[dict[str, Any]]:
        return [record for _, record in self.poll_numbered()]

    def poll_numbered(self) -> list[tuple[int, dict[str, Any]]]:
        """Like :meth:`poll`, each record with its 1-based line number."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._inode is not None:
                self._reset(None)
            return []
        if (self._inode is not None and st.st_ino != self._inode) or st.st_size < self._offset:
            self._reset(st.st_ino)
        self._inode = st.st_ino
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        result = ReadResult(self.path)
        consumed = _split_complete(data, self._line_number, result, self._offset)
        if consumed:
            self._line_number += data[:consumed].count(b"\n")
            self._offset += consumed
        self.corrupt.extend(result.corrupt)
        return list(zip(result.line_numbers, result.records))


def follow(
    path: Path,
    *,
    poll_interval_s: float = 0.25,
    from_start: bool = True,
    stop: Callable[[], bool] | None = None,
    idle_timeout_s: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield records of a live JSON Lines file as they are completed (``tail -f`` for telemetry).

    Ends when ``stop()`` returns true, or after ``idle_timeout_s`` seconds without a new record.
    """
    tail = JsonlTail(path, from_start=from_start)
    last_new = time.monotonic()
    while True:
        records = tail.poll()
        if records:
            last_new = time.monotonic()
            yield from records
            continue
        if stop is not None and stop():
            return
        if idle_timeout_s is not None and time.monotonic() - last_new >= idle_timeout_s:
            return
        time.sleep(poll_interval_s)


__all__ = [
    "CorruptLine",
    "JsonlTail",
    "ReadResult",
    "TelemetryReadError",
    "event_value",
    "follow",
    "latest_values",
    "parse_line",
    "read_jsonl",
    "read_metrics",
]
