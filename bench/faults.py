"""Fault injection for exact resume, the safety envelope and the Checkpoint Cache (issue 6).

One JSON line on stdout, the same object in bench/results/faults.json (faults_quick.json with
``--quick``). Sections:

* **pipeline_kills** (the headline kill figure) -- the real product path. A tiny random Llama
  (2 layers, hidden 64, 4 heads, the demo tokenizer) is scaled 64 -> 128 -> 256 tokens by
  ``scaler-wizard run RECIPE --self-approve`` (LoRA with dropout, cosine LR with warm-up, a
  resumable snapshot every 2 steps). The uninterrupted run is the reference. In each kill trial
  the same recipe runs as a subprocess and is SIGKILLed at random moments after training
  started -- in half of the trials inside a snapshot commit (``SCALER_WIZARD_FAULT_COMMIT_SLEEP``
  widens the commit phases; the kill is sent while the commit's staging folder exists under
  ``runs/.checkpoints/tmp``) -- then continued with ``scaler-wizard run --resume RUN_DIR
  --self-approve``, which may itself be killed again, until ``status.json`` says completed.
  For every resume the snapshot it chose (``status.json`` "resumes") is checked with
  ``CheckpointCache.verify``; at the end every ``train/loss`` line any process of the trial
  wrote must equal the reference's loss at that step (exact float equality), and so must the
  final probe figures.
* **nan_rollback** -- in this process: ``ScalingTrainer.compute_loss`` returns NaN at global
  step k of the first attempt; the recipe's ``safety.policy.on_stop`` is ``rollback``. The first
  stop telegram must be at step k, the rollback recorded, the run completed with a finite loss.
* **loss_spikes** -- the envelope replayed (``SafetyEnvelope.observe`` with ``train/loss`` and
  ``train/grad_norm`` per logged step, ``begin_stage`` per stage, as ``SafetyCallback`` does)
  over clean per-step series of real runs (false-positive rate), and over the same series with
  a loss spike (x3, x10 at one step; x3 for 3 steps in a row) injected at random steps
  (detection rate and delay). Detection is reported over all injected spikes (every position in
  the stage, the envelope's warm-up included) and over those after the warm-up, both at
  ``logging_steps: 1`` and at the demo recipe's ``training.logging_steps`` (read from
  recipes/demo.yaml; the envelope then sees each window's mean loss, ``headline_detection``).
* **telemetry_truncation** -- real telemetry files (the reference run's metrics.jsonl, the NaN
  run's telegrams.jsonl) cut at every byte offset of their last 3 records: ``read_jsonl`` and
  ``JsonlTail`` must raise nothing, report no corrupt line and return exactly the complete
  records. (tests/test_telemetry.py checks the same on synthetic events.)
* **raw_loop_kills** -- the earlier, narrower kill figure: a raw torch loop (frozen base +
  trainable head, dropout, AdamW) saving through ``cache/state.py``; no Trainer, no pipeline.
* **bitflips** (one random bit flipped in every file of every snapshot of the raw-loop and the
  pipeline reference runs), **enospc** (ENOSPC at every write of a commit), **rollback** latency
  of a ``--big-mb`` snapshot by hardlink vs copy, **dedup** (bytes stored once vs logical).

Run:  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/faults.py    (full: 24 + 24 kills, 500 MB snapshot;
                                                                      18 min on 2 cores shared with other jobs)
      OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py --quick      (smoke: 3 + 2 kills, 16 MB; ~170 s of CPU,
                                                                      2-3 min beside other jobs)
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# `python bench/faults.py` puts bench/ first on sys.path, where bench/multiprocess.py would shadow the
# `multiprocess` package that `datasets` imports. Nothing here imports a module from bench/.
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != Path(__file__).resolve().parent]
STATIC_CONFIG = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["head"]}, sort_keys=True).encode()
DEMO_MODEL = SRC / "scaler_wizard" / "assets" / "demo_model"
DEMO_DATA = SRC / "scaler_wizard" / "assets" / "demo_data"

# The pipeline scenario: two stages of 12 steps (64 -> 128 -> 256 tokens), a snapshot every 2.
PIPELINE_STEPS = [12, 12]
SNAPSHOT_EVERY = 2
COMMIT_SLEEP_S = 0.03  # per commit phase (each new blob, manifest, marker) when a kill aims at a commit
PROCESS_TIMEOUT_S = 600.0


# ============================================================================ raw loop: child


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from scaler_wizard.cache.checkpoints import PHASE_STAGE_END, CheckpointCache
    from scaler_wizard.cache.state import load_snapshot, save_snapshot

    torch.set_num_threads(1)
    log = open(args.log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open until SIGKILL/exit

    def emit(**event) -> None:
        log.write(json.dumps({**event, "t": time.time()}) + "\n")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g)).squeeze(-1)
    torch.manual_seed(1)  # the frozen "base" is the same in every process, like pretrained weights
    model = torch.nn.Sequential(
        torch.nn.Linear(32, args.width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(args.width, args.width),
        torch.nn.ReLU(),
        torch.nn.Linear(args.width, 1),
    )
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.97**s)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    cache = CheckpointCache(args.cache)
    position, step = {"epoch": 0, "batch": 0}, 0
    batches = 256 // 16
    emit(event="start", pid=os.getpid())
    if args.resume:
        cache.gc()  # drop staging leftovers of the killed process
        snap = cache.latest_valid(args.run)
        if snap is not None:
            restored = load_snapshot(cache, snap, model=model, optimizer=opt, scheduler=sched)
            position, step = restored.data_position, snap.step
        emit(event="resumed", ref=snap.ref if snap else None, step=step)
    while step < args.steps:
        order = torch.randperm(256, generator=torch.Generator().manual_seed(100 + position["epoch"]))
        idx = order[position["batch"] * 16 : (position["batch"] + 1) * 16]
        noise = torch.tensor([random.gauss(0, 0.01) + float(np.random.normal(0, 0.01)) for _ in range(16)])
        loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx] + noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        position["batch"] += 1
        if position["batch"] == batches:
            position.update(epoch=position["epoch"] + 1, batch=0)
        emit(event="loss", step=step, loss=loss.item())
        if step % args.every == 0:
            stage = 1 + (step - 1) // 20
            kw = {
                "model": model,
                "optimizer": opt,
                "scheduler": sched,
                "data_position": position,
                "stage": stage,
                "metrics": {"train/loss": loss.item()},
                "extra_files": {"adapter_config.json": STATIC_CONFIG},
            }
            emit(event="commit_begin", step=step)
            save_snapshot(cache, args.run, step=step, **kw)
            if step % 20 == 0:  # stage boundary: pinned, content identical to the step snapshot
                save_snapshot(cache, args.run, step=step, phase=PHASE_STAGE_END, pinned=True, **kw)
            emit(event="commit_end", step=step)
    emit(event="done", step=step)


# ============================================================================ raw loop: parent


def _read_events(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # torn last line of a killed child
                pass
    return events


def _child_cmd(cache: Path, run: str, log: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--cache",
        str(cache),
        "--run",
        run,
        "--log",
        str(log),
        "--steps",
        str(args.steps),
        "--every",
        str(args.every),
        "--width",
        str(args.width),
    ]
    return cmd + (["--resume"] if resume else [])


def _env(commit_sleep: float, home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["SCALER_WIZARD_FAULT_COMMIT_SLEEP"] = str(commit_sleep) if commit_sleep else ""
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("SCALER_WIZARD_CACHE_DIR", None)  # each run's cache lives beside its run folder
    if home is not None:
        env["SCALER_WIZARD_HOME"] = str(home)  # the self-approval key: never the real home
    return env


def _wait_for(log: Path, proc: subprocess.Popen, predicate, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(predicate(e) for e in _read_events(log)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def _raw_reference(work: Path, args: argparse.Namespace) -> tuple[dict[int, float], Path, float]:
    """The uninterrupted run: per-step losses, its cache, and how long its training loop took."""
    cache, log = work / "reference-cache", work / "reference.jsonl"
    subprocess.run(_child_cmd(cache, "reference", log, args, resume=False), env=_env(0.0), check=True)
    events = _read_events(log)
    if events[-1]["event"] != "done":
        raise RuntimeError("the raw-loop reference run did not complete")
    losses = {e["step"]: e["loss"] for e in events if e["event"] == "loss"}
    return losses, cache, events[-1]["t"] - events[0]["t"]


def _raw_kill_trial(work: Path, trial: int, in_commit: bool, train_s: float, args: argparse.Namespace) -> dict:
    """One run: start, SIGKILL once (inside a commit or at a random moment), resume to the end."""
    rng = random.Random(args.seed * 1000 + trial)
    cache, log = work / f"trial{trial}-cache", work / f"trial{trial}.jsonl"
    run = f"trial{trial}"
    proc = subprocess.Popen(_child_cmd(cache, run, log, args, resume=False), env=_env(args.commit_sleep))
    if not _wait_for(log, proc, lambda e: e["event"] == "start"):
        raise RuntimeError(f"raw-loop trial {trial}: child did not start")
    if in_commit:
        # Wait for the k-th commit to begin, then kill somewhere inside it.
        k = rng.randrange(1, args.steps // args.every + 1) * args.every
        _wait_for(log, proc, lambda e: e["event"] == "commit_begin" and e["step"] == k)
        time.sleep(rng.uniform(0.0, args.commit_sleep * 14))
    else:
        time.sleep(rng.uniform(0.0, train_s))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    events = _read_events(log)
    last = [e for e in events if e["event"] in ("commit_begin", "commit_end", "done")]
    landed_in_commit = bool(last) and last[-1]["event"] == "commit_begin"
    staging = len(list((cache / "tmp").iterdir())) if (cache / "tmp").exists() else 0

    # Audit the cache the killed process left: every complete snapshot must verify.
    from scaler_wizard.cache.checkpoints import CheckpointCache

    c = CheckpointCache(cache)
    complete = c.list(run) if cache.exists() else []
    corrupt_complete = sum(not c.verify(s).ok for s in complete)
    newest_complete = complete[-1].ref if complete else None

    subprocess.run(_child_cmd(cache, run, log, args, resume=True), env=_env(0.0), check=True)
    events = _read_events(log)
    resumed = [e for e in events if e["event"] == "resumed"][-1]
    chosen_ok = resumed["ref"] is None or c.verify(resumed["ref"]).ok
    return {
        "trial": trial,
        "targeted_commit": in_commit,
        "killed_inside_commit": landed_in_commit,
        "staging_leftovers": staging,
        "complete_snapshots": len(complete),
        "corrupt_complete": corrupt_complete,
        "resumed_from": resumed["ref"],
        "resumed_step": resumed["step"],
        "chose_newest_complete": resumed["ref"] == newest_complete,
        "chosen_verifies": chosen_ok,
        "losses": [(e["step"], e["loss"]) for e in events if e["event"] == "loss"],
        "completed": events[-1]["event"] == "done",
    }


def bench_raw_loop_kills(work: Path, args: argparse.Namespace) -> dict:
    """Runs beside the pipeline section (one worker fewer than ``--jobs``; its children are light)."""
    t0 = time.perf_counter()
    reference, ref_cache, train_s = _raw_reference(work, args)
    with ThreadPoolExecutor(max(1, args.jobs - 1)) as pool:
        trials = list(pool.map(lambda i: _raw_kill_trial(work, i, i % 2 == 0, train_s, args), range(args.raw_kills)))
    mismatched = [(t["trial"], s) for t in trials for s, loss in t["losses"] if reference[s] != loss]
    return {
        "reference_cache": ref_cache,
        "result": {
            "what": "raw torch loop (no Trainer, no pipeline) saving through cache/state.py; one kill per trial",
            "kills": len(trials),
            "kills_inside_commit": sum(t["killed_inside_commit"] for t in trials),
            "kills_with_staging_leftovers": sum(t["staging_leftovers"] > 0 for t in trials),
            "corrupted_snapshots_chosen": sum(not t["chosen_verifies"] for t in trials),
            "complete_but_corrupt_snapshots": sum(t["corrupt_complete"] for t in trials),
            "resumed_from_newest_complete": sum(t["chose_newest_complete"] for t in trials),
            "runs_completed": sum(t["completed"] for t in trials),
            "resumed_steps_compared": sum(1 for t in trials for s, _ in t["losses"]),
            "loss_mismatches": len(mismatched),
            "all_resumed_losses_equal": not mismatched and all(t["completed"] for t in trials),
            "steps": args.steps,
            "snapshot_every": args.every,
            "commit_sleep_s": args.commit_sleep,
            "resume_points": sorted({t["resumed_step"] for t in trials}),
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    }


# ============================================================================ pipeline: setup


def build_tiny_model(dest: Path) -> Path:
    """A tiny random Llama with the demo tokenizer, saved as safetensors (built once per bench)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, dest / name)
    tokenizer = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)  # safetensors
    return dest


