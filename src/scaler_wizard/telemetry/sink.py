"""Telemetry Sink: MetricEvent lines in an append-only JSON Lines file.

MetricEvent (spec data contract, extended compatibly with optional keys):
    {"step": 123, "metric": "eval/perplexity@1024", "value": 5.42,
     "timestamp": "2024-05-26T18:42:00Z", "stage": 2}
A non-finite value is written as ``"value": null`` with ``"non_finite": "nan" | "inf" | "-inf"``
so that the line stays valid JSON and the event is never dropped.
Only the main process writes (``is_main_process=False`` makes every call a no-op).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def metric_event(step: int, metric: str, value: float, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"step": int(step), "metric": metric, "timestamp": utc_now()}
    v = float(value)
    if math.isfinite(v):
        event["value"] = v
    else:
        event["value"] = None
        event["non_finite"] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    event.update({k: v for k, v in extra.items() if v is not None})
    return event


class MetricWriter:
    """Append-only writer; flushes every ``flush_every`` events and fsyncs on ``sync``/``close``."""

    def __init__(self, path: Path, *, is_main_process: bool = True, flush_every: int = 32):
        self.path = Path(path)
        self.enabled = is_main_process
        self.flush_every = flush_every
        self._pending = 0
        self._fh = open(self.path, "a", encoding="utf-8") if self.enabled else None

    def log(self, step: int, metric: str, value: float, **extra: Any) -> None:
        if not self._fh:
            return
        self._fh.write(json.dumps(metric_event(step, metric, value, **extra), allow_nan=False) + "\n")
        self._pending += 1
        if self._pending >= self.flush_every:
            self._fh.flush()
            self._pending = 0

    def log_many(self, step: int, metrics: dict[str, float], **extra: Any) -> None:
        for name, value in metrics.items():
            self.log(step, name, value, **extra)

    def sync(self) -> None:
        if self._fh:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._pending = 0

    def close(self) -> None:
        if self._fh:
            self.sync()
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file, fsync, then rename over ``path`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
