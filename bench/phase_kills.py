"""SIGKILL at every phase boundary of a real run, then ``run --resume``: the resumed run must
equal the uninterrupted one (issue: a run killed after its last training step resumed into an
unscaled model and reported it as the result).

The product path: ``scaler-wizard run RECIPE --self-approve`` as a subprocess on a tiny random
Llama (demo tokenizer), 64 -> 128 -> 256 tokens, LoRA with dropout, a snapshot every 2 steps,
merged export on. The kill points come from the run's own phase markers (``status.json``
``phase``), not from wall-clock guesses. Two kill points per phase:

* ``entry``: the run pauses right after it marks the phase (``SCALER_WIZARD_FAULT_PHASE_PAUSE``)
  and is killed during the pause -- exactly at the boundary;
* ``inside``: no pause; the kill is sent a random 0-300 ms after the marker appears (the phase's
  work under way, or, for short phases, already the next one: the phase actually hit is
  recorded from status.json at the kill).

Per-stage phases (training, probing, stage-complete snapshot) are killed in stage 1 and stage 2.
After each kill the run is resumed until it completes; then, against the reference: every
per-step ``train/loss``, every final figure in ``summary.json``, the exported ``config.json``
and the merged weights (max |diff| <= 1e-6).

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/phase_kills.py  [--quick]   (JSON on stdout and
      in bench/results/phase_kills.json)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from faults import (  # noqa: E402
    PROCESS_TIMEOUT_S,
    _env,
    _last_per_step,
    _log_tail,
    _loss_lines,
    _run_to_end,
    _status,
    _sw_cmd,
    build_tiny_model,
    write_pipeline_recipe,
)

from scaler_wizard.run_record import PHASE_PAUSE_ENV  # noqa: E402

STEPS = [4, 4]
# (phase marker prefix, occurrence) -- the run's own markers, in order
PHASES = [
    ("loading model", 1),
    ("probing the base model", 1),
    ("stage 1: training", 1),
    ("stage 1/2: probing", 1),
    ("stage 1: stage-complete snapshot", 1),
    ("stage 2: training", 1),
    ("stage 2/2: probing", 1),
    ("stage 2: stage-complete snapshot", 1),
    ("final evaluation", 1),
    ("saving adapter and merged model", 1),
    ("writing the report", 1),
    ("writing the summary", 1),
]


def _recipe(work: Path, model_dir: Path, name: str) -> Path:
    return write_pipeline_recipe(work / name / "recipe.yaml", model_dir, work / name / "runs", name,
                                 steps=STEPS, snapshot_every=2, merge=True)


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _outputs(run_dir: Path) -> dict:
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "config": json.loads((run_dir / "model" / "config.json").read_text()),
        "losses": _last_per_step(_loss_lines(run_dir)),
    }


def _kill_at(proc: subprocess.Popen, run_dir: Path, prefix: str, delay_s: float, timeout_s: float = 240) -> dict:
    """Wait until status.json's phase starts with ``prefix``, wait ``delay_s``, SIGKILL the
    process group; return the phase seen at the kill."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            return {"killed": False, "reason": f"exited {proc.returncode} before the phase"}
        if str(_status(run_dir).get("phase", "")).startswith(prefix):
            time.sleep(delay_s)
            phase_at_kill = _status(run_dir).get("phase")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed": True, "phase_at_kill": phase_at_kill}
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"killed": False, "reason": "phase not reached in time"}


