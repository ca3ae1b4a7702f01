"""Telemetry Sink: writer, torn-line tolerant reader, follow, schemas, remote sink."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from scaler_wizard.telemetry.reader import (
    JsonlTail,
    TelemetryReadError,
    event_value,
    follow,
    latest_values,
    read_jsonl,
    read_metrics,
)
from scaler_wizard.telemetry.remote import RemoteSink, RemoteSinkConfig, anonymise
from scaler_wizard.telemetry.schemas import (
    TelemetrySchemaError,
    load_schema,
    schema_problems,
    validate,
    validate_events,
    validate_run_dir,
)
from scaler_wizard.telemetry.sink import MetricWriter, append_jsonl, metric_event, write_json_atomic


def write_events(path: Path, n: int) -> list[dict]:
    with MetricWriter(path, flush_every=4) as w:
        for i in range(n):
            w.log(i, "train/loss", 2.0 - 0.01 * i, stage=1, note="grüße ✓" if i % 3 == 0 else None)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- writer --------------------------------------------------------------------------------------


def test_non_finite_values_are_recorded_explicitly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricWriter(path) as w:
        for v in (1.5, float("nan"), float("inf"), float("-inf")):
            w.log(3, "train/loss", v)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON on every line
    records = read_metrics(path).records
    assert [r.get("non_finite") for r in records] == [None, "nan", "inf", "-inf"]
    assert all(r["value"] is None for r in records[1:])
    values = [event_value(r) for r in records]
    assert values[0] == 1.5 and math.isnan(values[1]) and values[2] == math.inf and values[3] == -math.inf
    assert validate_events(records) == 4


def test_only_main_process_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricWriter(path, is_main_process=False)
    assert w.log(1, "train/loss", 1.0) is None
    w.close()
    assert not path.exists()


def test_flush_every_and_sync(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricWriter(path, flush_every=3)
    w.log(0, "a/b", 1.0)
    w.log(1, "a/b", 1.0)
    assert path.read_text() == ""  # buffered
    w.log(2, "a/b", 1.0)
    assert len(path.read_text().splitlines()) == 3  # flushed at the third
    w.log(3, "a/b", 1.0)
    w.sync()
    assert len(path.read_text().splitlines()) == 4
    w.close()
    assert w.events_written == 4


def test_failing_listener_is_dropped_not_fatal(tmp_path):
    seen = []

    def bad(event):
        raise RuntimeError("mirror down")

    with MetricWriter(tmp_path / "m.jsonl", listeners=[bad, seen.append]) as w:
        w.log(1, "train/loss", 1.0)
        w.log(2, "train/loss", 0.9)
    assert [e["step"] for e in seen] == [1, 2]
    assert len(w.listener_errors) == 1 and "mirror down" in w.listener_errors[0]


def test_write_json_atomic_and_append_jsonl(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    append_jsonl(tmp_path / "h.jsonl", {"n": 1})
    append_jsonl(tmp_path / "h.jsonl", {"n": 2}, fsync=False)
    assert read_jsonl(tmp_path / "h.jsonl").records == [{"n": 1}, {"n": 2}]
    with pytest.raises(ValueError):
        append_jsonl(tmp_path / "h.jsonl", {"n": float("nan")})


# -- reader --------------------------------------------------------------------------------------


def test_torn_last_line_at_every_byte_offset_of_last_three_records(tmp_path):
    source = tmp_path / "full.jsonl"
    expected = write_events(source, 12)
    data = source.read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]  # offset after each record
    assert len(ends) == 12
    start = ends[-4]  # first byte of the third-to-last record
    torn = tmp_path / "torn.jsonl"
    checked = 0
    for cut in range(start, len(data) + 1):
        torn.write_bytes(data[:cut])
        result = read_jsonl(torn)
        complete = sum(1 for e in ends if e <= cut)
        assert result.records == expected[:complete], cut
        assert result.corrupt == [], cut
        assert result.torn_tail_bytes == cut - (ends[complete - 1] if complete else 0)
        assert result.complete_bytes == (ends[complete - 1] if complete else 0)
        checked += 1
    assert checked == len(data) - start + 1 and checked > 150


def test_corrupt_lines_reported_with_line_numbers(tmp_path):
    path = tmp_path / "m.jsonl"
    good = [json.dumps(metric_event(i, "train/loss", 1.0)) for i in range(3)]
    lines = [good[0].encode(), b"{not json", good[1].encode(), b"[1, 2]", b"", b"\xff\xfe", good[2].encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_jsonl(path)
    assert [r["step"] for r in result.records] == [0, 1, 2]
    assert result.line_numbers == [1, 3, 7]
    assert [c.line_number for c in result.corrupt] == [2, 4, 6]
    assert "not JSON" in result.corrupt[0].reason
    assert "list" in result.corrupt[1].reason
    assert "UTF-8" in result.corrupt[2].reason
    assert not result.ok and "line 2" in result.describe_problems()


def test_missing_file_is_a_typed_error(tmp_path):
    with pytest.raises(TelemetryReadError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_latest_values(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricWriter(path) as w:
        w.log(1, "train/loss", 2.0)
        w.log(2, "train/loss", float("nan"))
        w.log(2, "eval/perplexity@64", 9.0)
    latest = latest_values(read_jsonl(path).records)
    assert math.isnan(latest["train/loss"]) and latest["eval/perplexity@64"] == 9.0


def test_tail_holds_back_partial_line_and_restarts_on_replace(tmp_path):
    path = tmp_path / "live.jsonl"
    tail = JsonlTail(path)
    assert tail.poll() == []  # not there yet
    with open(path, "ab") as fh:
        fh.write(b'{"a": 1}\n{"a": ')
    assert tail.poll() == [{"a": 1}]
    assert tail.poll() == []  # the partial line waits
    with open(path, "ab") as fh:
        fh.write(b'2}\nbroken\n{"a": 3}\n')
    assert tail.poll() == [{"a": 2}, {"a": 3}]
    assert [c.line_number for c in tail.corrupt] == [3]
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(b'{"b": 1}\n')
    replacement.replace(path)  # a new file under the same name
    assert tail.poll() == [{"b": 1}]


def test_tail_from_end_skips_existing(tmp_path):
    path = tmp_path / "live.jsonl"
    path.write_bytes(b'{"old": 1}\n{"old": ')
    tail = JsonlTail(path, from_start=False)
    with open(path, "ab") as fh:
        fh.write(b'2}\n{"new": 1}\n')
    assert tail.poll() == [{"old": 2}, {"new": 1}]  # the line that was torn at start is delivered whole


def test_follow_yields_records_as_they_arrive(tmp_path):
    path = tmp_path / "live.jsonl"

    def writer():
        with MetricWriter(path, flush_every=1) as w:
            for i in range(5):
                w.log(i, "train/loss", float(i))
                time.sleep(0.02)

    t = threading.Thread(target=writer)
    t.start()
    got = [r["step"] for r in follow(path, poll_interval_s=0.01, idle_timeout_s=1.0)]
    t.join()
    assert got == [0, 1, 2, 3, 4]


# -- schemas -------------------------------------------------------------------------------------


def envelope_like_pipeline() -> dict:
    """The keys pipeline.py writes into envelope.json."""
    return {
        "schema_version": 1, "run_id": "demo-20260101T000000Z", "config": {"run": {"seed": 1}},
        "recipe_digest": "abc123", "hardware": {"cpu_count": 2}, "metrics_path": "metrics.jsonl",
        "telegram_path": "telegram.json", "created_at": "2026-01-01T00:00:00.000000Z",
        "package_version": "0.1.0", "model_path": "/models/demo", "base_length": 256, "stages": [512, 1024],
    }


def test_schemas_carry_a_version_and_are_valid_json_schema():
    for name in ("metric_event", "telemetry_envelope", "telegram"):
        assert load_schema(name)["schema_version"] == 1


def test_metric_event_schema_rejects_bad_events():
    assert schema_problems("metric_event", metric_event(1, "eval/perplexity@8192", 5.0, stage=2)) == []
    assert schema_problems("metric_event", {"step": 1, "metric": "x", "value": None,
                                            "timestamp": "2024-05-26T18:42:00Z"})  # null without non_finite
    assert schema_problems("metric_event", {"step": -1, "metric": "x", "value": 1.0,
                                            "timestamp": "2024-05-26T18:42:00Z"})
    assert schema_problems("metric_event", {"step": 1, "metric": "x", "value": 1.0, "timestamp": "yesterday"})
    # the spec's own example, and an unknown key from a newer writer
    assert schema_problems("metric_event", {"step": 123, "metric": "eval/perplexity", "value": 5.42,
                                            "timestamp": "2024-05-26T18:42:00Z", "future_key": [1]}) == []


def test_envelope_schema_accepts_pipeline_envelope_and_reports_all_problems():
    validate("telemetry_envelope", envelope_like_pipeline())
    bad = envelope_like_pipeline()
    del bad["hardware"]
    bad["run_id"] = "a/b"
    with pytest.raises(TelemetrySchemaError) as err:
        validate("telemetry_envelope", bad, source="envelope.json")
    assert len(err.value.problems) == 2 and "hardware" in str(err.value) and "envelope.json" in str(err.value)


def test_validate_run_dir(tmp_path):
    from scaler_wizard.safety.envelope import SafetyEnvelope
    from scaler_wizard.safety.telegrams import TelegramWriter

    write_json_atomic(tmp_path / "envelope.json", envelope_like_pipeline())
    with MetricWriter(tmp_path / "metrics.jsonl") as w:
        w.log(1, "train/loss", float("nan"), stage=0)
        w.log(1, "train/grad_norm", 0.5, stage=0)
    envelope, telegrams = SafetyEnvelope(), TelegramWriter(tmp_path)
    telegrams.write(envelope.observe(1, {"train/loss": 1.0}, stage=0))
    telegrams.write(envelope.observe(2, {"train/loss": float("inf")}, stage=0))
    assert validate_run_dir(tmp_path) == {"envelope": 1, "metric_events": 2, "telegrams": 3}
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "metric": "train/loss", "value": null, "timestamp": "2024-05-26T18:42:00Z"}\n')
    with pytest.raises(TelemetrySchemaError, match="event 3"):
        validate_run_dir(tmp_path)


# -- remote sink ---------------------------------------------------------------------------------


class Collector:
    """A local collector on 127.0.0.1, port chosen by the OS."""

    def __init__(self):
        self.bodies: list[bytes] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.bodies.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def free_port_nobody_listens_on() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_remote_sink_delivers_anonymised_batches():
    collector = Collector()
    try:
        cfg = RemoteSinkConfig(url=collector.url, batch_size=50, flush_interval_s=0.05)
        sink = RemoteSink(cfg, run_id="my-run", model_name="/home/alice/secret-model", data_names=["/data/x.jsonl"])
        with_extras = metric_event(0, "train/loss", 1.0, stage=1, error="/home/alice/path", reasons=["r"])
        for i in range(300):
            assert sink.submit(dict(with_extras, step=i))
        sink.submit(metric_event(300, "train/loss", float("nan")))
        stats = sink.close(timeout_s=5)
    finally:
        collector.close()
    payloads = [json.loads(b) for b in collector.bodies]
    events = [e for p in payloads for e in p["events"]]
    assert stats.sent_events == 301 and stats.dropped == 0 and len(events) == 301
    assert [e["step"] for e in events] == list(range(301))
    assert events[-1]["non_finite"] == "nan" and events[-1]["value"] is None
    assert all(set(e) <= {"step", "metric", "value", "non_finite", "stage", "timestamp"} for e in events)
    raw = b"".join(collector.bodies)
    assert b"alice" not in raw and b"secret-model" not in raw and b"my-run" not in raw
    assert payloads[0]["model"] == anonymise("/home/alice/secret-model") and len(payloads[0]["model"]) == 32
    assert max(len(p["events"]) for p in payloads) <= 50


def test_remote_sink_collector_down_never_slows_training():
    url = f"http://127.0.0.1:{free_port_nobody_listens_on()}/ingest"
    cfg = RemoteSinkConfig(url=url, batch_size=100, flush_interval_s=0.01, queue_size=500, timeout_s=0.5)
    sink = RemoteSink(cfg, model_name="m")
    event = metric_event(1, "train/loss", 1.0)
    n = 20_000
    t0 = time.perf_counter()
    worst = 0.0
    for _ in range(n):
        t = time.perf_counter()
        sink.submit(event)
        worst = max(worst, time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    t_close = time.perf_counter()
    stats = sink.close(timeout_s=1.0)
    close_s = time.perf_counter() - t_close
    assert elapsed / n < 200e-6, f"{elapsed / n * 1e6:.1f} us per submit"
    assert worst < 0.25  # never waits for the network
    assert close_s < 2.5
    assert stats.sent_events == 0 and stats.dropped == n == stats.submitted
    assert stats.dropped_queue_full > 0 and stats.last_error is not None


def test_remote_sink_hanging_collector_is_bounded():
    # listening socket that never accepts: connect succeeds, the response never comes
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        cfg = RemoteSinkConfig(url=f"http://127.0.0.1:{s.getsockname()[1]}/", flush_interval_s=0.01, timeout_s=0.3)
        sink = RemoteSink(cfg)
        t0 = time.perf_counter()
        for i in range(1000):
            sink.submit(metric_event(i, "train/loss", 1.0))
        submit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = sink.close(timeout_s=0.5)
        assert submit_s < 0.5 and time.perf_counter() - t1 < 1.0
        assert stats.sent_events == 0
    finally:
        s.close()


def test_remote_config_is_off_by_default_and_checks_the_url():
    assert RemoteSinkConfig().enabled is False
    with pytest.raises(ValueError):
        RemoteSink(RemoteSinkConfig())
    with pytest.raises(ValidationError, match="http"):
        RemoteSinkConfig(url="file:///etc/passwd")


def test_writer_reopened_after_a_torn_write_keeps_the_file_parseable(tmp_path):
    from scaler_wizard.telemetry.reader import read_metrics
    from scaler_wizard.telemetry.sink import MetricWriter

    path = tmp_path / "metrics.jsonl"
    with MetricWriter(path) as w:
        w.log(1, "train/loss", 2.0)
        w.log(2, "train/loss", 1.9)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # killed in the middle of the second record
    with MetricWriter(path) as w:
        assert w.torn_tail_bytes == len(whole.splitlines(keepends=True)[1]) - 7
        w.log(2, "train/loss", 1.9)
    result = read_metrics(path)
    assert result.ok and result.torn_tail_bytes == 0
    assert [(e["step"], e["metric"]) for e in result.records] == [
        (1, "train/loss"), (0, "telemetry/torn_tail_bytes_dropped"), (2, "train/loss")]
