"""Telemetry Sink: MetricEvent lines in an append-only JSON Lines file.

MetricEvent (spec data contract, extended compatibly with optional keys; JSON Schema in
``scaler_wizard/schemas/metric_event.schema.json``):
    {"step": 123, "metric": "eval/perplexity@1024", "value": 5.42,
     "timestamp": "2024-05-26T18:42:00Z", "stage": 2}
A non-finite value is written as ``"value": null`` with ``"non_finite": "nan" | "inf" | "-inf"``
so that the line stays valid (strict) JSON and the event is never dropped.

Durability: each event is one ``write`` of a whole line; lines are flushed to the OS every
``flush_every`` events and fsynced on :meth:`MetricWriter.sync` (call it at snapshot
boundaries) and on :meth:`MetricWriter.close`. A crash can therefore tear at most the last
line, which :mod:`scaler_wizard.telemetry.reader` tolerates.

Only the main process writes (``is_main_process=False`` makes every call a no-op), so a run
under ``accelerate launch`` has exactly one writer. Listeners (e.g. the opt-in
:class:`~scaler_wizard.telemetry.remote.RemoteSink`) receive every event after it is written;
a listener that raises is disabled, never allowed to break training.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..fsutil import utc_now, write_json_atomic

SCHEMA_VERSION = 1

EventListener = Callable[[dict[str, Any]], Any]


def non_finite_label(value: float) -> str | None:
    """``"nan"``, ``"inf"`` or ``"-inf"`` for a non-finite float, ``None`` for a finite one."""
    if math.isfinite(value):
        return None
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def decode_value(value: float | None, non_finite: str | None) -> float | None:
    """Inverse of the encoding above: the float a (value, non_finite) pair stands for."""
    if non_finite is not None:
        return float(non_finite)  # float("nan"), float("inf"), float("-inf")
    return None if value is None else float(value)


def metric_event(step: int, metric: str, value: float, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"step": int(step), "metric": metric, "timestamp": utc_now()}
    v = float(value)
    label = non_finite_label(v)
    if label is None:
        event["value"] = v
    else:
        event["value"] = None
        event["non_finite"] = label
    event.update({k: v for k, v in extra.items() if v is not None})
    return event


class MetricWriter:
    """Append-only writer; flushes every ``flush_every`` events and fsyncs on ``sync``/``close``.

    ``listeners`` are called with each written event dict (same process, same thread); use
    them to mirror events elsewhere. ``events_written`` counts the lines written so far.
    """

    def __init__(
        self,
        path: Path,
        *,
        is_main_process: bool = True,
        flush_every: int = 32,
        listeners: Iterable[EventListener] = (),
    ):
        self.path = Path(path)
        self.enabled = is_main_process
        self.flush_every = max(1, int(flush_every))
        self.events_written = 0
        self.listener_errors: list[str] = []
        self._listeners: list[EventListener] = list(listeners)
        self._pending = 0
        self._lock = threading.Lock()
        self.torn_tail_bytes = _drop_torn_tail(self.path) if self.enabled else 0
        self._fh = open(self.path, "a", encoding="utf-8") if self.enabled else None
        if self.torn_tail_bytes:
            # a process killed mid-write left half a record; appending after it would glue the
            # next record onto the fragment and leave a corrupt line in the middle of the file
            self.log(0, "telemetry/torn_tail_bytes_dropped", float(self.torn_tail_bytes))

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def log(self, step: int, metric: str, value: float, **extra: Any) -> dict[str, Any] | None:
        """Write one MetricEvent; returns it (``None`` on a non-main process or after close)."""
        if not self._fh:
            return None
        event = metric_event(step, metric, value, **extra)
        line = json.dumps(event, allow_nan=False, default=str) + "\n"
        with self._lock:
            if not self._fh:
                return None
            self._fh.write(line)
            self.events_written += 1
            self._pending += 1
            if self._pending >= self.flush_every:
                self._fh.flush()
                self._pending = 0
        self._notify(event)
        return event

    def log_many(self, step: int, metrics: dict[str, float], **extra: Any) -> None:
        for name, value in metrics.items():
            self.log(step, name, value, **extra)

    def flush(self) -> None:
        """Hand buffered lines to the OS (cheap; no fsync)."""
        with self._lock:
            if self._fh:
                self._fh.flush()
                self._pending = 0

    def sync(self) -> None:
        """Flush and fsync: after this returns, every logged event survives a power cut."""
        with self._lock:
            if self._fh:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._pending = 0

    def close(self) -> None:
        if self._fh:
            self.sync()
            with self._lock:
                if self._fh:
                    self._fh.close()
                    self._fh = None

    def _notify(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a mirror must never break training
                self._listeners.remove(listener)
                self.listener_errors.append(f"{getattr(listener, '__qualname__', listener)!s}: {exc!r}")

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> int:
    """Cut an existing JSONL file back to its last complete line; returns the bytes removed."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        fh.seek(max(0, size - 1))
        if fh.read(1) == b"\n":
            return 0
        # scan back for the last newline (records are short: read in 64 KiB blocks)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        else:
            keep = 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


def append_jsonl(path: Path, record: dict[str, Any], *, fsync: bool = True) -> None:
    """Append one record as one line with a single ``write`` (O_APPEND), optionally fsynced.

    Used for low-rate histories (telegrams, operator commands) where every line matters.
    Non-finite floats are refused (``allow_nan=False``): encode them first.
    """
    line = (json.dumps(record, allow_nan=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "SCHEMA_VERSION",
    "MetricWriter",
    "append_jsonl",
    "decode_value",
    "metric_event",
    "non_finite_label",
    "utc_now",
    "write_json_atomic",
]
