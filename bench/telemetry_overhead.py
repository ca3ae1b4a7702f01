"""Telemetry overhead per training step, and sink throughput.

What a training step pays for telemetry and safety, measured directly: the per-step work of a
stage (3 MetricEvents through ``MetricWriter``, ``SafetyCallback.on_step_end`` polling
``control.jsonl``, ``SafetyCallback.on_log`` running the envelope and writing the telegram)
is timed around the real calls while a tiny Llama trains with a plain torch loop, and compared
with the median time of the training step itself. The direct measurement is used (rather than
A/B wall time of two runs) because on a shared CPU run-to-run noise is larger than the effect.
Logging every step is the worst case; ``logging_steps`` > 1 divides the on_log part.

Also measured: events/s written by ``MetricWriter``, read back by ``read_jsonl``, accepted by
``RemoteSink.submit`` with its collector down (the training-side cost of remote aggregation).

    python bench/telemetry_overhead.py            # full
    python bench/telemetry_overhead.py --quick    # smoke mode (seconds)

Prints one JSON line and writes bench/results/telemetry_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS = Path(__file__).resolve().parent / "results" / "telemetry_overhead.json"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def measure_step_overhead(run_dir: Path, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.trainer_callback import TrainerControl, TrainerState

    from scaler_wizard.safety.envelope import SafetyEnvelope
    from scaler_wizard.safety.telegrams import ControlInbox, TelegramWriter
    from scaler_wizard.telemetry.reader import read_jsonl
    from scaler_wizard.telemetry.sink import MetricWriter
    from scaler_wizard.training.safety_callback import SafetyCallback

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, length, vocab = 4, 128, 256
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=length)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)  # a fresh batch each step, as in real training

    writer = MetricWriter(run_dir / "metrics.jsonl")
    safety = SafetyCallback(SafetyEnvelope(), TelegramWriter(run_dir), inbox=ControlInbox(run_dir / "control.jsonl"),
                            stage=1, tokens_per_step=batch * length, metric_writer=writer)
    args = SimpleNamespace(device=None, logging_nan_inf_filter=False)
    state, control = TrainerState(), TrainerControl()
    safety.on_train_begin(args, state, control)

    step_s, metrics_s, step_end_s, on_log_s = [], [], [], []
    for step in range(1, warmup + steps + 1):
        ids = torch.randint(0, vocab, (batch, length), generator=data)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_v, gn_v = float(loss.detach()), float(grad_norm)
        t1 = time.perf_counter()
        state.global_step = step
        writer.log_many(step, {"train/loss": loss_v, "train/grad_norm": gn_v, "train/lr": 1e-3}, stage=1)
        t2 = time.perf_counter()
        safety.on_step_end(args, state, control)
        t3 = time.perf_counter()
        safety.on_log(args, state, control, logs={"loss": loss_v, "grad_norm": gn_v, "learning_rate": 1e-3})
        t4 = time.perf_counter()
        if step > warmup:
            step_s.append(t1 - t0)
            metrics_s.append(t2 - t1)
            step_end_s.append(t3 - t2)
            on_log_s.append(t4 - t3)
    writer.close()
    if safety.requested_action is not None:
        raise RuntimeError(f"the envelope stopped a healthy benchmark run: {safety.stop_reason}")

    med = statistics.median
    step_ms = 1e3 * med(step_s)
    parts_ms = {"metric_events": 1e3 * med(metrics_s), "control_poll": 1e3 * med(step_end_s),
                "envelope_and_telegram": 1e3 * med(on_log_s)}
    total_ms = 1e3 * med([a + b + c for a, b, c in zip(metrics_s, step_end_s, on_log_s)])
    return {
        "model": "llama 2x64, vocab 256", "tokens_per_step": batch * length, "threads": threads,
        "steps_measured": steps, "step_ms_median": round(step_ms, 3),
        "telemetry_ms_per_step_median": round(total_ms, 4),
        "telemetry_ms_per_step_p90": round(1e3 * sorted(a + b + c for a, b, c in zip(metrics_s, step_end_s, on_log_s))
                                           [int(0.9 * (len(step_s) - 1))], 4),
        "parts_ms_median": {k: round(v, 4) for k, v in parts_ms.items()},
        "parts_ms_p90": {k: round(1e3 * sorted(v)[int(0.9 * (len(v) - 1))], 4) for k, v in
                         (("metric_events", metrics_s), ("control_poll", step_end_s), ("envelope_and_telegram", on_log_s))},
        "overhead_pct_logging_every_step": round(100 * total_ms / step_ms, 3),
        # the mean includes the steps that wrote a warn telegram (file replace + history line)
        "overhead_pct_mean_logging_every_step": round(
            100 * statistics.fmean([a + b + c for a, b, c in zip(metrics_s, step_end_s, on_log_s)])
            / statistics.fmean(step_s), 3),
        "warn_telegrams": sum(1 for t in read_jsonl(safety.telegrams.history_path).records if t["action"] == "warn")
        if safety.telegrams.history_path.exists() else 0,
        "overhead_pct_logging_steps_5": round(100 * (parts_ms["metric_events"] + parts_ms["control_poll"]
                                                     + parts_ms["envelope_and_telegram"] / 5) / step_ms, 3),
    }


def measure_throughput(run_dir: Path, events: int) -> dict:
    from scaler_wizard.telemetry.reader import read_jsonl
    from scaler_wizard.telemetry.remote import RemoteSink, RemoteSinkConfig
    from scaler_wizard.telemetry.sink import MetricWriter

    path = run_dir / "throughput.jsonl"
    t0 = time.perf_counter()
    with MetricWriter(path) as w:
        for i in range(events):
            w.log(i, "train/loss", 1.0 + i * 1e-6, stage=0)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = read_jsonl(path)
    read_s = time.perf_counter() - t0
    if len(result.records) != events:
        raise RuntimeError(f"read back {len(result.records)} of {events} events")

    sink = RemoteSink(RemoteSinkConfig(url=f"http://127.0.0.1:{_free_port()}/", queue_size=1000, timeout_s=0.2))
    event = result.records[0]
    t0 = time.perf_counter()
    for _ in range(events):
        sink.submit(event)
    submit_s = time.perf_counter() - t0
    stats = sink.close(timeout_s=0.5)
    return {
        "events": events,
        "sink_events_per_s": round(events / write_s),
        "reader_events_per_s": round(events / read_s),
        "remote_submit_events_per_s_collector_down": round(events / submit_s),
        "remote_dropped_collector_down": stats.dropped,
        "bytes_per_event": round(path.stat().st_size / events, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: few steps and events")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the training step")
    parser.add_argument("--output", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    steps, warmup, events = (30, 5, 20_000) if ns.quick else (300, 20, 200_000)
    with tempfile.TemporaryDirectory(prefix="sw-telemetry-bench-") as tmp:
        run_dir = Path(tmp)
        overhead = measure_step_overhead(run_dir, steps, warmup, ns.threads)
        throughput = measure_throughput(run_dir, events)
    result = {
        "bench": "telemetry_overhead",
        "mode": "quick" if ns.quick else "full",
        "target_overhead_pct": 1.0,
        "meets_target": overhead["overhead_pct_logging_every_step"] < 1.0,
        **overhead,
        **throughput,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
