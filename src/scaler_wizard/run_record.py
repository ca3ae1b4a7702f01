"""What a run writes about itself: the run folder, status.json, the run record (resolved
recipe, envelope.json), the summary with its verdict.

``status.json`` states: ``awaiting_approval | rejected | running | completed |
completed_gates_failed | failed``. A run whose stages did not all pass their gates is
``completed_gates_failed``: its outputs are the last (weights, position encoding) pair that
passed, and the CLI exits with :data:`EXIT_GATES_FAILED`.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import PlanError
from .fsutil import utc_now, write_json_atomic, write_text_atomic

VERDICT_PASSED = "passed"
VERDICT_GATES_FAILED = "gates_failed"
STATE_BY_VERDICT = {VERDICT_PASSED: "completed", VERDICT_GATES_FAILED: "completed_gates_failed"}
FINISHED_STATES = frozenset(STATE_BY_VERDICT.values())



@dataclass
class StageOutcome:
    """One stage as it ended: ``decision`` is ``pass``, ``continue`` (failed, carried on),
    ``stop`` (failed; the run ends at the previous pair) or ``rollback`` (failed again after a
    retry from the stage start; the run ends at the previous pair)."""

    index: int
    length: int
    steps_trained: int
    probes: list[dict[str, Any]]
    gate_passed: bool
    decision: str
    failed_checks: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class RunStatus(dict):
    """status.json of a run: every update is written at once, atomically (the cockpit, `run
    --resume` and operators read it while the run goes on)."""

    def __init__(self, path: Path, initial: dict[str, Any], *, enabled: bool = True):
        super().__init__(initial)
        self.path = path
        self.enabled = enabled  # False on the non-main processes of a multi-process run
        self._write()

    def update(self, *args: Any, **fields: Any) -> None:  # type: ignore[override]
        super().update(*args, **fields, updated_at=utc_now())
        self._write()

    def _write(self) -> None:
        if self.enabled:
            write_json_atomic(self.path, dict(self))


class Reporter:
    """Where the pipeline says what it is doing; the CLI passes a rich-backed one."""

    def phase(self, text: str) -> None:
        pass

    def start_training(self, stage: Any, total_steps: int) -> None:
        pass

    def advance_training(self, step: int) -> None:
        pass

    def end_training(self) -> None:
        pass


# Fault injection (bench/phase_kills.py): "<phase prefix>=<seconds>" pauses the run right after
# it marks a phase, so a SIGKILL lands exactly at that phase boundary.
PHASE_PAUSE_ENV = "SCALER_WIZARD_FAULT_PHASE_PAUSE"


def mark_phase(status: RunStatus, text: str) -> None:
    """Record the phase the run enters in status.json (``phase``)."""
    status.update(phase=text)
    pause = os.environ.get(PHASE_PAUSE_ENV)
    if pause and "=" in pause:
        prefix, _, seconds = pause.rpartition("=")
        if text.startswith(prefix):
            import time

            time.sleep(float(seconds))


class PhaseMarker(Reporter):
    """Passes the pipeline's phases to the person's reporter and records each one in
    status.json (``phase``): the run's own phase markers, which operators, the cockpit and the
    fault benchmark read to know where a run is (or was when it stopped)."""

    def __init__(self, inner: Reporter, status: RunStatus):
        self.inner, self.status = inner, status

    def phase(self, text: str) -> None:
        mark_phase(self.status, text)
        self.inner.phase(text)

    def start_training(self, stage: Any, total_steps: int) -> None:
        mark_phase(self.status, f"stage {stage.index}: training")
        self.inner.start_training(stage, total_steps)

    def advance_training(self, step: int) -> None:
        self.inner.advance_training(step)

    def end_training(self) -> None:
        self.inner.end_training()


def check_run_id(run_id: str) -> str:
    """A run id becomes a folder name under output_dir: a name, never a path (the contract's
    rule for ``session_id``, so ``validate``, a contract and the run agree)."""
    from .safety.contract import valid_run_id

    if not valid_run_id(run_id):
        raise PlanError(f"Run id {run_id!r} is not a plain name.",
                        hint="Use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit.")
    return run_id


def generated_run_id(name: str, now: datetime | None = None) -> str:
    """<name>-<UTC yyyymmdd-hhmmss>: the one spelling of a generated run id."""
    return f"{name}-{(now or datetime.now(timezone.utc)).strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(output_dir: Path, run_id: str | None, name: str) -> Path:
    """A fresh run folder directly under ``output_dir``; an existing run is never reused."""
    base = check_run_id(run_id or generated_run_id(name))
    output_dir.mkdir(parents=True, exist_ok=True)
    candidate, n = output_dir / base, 1
    while True:
        try:
            candidate.mkdir()  # never reuse (and never overwrite) an existing run
            return candidate
        except FileExistsError:
            if run_id:
                raise PlanError(
                    f"Run directory {candidate} already exists.", hint="Choose another run.run_id or remove it."
                ) from None
            n += 1
            candidate = output_dir / f"{base}-{n}"


def hardware_inventory() -> dict[str, Any]:
    """The envelope's hardware block (``scaling/hardware.py`` is the one detector)."""
    from .scaling.hardware import hardware_record

    return hardware_record()


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident set since it started.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_run_record(run_dir: Path, recipe: Any, recipe_dir: Path, model_dir: Path, base_length: int,
                     stages: list[Any], approvers: list[str]) -> None:
    """recipe.resolved.yaml and envelope.json: what the run is, written once at its start."""
    import yaml

    write_text_atomic(run_dir / "recipe.resolved.yaml",
                      yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(
        run_dir / "envelope.json",
        {
            "schema_version": 1,
            "run_id": run_dir.name,
            "config": recipe.model_dump(mode="json"),
            "recipe_digest": recipe.digest(),
            "hardware": hardware_inventory(),
            "metrics_path": "metrics.jsonl",
            "telegram_path": "telegram.json",
            "created_at": utc_now(),
            "package_version": __version__,
            "model_path": str(model_dir),
            "recipe_dir": str(recipe_dir),
            "base_length": base_length,
            "stages": [s.length for s in stages],
            "approved_by": list(approvers),
        },
    )


def run_verdict(outcomes: list[StageOutcome], stage_count: int) -> tuple[str, list[str]]:
    """``passed`` only when every planned stage ran and passed its gate; else ``gates_failed``
    with the reasons."""
    reasons = [f"stage {o.index} ({o.length} tokens): {c}" for o in outcomes for c in o.failed_checks
               if not o.gate_passed]
    if len(outcomes) < stage_count and not reasons:
        reasons.append(f"only {len(outcomes)} of {stage_count} stages ran")
    passed = not reasons and len(outcomes) == stage_count and all(o.gate_passed for o in outcomes)
    return (VERDICT_PASSED if passed else VERDICT_GATES_FAILED), reasons


def headline(base: dict[str, float], final: dict[str, float], base_length: int, target: int,
             base_ppl: float | None) -> dict[str, Any]:
    final_ppl_target = final.get(f"perplexity@{target}")
    final_ppl_base = final.get(f"perplexity@{base_length}")
    return {
        f"passkey@{target}": final.get(f"passkey@{target}"),
        f"passkey_heldout_template@{target}": final.get(f"passkey_heldout_template@{target}"),
        f"base_passkey@{target}": base.get(f"passkey@{target}"),
        f"passkey@{base_length}": final.get(f"passkey@{base_length}"),
        f"base_passkey@{base_length}": base.get(f"passkey@{base_length}"),
        f"perplexity@{target}": final_ppl_target,
        f"base_perplexity@{base_length}": base_ppl,
        f"ppl@{target}_vs_base_ppl@{base_length}_pct": (
            100 * (final_ppl_target / base_ppl - 1) if final_ppl_target and base_ppl else None
        ),
        f"short_context_ppl_change_pct@{base_length}": (
            100 * (final_ppl_base / base_ppl - 1) if final_ppl_base and base_ppl else None
        ),
    }


def build_summary(inputs: Any, run_dir: Path, loop: Any, base_results: list, final_results: list,
                  export_check: dict | None, parameters: dict[str, int], base_ppl: float | None) -> dict[str, Any]:
    """summary.json: the verdict first, then the headline figures and every stage's gate."""
    from dataclasses import asdict

    from .evaluation.figures import flatten_results

    recipe, stages = inputs.recipe, inputs.stages
    verdict, reasons = run_verdict(loop.outcomes, len(stages))
    base_figures, final_figures = flatten_results(base_results), flatten_results(final_results)
    target = stages[-1].length
    return {
        "verdict": verdict,
        "verdict_reasons": reasons,
        "run_id": run_dir.name,
        "model": recipe.model.path,
        "method": recipe.context.method,
        "gate_policy": recipe.context.gate_policy,
        "base_length": inputs.base_length,
        "target_length": target,
        "reached_length": loop.model_length,
        "stages": [asdict(o) for o in loop.outcomes],
        "total_steps": loop.global_step,
        "trainable_params": parameters.get("trainable"),
        "total_params": parameters.get("total"),
        "export_check": export_check,
        "train_loss_first": sum(loop.first_losses) / len(loop.first_losses) if loop.first_losses else None,
        "train_loss_last": sum(loop.last_losses) / len(loop.last_losses) if loop.last_losses else None,
        "base": base_figures,
        "final": final_figures,
        "passkey_by_depth": {
            str(r.length): r.details.get("accuracy_by_depth") for r in final_results if r.probe == "passkey"
        },
        "base_passkey_by_depth": {
            str(r.length): r.details.get("accuracy_by_depth") for r in base_results if r.probe == "passkey"
        },
        "headline": headline(base_figures, final_figures, inputs.base_length, target, base_ppl),
        "thresholds": gate_thresholds(recipe, base_ppl),
    }


def gate_thresholds(recipe: Any, base_ppl: float | None) -> dict[str, float | None]:
    """The stage gates as absolute lines to draw: passkey accuracy floor, perplexity ceiling."""
    ev = recipe.evaluation
    return {
        "passkey_min_accuracy": ev.passkey.min_accuracy if ev.passkey.enabled else None,
        "passkey_min_depth_accuracy": ev.passkey.min_depth_accuracy if ev.passkey.enabled else None,
        "perplexity_max": base_ppl * ev.perplexity.max_ratio_to_base if base_ppl and ev.perplexity.enabled else None,
    }


class RunRecorder:
    """The run's bookkeeping around the work: status ``running`` with the pid, seed and threads,
    the run record, the metric writer (and the opt-in remote sink); on the way out either the
    report, ``summary.json`` and the final state (:meth:`finish`), or ``failed`` with the error.

    The completion order makes a kill at any point safe for ``run --resume``: the report is
    written first, then ``summary.json`` (the marker of a finished run), then the status."""

    def __init__(self, inputs: Any, run_dir: Path, status: RunStatus, grant: Any, dist: Any, *,
                 resumed_at: Any = None):
        self.inputs, self.run_dir, self.status, self.grant, self.dist = inputs, run_dir, status, grant, dist
        self.resumed_at = resumed_at
        self.writer: Any = None
        self.remote: Any = None
        self.parameters: dict[str, int] = {}
        self.t_start = 0.0

    def __enter__(self) -> RunRecorder:
        import time

        import torch
        from transformers import set_seed

        from .telemetry.sink import MetricWriter

        recipe = self.inputs.recipe
        self.t_start = time.time()
        # the pid lets `run --resume` refuse a run that is still alive
        self.status.update(state="running", pid=os.getpid(), processes=self.dist.world_size)
        if recipe.training.threads:
            torch.set_num_threads(recipe.training.threads)
        set_seed(recipe.run.seed)
        if self.resumed_at is None and self.dist.is_main:
            write_run_record(self.run_dir, recipe, self.inputs.recipe_dir, self.inputs.model_dir,
                             self.inputs.base_length, self.inputs.stages, list(self.grant.approvers))
        self.writer = MetricWriter(self.run_dir / "metrics.jsonl", is_main_process=self.dist.is_main)
        if self.resumed_at is not None:
            # events after the snapshot step were written before the interruption; readers take
            # the latest value of a metric at a step, so the replayed steps supersede them
            snap = self.resumed_at.snapshot
            self.writer.log(snap.step if snap else 0, "run/resumed", 1.0, snapshot=snap.ref if snap else None)
        if recipe.telemetry.remote.url and self.dist.is_main:  # opt-in; names leave only as salted hashes
            from .telemetry.remote import RemoteSink

            self.remote = RemoteSink(recipe.telemetry.remote, run_id=self.run_dir.name, model_name=recipe.model.path,
                                     data_names=recipe.data.train)
            self.writer.add_listener(self.remote.submit)
        return self

    def keep_until_exit(self, approved: Any) -> Any:
        """The private copies of the approved inputs live as long as the run (removed on exit)."""
        self._private = getattr(approved, "folder", None)
        return approved

    def _remove_private(self) -> None:
        import shutil

        folder = getattr(self, "_private", None)
        if folder is not None and self.dist.is_main:
            shutil.rmtree(folder, ignore_errors=True)

    def log_parameters(self, model: Any) -> None:
        self.parameters = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                           "total": sum(p.numel() for p in model.parameters())}
        self.writer.log(0, "model/trainable_params", self.parameters["trainable"])
        self.writer.log(0, "model/total_params", self.parameters["total"])

    def finish(self, summary: dict[str, Any], base_results: list, final_results: list) -> dict[str, Any]:
        import time

        import torch

        from .report import write_report
        from .safety.gatekeeper import close_run

        summary["approved_by"] = list(self.grant.approvers)
        if self.status.get("resumes"):
            summary["resumes"] = self.status["resumes"]
        summary["wall_time_s"] = round(time.time() - self.t_start, 1)
        summary["peak_rss_gb"] = round(peak_rss_gb(), 3)
        if torch.cuda.is_available():
            summary["peak_cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.writer.log(summary["total_steps"], "system/peak_rss_gb", summary["peak_rss_gb"])
        self.writer.log(summary["total_steps"], "run/verdict_passed", float(summary["verdict"] == VERDICT_PASSED))
        self._close_sinks(summary)
        mark_phase(self.status, "writing the report")
        write_report(self.run_dir, summary, base_results, final_results)
        mark_phase(self.status, "writing the summary")
        write_json_atomic(self.run_dir / "summary.json", summary)
        state = STATE_BY_VERDICT[summary["verdict"]]
        close_run(self.grant, state)
        self.status.update(state=state, verdict=summary["verdict"], finished_at=utc_now(),
                           stage=len(self.inputs.stages))
        self._finished = True
        return summary

    def _close_sinks(self, summary: dict[str, Any] | None = None) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.remote is not None:
            self.remote.close()
            if summary is not None:
                summary["remote_telemetry"] = self.remote.stats_dict()
            self.remote = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove_private()
        if exc is None:
            if not getattr(self, "_finished", False):
                self._close_sinks()  # a non-main process: the main one reports
            return False
        from .errors import RunHalted
        from .safety.gatekeeper import close_run

        self._close_sinks()
        if self.grant is not None:
            close_run(self.grant, "halted" if isinstance(exc, RunHalted) else "failed")
        self.status.update(state="failed", finished_at=utc_now(), error=f"{exc_type.__name__}: {exc}")
        return False
