"""Opt-in remote aggregation of telemetry (the spec's open question 3), off by default.

Nothing here runs unless a recipe names a collector URL. When it does, the sink:

* never blocks training: :meth:`RemoteSink.submit` is a ``put_nowait`` on a bounded queue;
  when the queue is full the event is dropped and counted, never waited for;
* sends from one daemon thread, in batches (JSON ``POST`` with ``urllib``, a short timeout);
  a batch the collector does not accept is dropped and counted, and the thread backs off
  (doubling up to ``max_backoff_s``) so a dead collector costs almost nothing;
* anonymises: model and data names are replaced by salted SHA-256 digests (:func:`anonymise`),
  the run id by a digest too, and only whitelisted event keys (step, metric, value,
  non_finite, stage, timestamp) leave the machine — free-form extras such as error messages
  or reasons may hold paths and are never sent.

Payload (``schema_version`` 1)::

    {"schema_version": 1, "run": "<digest>", "model": "<digest>", "data": ["<digest>", ...],
     "package_version": "...", "sent_at": "...", "events": [MetricEvent, ...]}
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import __version__
from .sink import utc_now

PAYLOAD_SCHEMA_VERSION = 1
SENT_EVENT_KEYS = ("step", "metric", "value", "non_finite", "stage", "timestamp")
DEFAULT_SALT = "scaler-wizard/remote/v1"


class RemoteSinkConfig(BaseModel):
    """Recipe section for the remote sink (``telemetry.remote``); disabled unless ``url`` is set."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="collector endpoint (http/https); None = off")
    batch_size: int = Field(256, ge=1, le=100_000, description="events per POST at most")
    flush_interval_s: float = Field(2.0, gt=0, le=3600, description="longest wait before a partial batch is sent")
    queue_size: int = Field(10_000, ge=1, description="events held in memory; when full, new events are dropped "
                            "and counted (training never waits)")
    timeout_s: float = Field(2.0, gt=0, le=60, description="per POST; bounds how long close() can wait")
    max_backoff_s: float = Field(60.0, gt=0, description="longest pause after failed sends (the pause doubles)")
    salt: str = Field(DEFAULT_SALT, min_length=1,
                      description="salt of the name digests; keep the default to aggregate across users")

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://collector.example/ingest")
        return v

    @property
    def enabled(self) -> bool:
        return self.url is not None


def anonymise(name: str | None, salt: str = DEFAULT_SALT) -> str | None:
    """Salted SHA-256 of a model/data/run name (hex, 16 bytes): equal names aggregate, the
    name itself (which may be a private path) never leaves the machine."""
    if name is None:
        return None
    return hashlib.sha256(f"{salt}\x00{name}".encode()).hexdigest()[:32]


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """Only the whitelisted keys of a MetricEvent."""
    return {k: event[k] for k in SENT_EVENT_KEYS if k in event}


@dataclass
class RemoteSinkStats:
    submitted: int = 0
    sent_events: int = 0
    sent_batches: int = 0
    dropped_queue_full: int = 0
    dropped_send_failed: int = 0
    dropped_on_close: int = 0
    failed_batches: int = 0
    last_error: str | None = None

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_send_failed + self.dropped_on_close


class RemoteSink:
    """Background batching POST sink. Use as a :class:`MetricWriter` listener:
    ``writer.add_listener(sink.submit)``; call :meth:`close` at the end of the run."""

    def __init__(
        self,
        config: RemoteSinkConfig,
        *,
        run_id: str | None = None,
        model_name: str | None = None,
        data_names: Iterable[str] = (),
    ):
        if not config.enabled:
            raise ValueError("RemoteSink needs config.url; the remote sink is off by default")
        self.config = config
        self.stats = RemoteSinkStats()
        self._header = {
            "schema_version": PAYLOAD_SCHEMA_VERSION,
            "run": anonymise(run_id, config.salt),
            "model": anonymise(model_name, config.salt),
            "data": [anonymise(d, config.salt) for d in data_names],
            "package_version": __version__,
        }
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._backoff_until = 0.0
        self._backoff_s = 0.0
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="scaler-wizard-remote-sink", daemon=True)
        self._thread.start()

    # -- producer side (training thread): never blocks -------------------------------------
    def submit(self, event: dict[str, Any]) -> bool:
        """Queue one event; ``False`` (and counted) when the queue is full or the sink closed."""
        with self._stats_lock:
            self.stats.submitted += 1
        if self._stop.is_set():
            with self._stats_lock:
                self.stats.dropped_on_close += 1
            return False
        try:
            self._queue.put_nowait(scrub_event(event))
            return True
        except queue.Full:
            with self._stats_lock:
                self.stats.dropped_queue_full += 1
            return False

    __call__ = submit

    # -- consumer side (daemon thread) ------------------------------------------------------
    def _take_batch(self, wait_s: float) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while len(batch) < self.config.batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    batch.append(self._queue.get_nowait())
                else:
                    # short slices so close() is noticed promptly
                    batch.append(self._queue.get(timeout=min(remaining, 0.05)))
            except queue.Empty:
                if remaining <= 0 or self._stop.is_set():
                    break
        return batch

    def _post(self, batch: list[dict[str, Any]]) -> None:
        payload = dict(self._header, sent_at=utc_now(), events=batch)
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        request = urllib.request.Request(
            self.config.url or "", data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"scaler-wizard/{__version__}"},
        )
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(self.config.url, response.status, "collector refused", None, None)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        if time.monotonic() < self._backoff_until:
            with self._stats_lock:
                self.stats.dropped_send_failed += len(batch)
                self.stats.failed_batches += 1
            return
        try:
            self._post(batch)
        except Exception as exc:  # noqa: BLE001 - network errors of every kind: count, back off, go on
            self._backoff_s = min(self.config.max_backoff_s, max(0.5, 2 * self._backoff_s))
            self._backoff_until = time.monotonic() + self._backoff_s
            with self._stats_lock:
                self.stats.dropped_send_failed += len(batch)
                self.stats.failed_batches += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            return
        self._backoff_s = 0.0
        with self._stats_lock:
            self.stats.sent_events += len(batch)
            self.stats.sent_batches += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch(self.config.flush_interval_s)
            if batch:
                self._send(batch)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self, timeout_s: float | None = None) -> RemoteSinkStats:
        """Send what is queued (within ``timeout_s``, default 2 POST timeouts), stop the thread,
        count whatever could not be sent. Never waits longer than the timeout."""
        timeout = 2 * self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        # drain in this thread while time is left (the worker has stopped taking batches)
        while not self._thread.is_alive() and time.monotonic() < deadline:
            batch = self._take_batch(0)
            if not batch:
                break
            self._send(batch)
        leftover = self._queue.qsize()
        with self._stats_lock:
            self.stats.dropped_on_close += leftover
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        return self.stats

    def stats_dict(self) -> dict[str, Any]:
        with self._stats_lock:
            out = asdict(self.stats)
            out["dropped"] = self.stats.dropped
        return out


__all__ = ["RemoteSink", "RemoteSinkConfig", "RemoteSinkStats", "anonymise", "scrub_event"]
