"""Does watching a run slow it down? Training step time with 20 event-stream clients vs none.

Set-up (the harsher of the two ways the cockpit runs): the cockpit server runs as a thread *inside*
the training process (as ``scaler-wizard run --cockpit`` would), so its event loop competes with
training for the GIL; the 20 SSE clients run in a separate process (httpx, asyncio) and count
the events they receive. The training loop is a tiny Llama (transformers) trained with AdamW on
random tokens; every ``--log-every`` steps it appends train/loss, train/tokens_per_s and
system/peak_rss_gb to metrics.jsonl, as the pipeline does, so the clients have a live stream.

Phases alternate none / clients / none / clients ... (each ``--steps`` steps after a warm-up) so
slow drift of a shared machine hits both conditions alike; the figure is the ratio of median step
times. Pass: within 5 %.

    nice -n 19 .venv/bin/python bench/cockpit_load.py --quick   # 2 + 2 phases of 40 steps
    nice -n 19 .venv/bin/python bench/cockpit_load.py           # 4 + 4 phases of 120 steps

One JSON line on stdout; the same object in ``--out`` (default bench/results/cockpit_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


# ============================================================================ child: the SSE clients


async def _client(url: str, token: str, counts: list[int], idx: int, ready: asyncio.Event, n_ready: list[int],
                  total: int) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=None) as http, http.stream("GET", url, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("event: hello"):
                n_ready[0] += 1
                if n_ready[0] == total:
                    ready.set()
            elif line.startswith("event:"):
                counts[idx] += 1


async def _clients_main(url: str, token: str, n: int) -> None:
    counts, n_ready, ready = [0] * n, [0], asyncio.Event()
    tasks = [asyncio.create_task(_client(url, token, counts, i, ready, n_ready, n)) for i in range(n)]
    await asyncio.wait_for(ready.wait(), timeout=60)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the parent says stop
    for t in tasks:
        t.cancel()
    print(json.dumps({"events": counts}), flush=True)


# ============================================================================ parent: training + server


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_steps(model, opt, n: int, args, writer, step0: int) -> list[float]:
    import torch

    times = []
    for i in range(n):
        t0 = time.perf_counter()
        ids = torch.randint(0, 512, (args.batch, args.seq))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        times.append(dt)
        step = step0 + i + 1
        if step % args.log_every == 0:
            writer.log_many(step, {"train/loss": float(loss.detach()), "train/tokens_per_s": args.batch * args.seq / dt,
                                   "system/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
            writer.sync()
    return times


def start_clients(url: str, token: str, n: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--clients-child", url, token, str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"SSE clients did not connect (got {line!r})")
    return proc


def stop_clients(proc: subprocess.Popen) -> int:
    out, _ = proc.communicate("stop\n", timeout=30)
    return sum(json.loads(out.strip().splitlines()[-1])["events"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--phases", type=int, default=None, help="phases per condition")
    p.add_argument("--steps", type=int, default=None, help="training steps per phase")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cockpit_load.json")
    p.add_argument("--clients-child", nargs=3, metavar=("URL", "TOKEN", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clients_child:
        url, token, n = args.clients_child
        asyncio.run(_clients_main(url, token, int(n)))
        return
    phases = args.phases or (2 if args.quick else 4)
    steps = args.steps or (40 if args.quick else 120)

    import torch

    from scaler_wizard.cockpit.server import CockpitServer
    from scaler_wizard.telemetry.sink import MetricWriter, write_json_atomic

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "bench-run"
        run.mkdir(parents=True)
        write_json_atomic(run / "status.json", {"state": "running", "stage": 1, "stages": 1, "length": args.seq})
        server = CockpitServer(run.parent).start()
        url = f"{server.base_url}/api/runs/bench-run/events"
        model, opt = build_model(args)
        step_times: dict[str, list[float]] = {"none": [], "clients": []}
        events = 0
        t_clients = 0.0
        with MetricWriter(run / "metrics.jsonl") as writer:
            step = 0
            train_steps(model, opt, args.warmup, args, writer, step)
            step += args.warmup
            for _ in range(phases):
                step_times["none"] += train_steps(model, opt, steps, args, writer, step)
                step += steps
                proc = start_clients(url, server.token, args.clients)
                t0 = time.perf_counter()
                step_times["clients"] += train_steps(model, opt, steps, args, writer, step)
                t_clients += time.perf_counter() - t0
                step += steps
                events += stop_clients(proc)
        server.stop()

    med = {k: statistics.median(v) for k, v in step_times.items()}
    mean = {k: statistics.fmean(v) for k, v in step_times.items()}
    overhead = (med["clients"] / med["none"] - 1) * 100
    result = {
        "bench": "cockpit_load", "mode": "quick" if args.quick else "full",
        "clients": args.clients, "phases_per_condition": phases, "steps_per_phase": steps,
        "model": f"llama 2x128, vocab 512, batch {args.batch} x {args.seq} tokens", "torch_threads": args.threads,
        "median_step_ms": {k: round(v * 1000, 2) for k, v in med.items()},
        "mean_step_ms": {k: round(v * 1000, 2) for k, v in mean.items()},
        "overhead_pct_median": round(overhead, 2),
        "overhead_pct_mean": round((mean["clients"] / mean["none"] - 1) * 100, 2),
        "within_5pct": overhead <= 5.0,
        "events_received": events,
        "events_per_client_per_s": round(events / args.clients / t_clients, 2) if t_clients else None,
        "setup": "cockpit server thread inside the training process; SSE clients in a separate process",
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
    }
    line = json.dumps(result)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
