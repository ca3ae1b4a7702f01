"""Fault injection for the Checkpoint Cache and exact resume (issue 6).

What it measures (one JSON line on stdout, the same object in bench/results/faults.json):

* **kills** — a child process trains a tiny torch model (frozen base + trainable head, dropout,
  AdamW, warmup/decay schedule, seeded data order) for ``--steps`` steps with a snapshot every
  ``--every`` steps (plus a pinned stage-boundary snapshot every 20 steps). It is SIGKILLed at
  random moments — half of them timed to land inside a snapshot commit, whose phases are widened
  by ``SCALER_WIZARD_FAULT_COMMIT_SLEEP`` — then resumed from ``latest_valid`` until it completes.
  Reported: corrupted snapshots chosen on resume (must be 0), complete-but-corrupt snapshots left
  by a kill (must be 0), and whether every step's loss of every resumed run equals the
  uninterrupted run's loss at that step (exact float equality).
* **bit flips** — one random byte flipped in every file of every snapshot (manifest, marker, each
  blob) of the uninterrupted run: detected by ``verify`` / total.
* **disk full** — ENOSPC injected at every write of a commit: each must raise
  SnapshotCommitError, leave no staging files, and the previous snapshot must still verify.
* **rollback latency** — restoring a ``--big-mb`` snapshot by hardlink vs by copying it.
* **dedup** — logical bytes of the uninterrupted run's snapshots vs bytes stored once.

Run:  nice -n 19 .venv/bin/python bench/faults.py            (full: 24 kills, 500 MB snapshot)
      nice -n 19 .venv/bin/python bench/faults.py --quick    (smoke: 4 kills, 16 MB snapshot)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC_CONFIG = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["head"]}, sort_keys=True).encode()


# ============================================================================ child: the training run


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


# ============================================================================ parent: orchestration


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


def _env(commit_sleep: float) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["SCALER_WIZARD_FAULT_COMMIT_SLEEP"] = str(commit_sleep)
    env["OMP_NUM_THREADS"] = "1"
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


def _reference(work: Path, args: argparse.Namespace) -> tuple[dict[int, float], Path, float]:
    """The uninterrupted run: per-step losses, its cache, and how long its training loop took."""
    cache, log = work / "reference-cache", work / "reference.jsonl"
    subprocess.run(_child_cmd(cache, "reference", log, args, resume=False), env=_env(0.0), check=True)
    events = _read_events(log)
    if events[-1]["event"] != "done":
        raise RuntimeError("the reference run did not complete")
    losses = {e["step"]: e["loss"] for e in events if e["event"] == "loss"}
    return losses, cache, events[-1]["t"] - events[0]["t"]


def _kill_trial(
    work: Path, trial: int, in_commit: bool, train_s: float, args: argparse.Namespace, rng: random.Random
) -> dict:
    """One run: start, SIGKILL once (inside a commit or at a random moment), resume to the end."""
    cache, log = work / f"trial{trial}-cache", work / f"trial{trial}.jsonl"
    run = f"trial{trial}"
    proc = subprocess.Popen(_child_cmd(cache, run, log, args, resume=False), env=_env(args.commit_sleep))
    if not _wait_for(log, proc, lambda e: e["event"] == "start"):
        raise RuntimeError(f"trial {trial}: child did not start")
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


def bench_kills(work: Path, args: argparse.Namespace, rng: random.Random) -> dict:
    reference, ref_cache, train_s = _reference(work, args)
    trials = [
        _kill_trial(work, i, in_commit=(i % 2 == 0), train_s=train_s, args=args, rng=rng)
        for i in range(args.kills)
    ]
    mismatched = [(t["trial"], s) for t in trials for s, loss in t["losses"] if reference[s] != loss]
    return {
        "reference_cache": ref_cache,
        "result": {
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
        },
    }


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


def bench_dedup(cache_root: Path) -> dict:
    from scaler_wizard.cache.checkpoints import CheckpointCache

    stats = CheckpointCache(cache_root).dedup_stats("reference")
    stats["saved_fraction"] = (
        round(stats["saved_bytes"] / stats["logical_bytes"], 4) if stats["logical_bytes"] else 0.0
    )
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 kills, 16 MB snapshot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    # child-only
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
    args.kills = 4 if args.quick else 24
    args.commit_sleep = 0.03
    big_mb = 16 if args.quick else 500
    out = args.out or ROOT / "bench" / "results" / ("faults_quick.json" if args.quick else "faults.json")
    rng = random.Random(args.seed)
    sys.path.insert(0, str(ROOT / "src"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-faults-") as tmp:
        work = Path(tmp)
        kills = bench_kills(work, args, rng)
        result = {
            "bench": "faults",
            "mode": "quick" if args.quick else "full",
            "seed": args.seed,
            "kills": kills["result"],
            "bitflips": bench_bitflips(kills["reference_cache"], rng),
            "enospc": bench_enospc(work),
            "rollback": bench_rollback_latency(big_mb, repeats=3),
            "dedup": bench_dedup(kills["reference_cache"]),
        }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