def write_pipeline_recipe(path: Path, model_dir: Path, runs_dir: Path, run_id: str, *, seed: int = 7,
                          steps: list[int] | None = None, snapshot_every: int = SNAPSHOT_EVERY,
                          safety: dict | None = None, merge: bool = False) -> Path:
    """The recipe of every pipeline scenario (shaped like tests/conftest.py::write_recipe)."""
    import yaml

    recipe = {
        "run": {"name": "faults", "output_dir": str(runs_dir), "seed": seed, "run_id": run_id},
        "model": {"path": str(model_dir)},
        "data": {"train": [str(DEMO_DATA / "heldout.jsonl")], "eval_fraction": 0.2},
        "scaling": {"lora": {"rank": 8, "alpha": 16, "dropout": 0.1}},  # dropout: resume must restore the RNG
        "context": {"target_length": 256, "base_length": 64, "method": "yarn", "schedule": [128, 256],
                    "gate_policy": "continue"},
        "training": {"steps_per_stage": list(steps or PIPELINE_STEPS), "micro_batch_size": 2,
                     "learning_rate": 0.01, "warmup_steps": 3, "lr_scheduler": "cosine", "logging_steps": 1,
                     "snapshot_every": snapshot_every, "threads": 1},
        # a tiny random model fails real gates: gates and the envelope's evaluation rules are kept
        # out of the way here (the subject is resume), as in tests/conftest.py::write_recipe
        "evaluation": {"passkey": {"trials": 2, "depths": [0.0, 1.0], "min_accuracy": 0.0},
                       "perplexity": {"windows": 1, "max_ratio_to_base": 1000.0},
                       "short_context": {"max_regression_pct": 1000.0}},
        "safety": {"evaluation": {"perplexity_warn_ratio": None, "perplexity_stop_ratio": None,
                                  "short_context_warn_pct": None, "short_context_stop_pct": None}},
        "output": {"merge": merge},
    }
    if safety:
        recipe["safety"] = {**recipe["safety"], **safety}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def expected_commit_steps(steps: list[int], every: int) -> list[int]:
    """The global step of every snapshot commit the pipeline makes, in order: a pinned stage-start
    snapshot, one every ``every`` steps inside the stage (not at its last step), a pinned
    stage-end snapshot. Checked against the reference run's cache (``commit_steps_as_expected``)."""
    out, start = [], 0
    for n in steps:
        out.append(start)
        out += [start + s for s in range(every, n, every)] if every else []
        out.append(start + n)
        start += n
    return out