def trial(work: Path, model_dir: Path, ref: dict, prefix: str, point: str, rng: random.Random, n: int) -> dict:
    name = f"kill{n}"
    recipe = _recipe(work, model_dir, name)
    run_dir = work / name / "runs" / name
    log = work / name / "process.log"
    env = _env(0.0, work / "home")
    if point == "entry":
        env[PHASE_PAUSE_ENV] = f"{prefix}=30"
        delay = 0.5
    else:
        delay = rng.uniform(0.0, 0.3)
    with open(log, "ab") as out:
        proc = subprocess.Popen(_sw_cmd("run", str(recipe), "--self-approve"), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    kill = _kill_at(proc, run_dir, prefix, delay)
    resumes = 0
    rc = None
    while _status(run_dir).get("state") not in ("completed", "completed_gates_failed") and resumes < 3:
        resumes += 1
        rc = _run_to_end(_sw_cmd("run", "--resume", str(run_dir), "--self-approve"), _env(0.0, work / "home"), log)
    completed = _status(run_dir).get("state") == "completed"
    result = {"phase": prefix, "point": point, **kill, "resumes": resumes, "completed": completed,
              "last_rc": rc}
    if not completed:
        result["log_tail"] = _log_tail(log, 1500)
        return result
    out = _outputs(run_dir)
    a, b = _weights(run_dir), ref["weights"]
    result.update(
        losses_equal=out["losses"] == ref["losses"],
        final_equal=out["summary"]["final"] == ref["summary"]["final"],
        reached_equal=out["summary"]["reached_length"] == ref["summary"]["reached_length"],
        config_equal={k: out["config"].get(k) for k in ("rope_parameters", "max_position_embeddings")}
        == {k: ref["config"].get(k) for k in ("rope_parameters", "max_position_embeddings")},
        weights_max_abs_diff=max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
        if a.keys() == b.keys() else None,
    )
    result["all_equal"] = bool(result["losses_equal"] and result["final_equal"] and result["config_equal"]
                               and result["weights_max_abs_diff"] is not None
                               and result["weights_max_abs_diff"] <= 1e-6)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="entry kills of 4 phases only (smoke)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "phase_kills.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sw-phase-kills-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "tiny-llama")
        ref_recipe = _recipe(work, model_dir, "ref")
        ref_dir = work / "ref" / "runs" / "ref"
        rc = _run_to_end(_sw_cmd("run", str(ref_recipe), "--self-approve"), _env(0.0, work / "home"),
                         work / "ref" / "process.log")
        if rc != 0:
            raise SystemExit(f"reference run failed ({rc}):\n{_log_tail(work / 'ref' / 'process.log')}")
        ref = {**_outputs(ref_dir), "weights": _weights(ref_dir)}
        phases = PHASES[1:12:3] if args.quick else PHASES
        points = ["entry"] if args.quick else ["entry", "inside"]
        trials = []
        for point in points:  # every phase's entry kill first, then the inside kills
            for prefix, _ in phases:
                trials.append(trial(work, model_dir, ref, prefix, point, rng, len(trials)))
                print(json.dumps({k: v for k, v in trials[-1].items() if k != "log_tail"}), file=sys.stderr)
                args.out.parent.mkdir(parents=True, exist_ok=True)  # partial results survive a stop
                args.out.write_text(json.dumps({"partial": True, "trials": trials}, indent=2) + "\n")
    by_phase: dict[str, dict] = {}
    for t in trials:
        p = by_phase.setdefault(t["phase"], {"kills": 0, "completed": 0, "all_equal": 0})
        p["kills"] += int(t.get("killed", False))
        p["completed"] += int(t["completed"])
        p["all_equal"] += int(t.get("all_equal", False))
    result = {
        "bench": "phase_kills",
        "recipe": {"stages": [128, 256], "steps": STEPS, "snapshot_every": 2, "merge": True},
        "trials": trials,
        "by_phase": by_phase,
        "kills": sum(int(t.get("killed", False)) for t in trials),
        "resumed_runs_completed": sum(int(t["completed"]) for t in trials),
        "all_equal": sum(int(t.get("all_equal", False)) for t in trials),
        "wall_s": round(time.time() - t0, 1),
        "process_timeout_s": PROCESS_TIMEOUT_S,
    }
    result["target_met"] = result["all_equal"] == len(trials) == result["kills"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}))


if __name__ == "__main__":
    main()