def _sw_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scaler_wizard", *args]


def _metric_records(path: Path) -> list[dict]:
    from scaler_wizard.telemetry.reader import read_jsonl

    return read_jsonl(path).records if path.exists() else []


def _loss_lines(run_dir: Path) -> list[tuple[int, float]]:
    """Every ``train/loss`` line of a run, in file order (a resumed run logs replayed steps again)."""
    return [(int(e["step"]), float(e["value"]) if e.get("value") is not None else math.nan)
            for e in _metric_records(run_dir / "metrics.jsonl") if e.get("metric") == "train/loss"]


def _last_per_step(lines: list[tuple[int, float]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for step, value in lines:
        out[step] = value
    return out


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _run_to_end(cmd: list[str], env: dict, log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=PROCESS_TIMEOUT_S,
                              check=False).returncode


def _log_tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def run_clean(work: Path, model_dir: Path, name: str, *, seed: int = 7, steps: list[int] | None = None,
              snapshot_every: int = SNAPSHOT_EVERY) -> Path:
    """One uninterrupted `scaler-wizard run` subprocess; returns its run folder."""
    runs = work / name / "runs"
    recipe = write_pipeline_recipe(work / name / "recipe.yaml", model_dir, runs, name, seed=seed, steps=steps,
                                   snapshot_every=snapshot_every)
    log = work / name / "process.log"
    rc = _run_to_end(_sw_cmd("run", str(recipe), "--self-approve"), _env(0.0, work / "home"), log)
    run_dir = runs / name
    if rc != 0 or _status(run_dir).get("state") != "completed":
        raise RuntimeError(f"clean pipeline run {name} failed (exit {rc}):\n{_log_tail(log)}")
    return run_dir


# ============================================================================ pipeline: kill trials


def _tmp_entries(cache_root: Path, pid: int) -> list[str]:
    """Staging leftovers of process ``pid`` in the cache's tmp/ (commit folders, blob files)."""
    tmp = cache_root / "tmp"
    try:
        return [n for n in os.listdir(tmp) if f".{pid}." in n]
    except FileNotFoundError:
        return []


def _kill_at_random_step(proc, tail, rng, first_step: int, last_step: int) -> dict:
    """Wait for the loss line of a random step t of this process, then kill within one step time."""
    t = rng.randint(first_step, last_step)
    arrivals: list[float] = []
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        for e in tail.poll():
            if e.get("metric") == "train/loss":
                arrivals.append(time.monotonic())
                if int(e["step"]) >= t:
                    step_s = arrivals[-1] - arrivals[-2] if len(arrivals) > 1 else 0.1
                    time.sleep(rng.uniform(0.0, step_s))
                    return {"mode": "random", "after_step": t, "delay_s": None}
        time.sleep(0.003)
    return {"mode": "random", "after_step": t, "missed": True}


def _kill_in_commit(proc, cache_root: Path, run_id: str, rng, candidates: list[int]) -> dict:
    """Wait until the staging folder of a chosen commit exists, then sleep a random part of a
    commit's duration (the median lifetime of this process's earlier staging folders, 0.15 s
    before one was seen) so that the kill lands anywhere from the first blob to the rename. If
    that commit finished during the sleep (stage-boundary commits are shorter), aim again at the
    next commit with a shorter window. Returns when the caller should send the signal."""
    idx = rng.randrange(len(candidates))
    k = candidates[idx]
    occurrence = candidates[: idx + 1].count(k)  # step 12 has two commits: stage end, next stage start
    tmp, mine = cache_root / "tmp", f".{proc.pid}."
    lifetimes: dict[str, list[float]] = {}  # this process's staging folders -> [first seen, last seen]
    deadline = time.monotonic() + PROCESS_TIMEOUT_S

    def poll() -> set[str]:
        try:
            names = {n for n in os.listdir(tmp) if n.startswith(run_id + ".") and mine in n}
        except FileNotFoundError:
            names = set()
        now = time.monotonic()
        for n in names:
            lifetimes.setdefault(n, [now, now])[1] = now
        return names

    def wait_for(accept) -> str | None:
        while time.monotonic() < deadline and proc.poll() is None:
            hits = sorted((n for n in poll() if accept(n)), key=lambda n: lifetimes[n][0])
            if hits:
                return hits[-1]
            time.sleep(0.002)
        return None

    prefix = f"{run_id}.s{k:08d}-"
    target = wait_for(lambda n: n.startswith(prefix) and sum(m.startswith(prefix) for m in lifetimes) >= occurrence)
    shrink, retries = 1.0, 0
    while target is not None:
        finished = [b - a for n, (a, b) in lifetimes.items() if n != target and n not in poll()]
        window = (statistics.median(finished) if finished else 0.15) * shrink
        time.sleep(rng.uniform(0.0, 0.95 * window))
        if target in poll():
            return {"mode": "commit", "commit_step": int(target.split(".")[1][1:9]), "aimed_step": k,
                    "occurrence": occurrence, "window_s": round(window, 3), "retries": retries}
        shrink, retries = shrink * 0.6, retries + 1  # the commit finished first: aim at the next one
        known = set(lifetimes)
        target = wait_for(lambda n, known=known: n not in known)
    return {"mode": "commit", "aimed_step": k, "occurrence": occurrence, "missed": True, "retries": retries}


def pipeline_kill_trial(work: Path, model_dir: Path, trial: int, kills: int, in_commit: bool,
                        args: argparse.Namespace) -> dict:
    """Start the run, SIGKILL it ``kills`` times (resumed each time), then resume to completion."""
    from scaler_wizard.cache.checkpoints import CheckpointCache
    from scaler_wizard.telemetry.reader import JsonlTail, read_jsonl

    rng = random.Random(args.seed * 7919 + trial)
    name = f"trial{trial}"
    runs = work / name / "runs"
    recipe = write_pipeline_recipe(work / name / "recipe.yaml", model_dir, runs, name)
    run_dir, cache_root, log = runs / name, runs / ".checkpoints", work / name / "process.log"
    cache = CheckpointCache(cache_root)
    total = sum(PIPELINE_STEPS)
    commits = expected_commit_steps(PIPELINE_STEPS, SNAPSHOT_EVERY)
    attempts: list[dict] = []
    killed = 0
    resume_step = 0
    error = None
    for attempt in range(kills + 4):  # a kill that misses (process already done) is not retried forever
        record: dict = {"attempt": attempt}
        if attempt == 0:
            cmd = _sw_cmd("run", str(recipe), "--self-approve")
        else:
            # What a resume must choose, computed before it starts: the newest snapshot that verifies.
            predicted = cache.latest_valid(name)
            staging = [n for n in (os.listdir(cache_root / "tmp") if (cache_root / "tmp").exists() else [])
                       if n.startswith(name + ".")]
            complete = cache.list(name)
            record.update(
                predicted=predicted.ref if predicted else None,
                predicted_step=predicted.step if predicted else None,
                incomplete_commits_present=len(staging),
                incomplete_commit_names=staging,
                incomplete_snapshot_folders=len(cache.incomplete(name)),
                complete_snapshots=len(complete),
                complete_but_corrupt=sum(not cache.verify(s).ok for s in complete),
            )
            resume_step = predicted.step if predicted else 0
            cmd = _sw_cmd("run", "--resume", str(run_dir), "--self-approve")
        kill_now = killed < kills and resume_step < total  # resumed at the last step: nothing left to train
        commit_mode = kill_now and in_commit
        candidates = [k for k in commits if k > resume_step]
        if commit_mode and not candidates:
            commit_mode = False
        tail = JsonlTail(run_dir / "metrics.jsonl", from_start=False)
        env = _env(COMMIT_SLEEP_S if commit_mode else 0.0, work / "home")
        t_start = time.perf_counter()
        with open(log, "ab") as out:
            out.write(f"\n===== attempt {attempt}: {' '.join(cmd[2:])}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            if kill_now:
                if commit_mode:
                    plan = _kill_in_commit(proc, cache_root, name, rng, candidates)
                else:
                    plan = _kill_at_random_step(proc, tail, rng, resume_step + 1, total)
                record["plan"] = plan
                alive = proc.poll() is None
                if alive:
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                record["killed"] = alive and proc.returncode == -signal.SIGKILL
            else:
                proc.wait(timeout=PROCESS_TIMEOUT_S)
                record["killed"] = False
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        record["returncode"] = proc.returncode
        record["wall_s"] = round(time.perf_counter() - t_start, 2)
        if record["killed"]:
            killed += 1
            leftovers = _tmp_entries(cache_root, proc.pid)
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            record.update(
                inside_commit=any(n.startswith(name + ".") for n in leftovers),
                staging_leftovers=len(leftovers),
                metrics_reader_errors=len(metrics.corrupt),
                metrics_torn_tail_bytes=metrics.torn_tail_bytes,
                last_logged_step=max((int(e["step"]) for e in metrics.records if e.get("metric") == "train/loss"),
                                     default=0),
            )
        status = _status(run_dir)
        if attempt > 0:
            resumes = status.get("resumes", [])
            chosen = resumes[-1] if len(resumes) == attempt else None
            record["chosen"] = chosen["snapshot"] if chosen else None
            record["chosen_step"] = chosen["step"] if chosen else None
            record["chosen_verifies"] = bool(chosen) and cache.verify(chosen["snapshot"]).ok
            record["chosen_is_predicted"] = bool(chosen) and chosen["snapshot"] == record["predicted"]
        attempts.append(record)
        if not record["killed"]:
            if proc.returncode != 0 or status.get("state") != "completed":
                error = f"attempt {attempt} exited {proc.returncode}, state {status.get('state')}:\n{_log_tail(log)}"
            break
    else:
        error = "the run did not complete"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {
        "trial": trial,
        "targeted_commit": in_commit,
        "planned_kills": kills,
        "attempts": attempts,
        "completed": error is None and _status(run_dir).get("state") == "completed",
        "error": error,
        "loss_lines": _loss_lines(run_dir),
        "final_metrics_reader_errors": len(metrics.corrupt),
        "final": summary.get("final"),
        "total_steps": summary.get("total_steps"),
    }


def bench_pipeline(work: Path, args: argparse.Namespace) -> dict:
    """Reference run, clean seeds, kill trials (subprocesses, ``args.jobs`` at a time) and, in
    this process meanwhile, the NaN -> rollback run."""
    model_dir = build_tiny_model(work / "tiny-llama")
    plan = args.pipeline_kill_plan  # kills per trial; even trials aim inside commits
    with ThreadPoolExecutor(args.jobs) as pool:
        ref_f = pool.submit(run_clean, work, model_dir, "reference")
        seed_fs = [pool.submit(run_clean, work, model_dir, f"clean-seed{s}", seed=s, steps=args.clean_steps,
                               snapshot_every=0) for s in args.clean_seeds]
        trial_fs = [pool.submit(pipeline_kill_trial, work, model_dir, i, k, i % 2 == 0, args)
                    for i, k in enumerate(plan)]
        nan = bench_nan_rollback(work, model_dir, args)
        ref_dir = ref_f.result()
        seed_dirs = [f.result() for f in seed_fs]
        trials = [f.result() for f in trial_fs]
    return {"model_dir": model_dir, "reference": ref_dir, "clean_runs": seed_dirs, "trials": trials, "nan": nan}


def summarize_pipeline_kills(ref_dir: Path, trials: list[dict]) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache

    ref_lines = _loss_lines(ref_dir)
    reference = _last_per_step(ref_lines)
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    ref_commits = [s.step for s in CheckpointCache(ref_dir.parent / ".checkpoints").list(ref_dir.name)]
    kills = [a for t in trials for a in t["attempts"] if a.get("killed")]
    resumes = [a for t in trials for a in t["attempts"] if a["attempt"] > 0]
    per_trial = []
    max_diff = 0.0
    compared = mismatches = 0
    for t in trials:
        diffs = []
        for step, value in t["loss_lines"]:
            ref = reference.get(step)
            compared += 1
            if ref is None or value != ref:
                mismatches += 1
                diffs.append((step, value, ref))
            if ref is not None and math.isfinite(value):
                max_diff = max(max_diff, abs(value - ref))
        last = _last_per_step(t["loss_lines"])
        equal = t["completed"] and not diffs and sorted(last) == sorted(reference)
        per_trial.append({
            "trial": t["trial"],
            "targeted_commit": t["targeted_commit"],
            "kills": sum(bool(a.get("killed")) for a in t["attempts"]),
            "kills_inside_commit": sum(bool(a.get("inside_commit")) for a in t["attempts"]),
            "kill_steps": [a.get("last_logged_step") for a in t["attempts"] if a.get("killed")],
            "resumed_from_steps": [a.get("chosen_step") for a in t["attempts"] if a["attempt"] > 0],
            "completed": t["completed"],
            "all_losses_equal": equal,
            "final_figures_equal": t["final"] == ref_summary["final"],
            "loss_mismatches": diffs[:5],
            "attempts": [{k: a[k] for k in ("attempt", "plan", "killed", "inside_commit", "staging_leftovers",
                                            "last_logged_step", "chosen_step", "incomplete_commits_present",
                                            "wall_s") if k in a} for a in t["attempts"]],
            "error": (t["error"] or "")[-1500:] or None,
        })
    return {
        "what": "`scaler-wizard run` subprocesses SIGKILLed and continued with `run --resume` until completed",
        "trials": len(trials),
        "kills": len(kills),
        "kills_inside_commit": sum(bool(a.get("inside_commit")) for a in kills),
        "kills_aimed_at_commit": sum(a.get("plan", {}).get("mode") == "commit" for a in kills),
        "kills_missed": sum(bool(a.get("plan", {}).get("missed")) and not a.get("killed")
                            for t in trials for a in t["attempts"]),
        "resumes": len(resumes),
        "corrupted_snapshots_chosen": sum(not a.get("chosen_verifies") for a in resumes),
        "resumes_choosing_newest_valid": sum(bool(a.get("chosen_is_predicted")) for a in resumes),
        # staging folders of killed commits present when a resume chose (each counted once per trial)
        "incomplete_commits_skipped": sum(len({n for a in t["attempts"] for n in a.get("incomplete_commit_names", [])})
                                          for t in trials),
        "incomplete_snapshot_folders": sum(a.get("incomplete_snapshot_folders", 0) for a in resumes),
        "complete_but_corrupt_snapshots": sum(a.get("complete_but_corrupt", 0) for a in resumes),
        "metrics_reader_errors_after_kill": sum(a.get("metrics_reader_errors", 0) for a in kills),
        "torn_metrics_tails_after_kill": sum(a.get("metrics_torn_tail_bytes", 0) > 0 for a in kills),
        "final_metrics_corrupt_lines": sum(t["final_metrics_reader_errors"] for t in trials),
        "runs_completed": sum(t["completed"] for t in trials),
        "loss_lines_compared": compared,
        "loss_mismatches": mismatches,
        "trials_with_all_losses_equal": sum(p["all_losses_equal"] for p in per_trial),
        "trials_with_final_figures_equal": sum(p["final_figures_equal"] for p in per_trial),
        "max_abs_loss_diff": max_diff,
        "resume_points": sorted({a["chosen_step"] for a in resumes if a.get("chosen_step") is not None}),
        "process_wall_s_median": statistics.median(a["wall_s"] for t in trials for a in t["attempts"]),
        "reference_steps": len(reference),
        "commit_steps_as_expected": ref_commits == expected_commit_steps(PIPELINE_STEPS, SNAPSHOT_EVERY),
        "steps_per_stage": PIPELINE_STEPS,
        "snapshot_every": SNAPSHOT_EVERY,
        "commit_sleep_s": COMMIT_SLEEP_S,
        "per_trial": per_trial,
    }


# ============================================================================ NaN -> rollback


def bench_nan_rollback(work: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """In this process: NaN loss at global step k of the first attempt, ``on_stop: rollback``."""
    os.environ["SCALER_WIZARD_HOME"] = str(work / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from scaler_wizard.pipeline import run
    from scaler_wizard.training import stage_trainer

    k = random.Random(args.seed + 17).randint(3, sum(PIPELINE_STEPS) - 2)
    runs = work / "nan" / "runs"
    recipe = write_pipeline_recipe(work / "nan" / "recipe.yaml", model_dir, runs, "nan",
                                   safety={"policy": {"on_stop": "rollback", "max_rollbacks": 2}})
    original = stage_trainer.ScalingTrainer.compute_loss
    calls = {"n": 0, "injected_at": None}

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        calls["n"] += 1  # one call per optimizer step (no accumulation): call n is global step n
        if calls["n"] == k:
            calls["injected_at"] = k
            nan = torch.tensor(float("nan"))
            out = (out[0] * nan, out[1]) if return_outputs else out * nan  # keeps the graph: NaN gradients too
        return out

    stage_trainer.ScalingTrainer.compute_loss = poisoned
    error = None
    t0 = time.perf_counter()
    try:
        run(recipe, self_approve=True)
    except Exception as exc:  # noqa: BLE001 - reported as a figure, not raised
        error = f"{type(exc).__name__}: {exc}"
    finally:
        stage_trainer.ScalingTrainer.compute_loss = original
    wall = time.perf_counter() - t0
    run_dir = runs / "nan"
    telegrams = _metric_records(run_dir / "telegrams.jsonl")
    stops = [t for t in telegrams if t.get("action") == "stop"]
    records = _metric_records(run_dir / "metrics.jsonl")
    rollbacks = [e for e in records if e.get("metric") == "safety/rollback"]
    losses = _last_per_step(_loss_lines(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    first_stop = stops[0] if stops else {}
    return {
        "injected_step": calls["injected_at"],
        "first_stop_step": first_stop.get("step"),
        "first_stop_reasons": first_stop.get("reasons"),
        "first_stop_resolution": first_stop.get("resolution"),
        "stop_at_injected_step": bool(stops) and first_stop.get("step") == calls["injected_at"],
        "stop_telegrams": len(stops),
        "rollbacks_logged": len(rollbacks),
        "rolled_back_to_step": rollbacks[0]["step"] if rollbacks else None,
        "lr_after_rollback": rollbacks[0].get("lr") if rollbacks else None,
        "envelope_rollbacks_used": max((t.get("rollbacks_used", 0) for t in telegrams), default=0),
        "completed": (run_dir / "summary.json").exists() and _status(run_dir).get("state") == "completed",
        "total_steps": summary.get("total_steps"),
        "final_loss": losses[max(losses)] if losses else None,
        "final_loss_finite": bool(losses) and math.isfinite(losses[max(losses)]),
        "final_perplexity_finite": all(math.isfinite(v) for key, v in (summary.get("final") or {}).items()
                                       if key.startswith("perplexity@")) and bool(summary.get("final")),
        "error": error,
        "wall_s": round(wall, 1),
        "run_dir": str(run_dir),
    }


# ============================================================================ loss spikes


def clean_series(run_dir: Path) -> list[tuple[int, int, dict[str, float]]]:
    """(stage, step, {train/loss, train/grad_norm}) per logged training step, last value per step."""
    by_step: dict[int, tuple[int, dict[str, float]]] = {}
    for e in _metric_records(run_dir / "metrics.jsonl"):
        if e.get("metric") in ("train/loss", "train/grad_norm") and e.get("value") is not None:
            _, values = by_step.setdefault(int(e["step"]), (int(e.get("stage", 0)), {}))
            values[e["metric"]] = float(e["value"])
    return [(stage, step, values) for step, (stage, values) in sorted(by_step.items()) if "train/loss" in values]


def replay(series, config=None, *, scale: dict[int, float] | None = None) -> list:
    """Feed a series to a fresh envelope as SafetyCallback does; ``scale`` multiplies the loss at
    given steps (the injected spikes). Returns the telegrams."""
    from scaler_wizard.safety.envelope import SafetyEnvelope

    env = SafetyEnvelope(config)
    out = []
    for stage, step, values in series:
        env.begin_stage(stage)
        metrics = dict(values)
        if scale and step in scale:
            metrics["train/loss"] *= scale[step]
        out.append(env.observe(step, metrics, stage=stage))
    return out


def _loss_finding_steps(telegrams, severity: str | None = None) -> list[int]:
    return [t.step for t in telegrams for f in t.findings
            if f.metric == "train/loss" and f.rule in ("spike", "repeated_spike") and (severity is None or
                                                                                      f.severity == severity)]


SPIKES = (("x3", 3.0, 1), ("x10", 10.0, 1), ("x3_for_3_steps", 3.0, 3))  # (label, loss factor, steps)


def _false_positives(series_by_name: dict[str, list], cfg) -> dict:
    """Warn/stop telegrams over clean series: each is a false positive."""
    steps = flagged = loss_flagged = 0
    rules: dict[str, int] = {}
    for series in series_by_name.values():
        for t in replay(series, cfg):
            steps += 1
            flagged += t.action != "continue"
            loss_flagged += any(f.metric == "train/loss" for f in t.findings)
            for f in t.findings:
                rules[f"{f.metric}:{f.rule}"] = rules.get(f"{f.metric}:{f.rule}", 0) + 1
    return {"clean_steps": steps, "false_positive_telegrams": flagged,
            "false_positive_rate": round(flagged / steps, 5) if steps else None,
            "loss_rule_false_positives": loss_flagged,
            "loss_rule_false_positive_rate": round(loss_flagged / steps, 5) if steps else None,
            "false_positive_rules": rules}


def logged_series(series, every: int, scale: dict[int, float] | None = None):
    """What the envelope observes at ``logging_steps = every`` from a series logged at every step:
    per stage, windows of ``every`` consecutive steps; the Trainer logs at the window's last step
    the mean loss of the window (``tr_loss`` averaged since the last log) and that step's grad
    norm; a trailing partial window of a stage is not logged. ``scale`` multiplies the per-step
    loss at given steps (the injected spikes) before averaging. Returns (observations in the
    ``series`` format, {step: the step its window is logged at})."""
    out, window_of = [], {}
    stages: dict[int, list] = {}
    for item in series:
        stages.setdefault(item[0], []).append(item)
    for stage, items in stages.items():
        for w in range(len(items) // every):
            chunk = items[w * every : (w + 1) * every]
            losses = [v["train/loss"] * (scale.get(step, 1.0) if scale else 1.0) for _, step, v in chunk]
            values = {"train/loss": sum(losses) / len(losses)}
            if "train/grad_norm" in chunk[-1][2]:
                values["train/grad_norm"] = chunk[-1][2]["train/grad_norm"]
            out.append((stage, chunk[-1][1], values))
            for _, step, _ in chunk:
                window_of[step] = chunk[-1][1]
    return out, window_of


def _inject_spikes(series_by_name: dict[str, list], cfg, *, seed: int, per_series: int, regimes,
                   every: int = 1) -> dict:
    """Spikes at random steps of each series (the same steps for every ``cfg``: same ``seed``),
    each replayed alone at ``logging_steps = every``; detected = a loss spike finding at a logged
    step whose window holds one of the spiked steps. Positions in the stage and delays count
    logged observations."""
    rng = random.Random(seed)
    results: dict[str, dict] = {}
    for label, factor, length in SPIKES:
        det = total = stop_det = 0
        delays: list[int] = []
        stop_delays: list[int] = []
        by_regime: dict[str, list[int]] = {}
        for series in series_by_name.values():
            _, window_of = logged_series(series, every)
            logged = sorted(set(window_of.values()))
            obs_index = {s: k for k, s in enumerate(logged)}
            positions = []  # (step, index of its logged observation in its stage, stage)
            counts: dict[int, int] = {}
            seen: set[int] = set()
            for stage, step, _ in series:
                if step not in window_of:
                    continue
                log_step = window_of[step]
                if log_step not in seen:
                    seen.add(log_step)
                    counts[stage] = counts.get(stage, 0) + 1
                positions.append((step, counts[stage] - 1, stage))
            eligible = [(i, p) for i, p in enumerate(positions)
                        if i + length <= len(positions) and positions[i + length - 1][2] == p[2]]
            for i, (step, pos, _) in rng.sample(eligible, min(per_series, len(eligible))):
                steps = [positions[i + j][0] for j in range(length)]
                observed, _ = logged_series(series, every, scale={s: factor for s in steps})
                telegrams = replay(observed, cfg)
                first, last = window_of[steps[0]], window_of[steps[-1]]
                found = [s for s in _loss_finding_steps(telegrams) if s >= first]
                stopped = [s for s in _loss_finding_steps(telegrams, "stop") if s >= first]
                hit = bool(found) and found[0] <= last
                total += 1
                det += hit
                bucket = by_regime.setdefault(regimes(pos), [0, 0])
                bucket[0] += hit
                bucket[1] += 1
                if hit:
                    delays.append(obs_index[found[0]] - obs_index[first])  # in logged observations
                if stopped and stopped[0] <= last:
                    stop_det += 1
                    stop_delays.append(obs_index[stopped[0]] - obs_index[first])
        warm = by_regime.get(regimes(10**9), [0, 0])
        results[label] = {
            "injected_after_warmup": warm[1],
            "detection_rate_after_warmup": round(warm[0] / warm[1], 4) if warm[1] else None,
            "injected": total,
            "detected": det,
            "detection_rate": round(det / total, 4) if total else None,
            "detection_delay_steps_median": statistics.median(delays) if delays else None,
            "detection_delay_steps_max": max(delays) if delays else None,
            "stop_telegrams": stop_det,
            "stop_delay_steps_median": statistics.median(stop_delays) if stop_delays else None,
            "by_position_in_stage": {k: {"detected": v[0], "injected": v[1]} for k, v in sorted(by_regime.items())},
        }
    return results


def logging_interval(series) -> int:
    """The most common step gap between consecutive logged steps of a stage (1: every step)."""
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(series) if a[0] == b[0]]
    return statistics.mode(gaps) if gaps else 1


def demo_logging_steps() -> int:
    """``training.logging_steps`` of the demo recipe (src/scaler_wizard/recipes/demo.yaml)."""
    import yaml

    recipe = yaml.safe_load((SRC / "scaler_wizard" / "recipes" / "demo.yaml").read_text(encoding="utf-8"))
    return int(recipe["training"]["logging_steps"])


def bench_loss_spikes(series_by_name: dict[str, list], live_runs: list[Path], args: argparse.Namespace) -> dict:
    from scaler_wizard.safety.envelope import EnvelopeConfig

    cfg = EnvelopeConfig()  # the recipe's defaults
    lo, hi = cfg.loss.ratio_min_history, cfg.loss.min_history

    def regimes(pos: int) -> str:
        """Where in its stage a spike falls: before any loss rule can fire, only the ratio-to-
        running-max rule (the z-score needs ``min_history`` observations of the stage), both."""
        return f"pos<{lo}" if pos < lo else f"{lo}<=pos<{hi}" if pos < hi else f"pos>={hi}"

    # live telegrams the clean runs actually wrote (all rules, throughput and eval included)
    live = {"steps": 0, "warn": 0, "stop": 0, "rules": {}}
    for run_dir in live_runs:
        live["steps"] += len(clean_series(run_dir))
        for t in _metric_records(run_dir / "telegrams.jsonl"):
            if t.get("action") in ("warn", "stop"):
                live[t["action"]] += 1
                for f in t.get("findings", []):
                    key = f"{f.get('metric')}:{f.get('rule')}"
                    live["rules"][key] = live["rules"].get(key, 0) + 1
    seed = args.seed + 99
    # The same replay with a shorter warm-up of the z-score rule (recipe: safety.loss.min_history),
    # to show what the early-stage blind spot costs and what closing it would cost in false positives.
    alternatives = {}
    for min_history in (8, 4):
        alt = EnvelopeConfig.model_validate({"loss": {"min_history": min_history}})
        fp = _false_positives(series_by_name, alt)
        inj = _inject_spikes(series_by_name, alt, seed=seed, per_series=args.spikes_per_series, regimes=regimes)
        alternatives[f"loss.min_history={min_history}"] = {
            "false_positive_rate": fp["false_positive_rate"],
            "loss_rule_false_positive_rate": fp["loss_rule_false_positive_rate"],
            "detection": {label: {"rate": r["detection_rate"], "by_position_in_stage": r["by_position_in_stage"]}
                          for label, r in inj.items()},
        }
    injected = _inject_spikes(series_by_name, cfg, seed=seed, per_series=args.spikes_per_series, regimes=regimes)
    # The demo recipe logs every `every` steps: the envelope then sees each window's mean loss
    # (a one-step x3 spike in a window of 5 is a x1.4 mean) and counts its warm-up in logged
    # observations, so spikes are replayed again as the demo would observe them.
    every = demo_logging_steps()
    # only series logged at every step can be re-windowed (a demo run's own series is already
    # logged every `every` steps)
    per_step = {name: series for name, series in series_by_name.items() if logging_interval(series) == 1}
    demo_series = {name: logged_series(series, every)[0] for name, series in per_step.items()}
    at_demo = {
        "logging_steps": every, "source": "src/scaler_wizard/recipes/demo.yaml training.logging_steps",
        "observations": {name: len(s) for name, s in demo_series.items()},
        "series_not_logged_every_step": sorted(set(series_by_name) - set(per_step)),
        **_false_positives(demo_series, cfg),
        "injected": _inject_spikes(per_step, cfg, seed=seed, per_series=args.spikes_per_series,
                                   regimes=regimes, every=every),
    }

    def rates(inj: dict) -> dict:
        return {label: {"all_spikes": r["detection_rate"], "injected": r["injected"],
                        "after_warmup": r["detection_rate_after_warmup"], "injected_after_warmup":
                        r["injected_after_warmup"]} for label, r in inj.items()}

    return {
        "what": "SafetyEnvelope (recipe defaults) replayed over per-step train/loss + train/grad_norm of real runs",
        "series": {name: len(s) for name, s in series_by_name.items()},
        # detection over ALL injected spikes (every position in the stage, the envelope's warm-up
        # included) and only after the warm-up, at logging_steps 1 and at the demo's
        "headline_detection": {"logging_steps=1": rates(injected), f"logging_steps={every} (demo)":
                               rates(at_demo["injected"])},
        **_false_positives(series_by_name, cfg),
        "live_clean_runs": live,
        "injected": injected,
        "at_demo_logging_steps": at_demo,
        "alternatives": alternatives,
        "config": {"z_threshold": cfg.loss.z_threshold, "min_history": cfg.loss.min_history,
                   "max_ratio": cfg.loss.max_ratio, "ratio_min_history": cfg.loss.ratio_min_history,
                   "repeat_to_stop": cfg.loss.repeat_to_stop, "window": cfg.loss.window},
    }


# ============================================================================ telemetry truncation


def bench_telemetry_truncation(files: list[Path], work: Path) -> dict:
    """Cut real telemetry files at every byte offset of their last 3 records; read them back."""
    from scaler_wizard.telemetry.reader import JsonlTail, read_jsonl

    out = {"files": [], "offsets": 0, "reader_errors": 0, "corrupt_lines": 0, "wrong_records": 0,
           "tail_wrong_records": 0}
    for src in files:
        data = src.read_bytes()
        expected = read_jsonl(src).records
        ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
        if len(ends) != len(expected) or not data.endswith(b"\n"):
            raise RuntimeError(f"{src} is not a clean JSON Lines file to cut")
        start = ends[-4] if len(ends) >= 4 else 0  # first byte of the third-to-last record
        cut_file = work / f"cut-{src.parent.name}-{src.name}"
        for cut in range(start, len(data) + 1):
            complete = sum(1 for e in ends if e <= cut)
            cut_file.write_bytes(data[:cut])
            out["offsets"] += 1
            try:
                result = read_jsonl(cut_file)
                out["corrupt_lines"] += len(result.corrupt)
                out["wrong_records"] += result.records != expected[:complete]
                # a live follower that saw the cut file, then the rest of it
                tail = JsonlTail(cut_file)
                seen = tail.poll()
                with open(cut_file, "ab") as fh:
                    fh.write(data[cut:])
                seen += tail.poll()
                out["tail_wrong_records"] += seen != expected or bool(tail.corrupt)
            except Exception:  # noqa: BLE001 - any exception is a reader error
                out["reader_errors"] += 1
        out["files"].append({"file": f"{src.parent.name}/{src.name}", "records": len(expected),
                             "bytes_cut": len(data) - start + 1})
        cut_file.unlink(missing_ok=True)
    return out


# ============================================================================ cache: flips, ENOSPC, latency, dedup


def bench_bitflips(cache_root: Path, rng: random.Random) -> dict:
    from scaler_wizard.cache.checkpoints import MANIFEST_NAME, MARKER_NAME, CheckpointCache

    cache = CheckpointCache(cache_root)
    snaps = cache.list()
    total = detected = 0
    for snap in snaps:
        files = [snap.path / MANIFEST_NAME, snap.path / MARKER_NAME] + [
            cache.blob_path(e.sha256) for e in snap.files.values()
        ]
        for path in files:
            original = path.read_bytes()
            os.chmod(path, 0o644)
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            total += 1
            detected += not cache.verify(snap).ok
            path.write_bytes(original)
            os.chmod(path, 0o444)
        assert cache.verify(snap).ok
    return {
        "snapshots": len(snaps),
        "files_flipped": total,
        "detected": detected,
        "detection_rate": detected / total if total else None,
    }


def bench_enospc(work: Path) -> dict:
    from scaler_wizard.cache import checkpoints
    from scaler_wizard.cache.checkpoints import CheckpointCache, SnapshotCommitError

    real = checkpoints.write_all
    files = {f"part{i}.bin": os.urandom(4096) for i in range(4)}
    n_writes = len(files) + 2  # each blob, manifest, marker
    clean = 0
    for fail_at in range(1, n_writes + 1):
        cache = CheckpointCache(work / f"enospc{fail_at}")
        good = cache.commit("r", {"part0.bin": b"previous state"}, step=1)
        calls = {"n": 0}

        def full(fh, data, fail_at=fail_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fh, data)

        checkpoints.write_all = full
        try:
            cache.commit("r", files, step=2)
            failed_cleanly = False
        except SnapshotCommitError:
            failed_cleanly = True
        finally:
            checkpoints.write_all = real
        ok = (
            failed_cleanly
            and [s.ref for s in cache.list()] == [good.ref]
            and cache.verify(good).ok
            and cache.latest_valid("r").ref == good.ref
            and not any((cache.root / "tmp").iterdir())
        )
        clean += ok
    return {
        "injection_points": n_writes,
        "clean_failures": clean,
        "previous_snapshot_verifies": clean == n_writes,
    }


def bench_rollback_latency(big_mb: int, repeats: int) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache

    work = Path(tempfile.mkdtemp(prefix="sw-rollback-"))
    try:
        src = work / "src"
        src.mkdir()
        parts = 4
        for i in range(parts):
            with open(src / f"shard{i}.safetensors", "wb") as fh:
                fh.writelines(os.urandom(1024 * 1024) for _ in range(big_mb // parts))
        cache = CheckpointCache(work / "cache")
        t = time.perf_counter()
        snap = cache.commit("big", {p.name: p for p in src.iterdir()}, step=1)
        commit_s = time.perf_counter() - t
        t = time.perf_counter()
        assert cache.verify(snap).ok
        verify_s = time.perf_counter() - t
        link, copy = [], []
        for r in range(repeats):
            t = time.perf_counter()
            cache.restore(snap, work / f"link{r}", mode="link", verify=False)
            link.append(time.perf_counter() - t)
            t = time.perf_counter()
            cache.restore(snap, work / f"copy{r}", mode="copy", verify=False)
            copy.append(time.perf_counter() - t)
            shutil.rmtree(work / f"copy{r}")
        size = snap.logical_bytes
        return {
            "snapshot_bytes": size,
            "commit_s": round(commit_s, 3),
            "verify_s": round(verify_s, 3),
            "restore_hardlink_s": round(statistics.median(link), 5),
            "restore_copy_s": round(statistics.median(copy), 3),
            "speedup": round(statistics.median(copy) / statistics.median(link), 1),
            "repeats": repeats,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_dedup(cache_root: Path, run_id: str) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache

    stats = CheckpointCache(cache_root).dedup_stats(run_id)
    stats["saved_fraction"] = (
        round(stats["saved_bytes"] / stats["logical_bytes"], 4) if stats["logical_bytes"] else 0.0
    )
    return stats


# ============================================================================ targets


def targets(result: dict) -> dict:
    """Each figure of issue 6 against its target (met: true/false)."""
    pk, nan, spikes, tel = result["pipeline_kills"], result["nan_rollback"], result["loss_spikes"], \
        result["telemetry_truncation"]
    return {
        "pipeline_kills>=20 (quick: >=3)": pk["kills"] >= (20 if result["mode"] == "full" else 3),
        "pipeline_corrupted_chosen==0": pk["corrupted_snapshots_chosen"] == 0 and pk["resumes"] > 0,
        "pipeline_all_trials_losses_equal": pk["trials_with_all_losses_equal"] == pk["trials"],
        "telemetry_reader_errors==0_and_exact_records": tel["reader_errors"] == 0 and tel["corrupt_lines"] == 0
        and tel["wrong_records"] == 0 and tel["tail_wrong_records"] == 0,
        "nan_stop_at_step_k": nan["stop_at_injected_step"],
        "nan_rollback_and_completed": nan["rollbacks_logged"] >= 1 and nan["completed"] and nan["final_loss_finite"],
        # spikes after the envelope's warm-up (min_history observations of the stage); None: no such
        # positions in this mode's series (quick mode's stages are shorter than the warm-up)
        "spikes_x3_x10_detected_after_warmup": None if spikes["injected"]["x3"]["injected_after_warmup"] == 0
        else spikes["injected"]["x3"]["detection_rate_after_warmup"] == 1.0
        and spikes["injected"]["x10"]["detection_rate_after_warmup"] == 1.0,
        "enospc_clean": result["enospc"]["previous_snapshot_verifies"],
        "bitflips_all_detected": all(b["detected"] == b["files_flipped"] for b in result["bitflips"].values()),
        "raw_loop_losses_equal": result["raw_loop_kills"]["all_resumed_losses_equal"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 pipeline kills, 2 raw kills, 16 MB snapshot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="kill trials run this many at a time")
    ap.add_argument("--out", type=Path, default=None)
    # child-only (raw loop)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--run")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    args.raw_kills = 2 if args.quick else 24
    args.commit_sleep = 0.03
    # kills per pipeline trial (even trials aim inside snapshot commits): full 12 trials, 24 kills
    args.pipeline_kill_plan = [2, 1] if args.quick else [1, 2, 3] * 4
    args.clean_seeds = [] if args.quick else [11, 12, 13, 14]
    args.clean_steps = [64, 64]
    args.spikes_per_series = 10 if args.quick else 40
    big_mb = 16 if args.quick else 500
    out = args.out or ROOT / "bench" / "results" / ("faults_quick.json" if args.quick else "faults.json")
    rng = random.Random(args.seed)
    sys.path.insert(0, str(SRC))
    os.environ["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-faults-") as tmp:
        work = Path(tmp)
        (work / "raw").mkdir()
        # The raw-loop section runs in a thread beside the pipeline section: both only wait on
        # subprocesses (and the NaN run), so together they keep the cores busy.
        with ThreadPoolExecutor(1) as side:
            raw_f = side.submit(bench_raw_loop_kills, work / "raw", args)
            t = time.perf_counter()
            pipe = bench_pipeline(work / "pipeline", args)
            pipe_s = time.perf_counter() - t
            raw = raw_f.result()
        ref_dir = pipe["reference"]
        series = {"reference": clean_series(ref_dir)}
        series.update({d.name: clean_series(d) for d in pipe["clean_runs"]})
        demo_runs = sorted(p.parent for p in (ROOT / "runs").glob("demo-*/summary.json"))
        series.update({f"demo:{d.name}": clean_series(d) for d in demo_runs})
        nan_dir = Path(pipe["nan"]["run_dir"])
        result = {
            "bench": "faults",
            "mode": "quick" if args.quick else "full",
            "seed": args.seed,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "jobs": args.jobs, "load_avg_at_start": list(os.getloadavg())},
            "pipeline_kills": summarize_pipeline_kills(ref_dir, pipe["trials"]),
            "nan_rollback": {k: v for k, v in pipe["nan"].items() if k != "run_dir"},
            "loss_spikes": bench_loss_spikes(series, [ref_dir, *pipe["clean_runs"]], args),
            "telemetry_truncation": bench_telemetry_truncation(
                [ref_dir / "metrics.jsonl", nan_dir / "telegrams.jsonl"], work),
            "raw_loop_kills": raw["result"],
            "bitflips": {"raw_loop": bench_bitflips(raw["reference_cache"], rng),
                         "pipeline": bench_bitflips(ref_dir.parent / ".checkpoints", rng)},
            "enospc": bench_enospc(work),
            "rollback": bench_rollback_latency(big_mb, repeats=3),
            "dedup": {"raw_loop": bench_dedup(raw["reference_cache"], "reference"),
                      "pipeline": bench_dedup(ref_dir.parent / ".checkpoints", ref_dir.name)},
            "section_wall_s": {"raw_loop_kills": raw["result"]["wall_s"], "pipeline_and_nan": round(pipe_s, 1)},
        }
    result["targets"] = targets(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
