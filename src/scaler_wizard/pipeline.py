"""The one orchestration path, recipe to report, readable top to bottom:

    check inputs -> open run dir -> load model, tokenizer, data -> probe the base model
    -> add adapters -> for each stage: scale positions, train, probe, gate -> save adapter
    and merged model -> summary and report

Everything that can be wrong with the user's input is checked before the run directory is
created; a run that fails later is marked ``failed`` in ``status.json`` and never gets a
``summary.json``, so a half-written run never looks complete.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .context.methods import apply_to_model, base_context_length, get_context_method
from .context.schedule import Stage, build_stages
from .data import build_stage_rows, load_texts, split_heldout, token_stream
from .errors import ModelLoadError, PlanError, RunHalted, ScalerWizardError
from .evaluation.passkey import PasskeyBuilder
from .evaluation.probes import (
    BUILTIN_PROBES,
    PasskeyProbe,
    PerplexityProbe,
    ProbeContext,
    ProbeResult,
    ShortContextProbe,
    run_probe,
)
from .recipe import Recipe, load_recipe, resolve_path
from .telemetry.sink import MetricWriter, utc_now, write_json_atomic


@dataclass
class StageOutcome:
    index: int
    length: int
    steps_trained: int
    probes: list[dict[str, Any]]
    gate_passed: bool
    decision: str
    failed_checks: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    main_process: bool = True  # False on the other processes of `accelerate launch` (nothing to report)


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

    def start_training(self, stage: Stage, total_steps: int) -> None:
        pass

    def advance_training(self, step: int) -> None:
        pass

    def end_training(self) -> None:
        pass


# ------------------------------------------------------------------------------------------
# Input checks (before anything is written)
# ------------------------------------------------------------------------------------------


def load_custom_probes(recipe: Recipe, recipe_dir: Path) -> list[Any]:
    """Instances of the recipe's extra probes (entry points and drop-in folders), built before
    the run starts so an unknown probe or bad option is an input error, not a mid-run crash."""
    if not recipe.evaluation.custom:
        return []
    from .evaluation.registry import discover_probes

    catalog = discover_probes([resolve_path(d, recipe_dir) for d in recipe.evaluation.probe_dirs])
    return [catalog.create(spec.name, **spec.options) for spec in recipe.evaluation.custom]


def check_model_dir(path: Path) -> None:
    """A Hugging Face model folder with config, safetensors weights and a tokenizer."""
    if not path.is_dir():
        raise ModelLoadError(
            f"Model folder {path} does not exist.",
            hint="Set model.path to a Hugging Face model folder (config.json, *.safetensors, tokenizer), "
            "or builtin:demo for the embedded demo model.",
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_weights:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(
                f"Model folder {path} holds only pickle weights (*.bin/*.pt); Scaler Wizard reads safetensors only "
                "because unpickling can run arbitrary code.",
                hint="Convert once with transformers: AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, "
                "safe_serialization=True) on a machine where you trust the file.",
            )
        missing.append("*.safetensors")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer_config.json)")
    if missing:
        raise ModelLoadError(
            f"Model folder {path} is missing {', '.join(missing)}.",
            hint="Save the model and its tokenizer with save_pretrained() into that folder.",
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({exc}).", hint="Restore the file.") from None


def load_model_and_tokenizer(path: Path, recipe: Recipe):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=getattr(torch, recipe.model.dtype),
            attn_implementation=recipe.model.attn_implementation,
            local_files_only=True,
            use_safetensors=True,
        )
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ModelLoadError(
            f"Could not load the model in {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            hint="Check that it is a causal language model saved with save_pretrained().",
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The tokenizer's length limit is the old context; we tokenize whole documents into a stream.
    tokenizer.model_max_length = int(1e12)
    return model, tokenizer


def hardware_inventory() -> dict[str, Any]:
    import psutil
    import torch

    inv: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "ram_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            inv["cuda_devices"].append({"name": p.name, "total_gb": round(p.total_memory / 2**30, 2)})
    return inv


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident set since it started.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def new_run_dir(output_dir: Path, run_id: str | None, name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    base = run_id or f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
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


# ------------------------------------------------------------------------------------------
# Probing
# ------------------------------------------------------------------------------------------


def probe_at(model, length: int, ctx: ProbeContext, recipe: Recipe, *, with_short: bool) -> list[ProbeResult]:
    ev = recipe.evaluation
    results = []
    if ev.perplexity.enabled:
        results.append(run_probe(PerplexityProbe(ev.perplexity.windows), model, length, ctx))
    if ev.passkey.enabled:
        results.append(run_probe(PasskeyProbe(ev.passkey.trials, ev.passkey.depths, ev.passkey.seed), model, length, ctx))
    if with_short and ev.short_context.enabled:
        results.append(run_probe(ShortContextProbe(ev.perplexity.windows), model, length, ctx))
    return results


def log_probe_results(writer: MetricWriter, step: int, results: list[ProbeResult], stage: int | None, prefix: str):
    for r in results:
        if r.error:
            writer.log(step, f"{prefix}probe_error/{r.probe}@{r.length}", float("nan"), stage=stage, error=r.error)
            continue
        for key, value in r.metrics.items():
            name = {
                ("perplexity", "perplexity"): "eval/perplexity",
                ("perplexity", "bits_per_byte"): "eval/bits_per_byte",
                ("perplexity", "perplexity_change_pct"): "eval/perplexity_change_pct",
                ("passkey", "accuracy"): "probe/passkey",
                ("short_context", "regression_pct"): "eval/short_context_regression_pct",
            }.get((r.probe, key))
            if name is None and r.probe not in BUILTIN_PROBES and isinstance(value, (int, float)):
                name = f"probe/{r.probe}/{key}"  # custom probes: every numeric metric
            if name:
                writer.log(step, f"{prefix}{name}@{r.length}", value, stage=stage)


def gate(stage: Stage, results: list[ProbeResult], base_ppl: float | None) -> list[str]:
    """The checks of a stage that failed (empty list: the gate passes)."""
    by_probe = {r.probe: r for r in results}
    failed = []
    for check in stage.checks:
        r = by_probe.get(check.probe)
        if r is None:
            continue  # probe disabled in the recipe
        if r.error:
            failed.append(f"{check.description}: probe error ({r.error})")
            continue
        if check.probe == "passkey":
            value = r.metrics["accuracy"]
        elif check.probe == "perplexity":
            value = r.metrics["perplexity"] / base_ppl if base_ppl else float("inf")
        else:
            value = r.metrics["regression_pct"]
        ok = value >= check.threshold if check.comparison == ">=" else value <= check.threshold
        if not ok:
            failed.append(f"{check.description} = {value:.3f} (needs {check.comparison} {check.threshold})")
    return failed


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def run(
    recipe_path: str | Path | None = None,
    *,
    reporter: Reporter | None = None,
    recipe_overrides: Callable[[Recipe], Recipe] | None = None,
    contract: Path | None = None,
    self_approve: bool = False,
    interactive: bool = False,
    approvers: Path | None = None,
    resume: str | Path | None = None,
) -> RunResult:
    """Run a recipe, or with ``resume`` (a run folder or id) continue an interrupted run from its
    newest valid snapshot: same recipe, a new approval, training resumed at the exact step."""
    import torch
    from transformers import AutoConfig, set_seed

    from .distributed import Dist
    from .safety.gatekeeper import authorize_run, close_run, planned_run_id

    # Under `accelerate launch` every process runs this function; only the main one writes.
    dist = Dist.from_env()
    reporter = (reporter or Reporter()) if dist.is_main else Reporter()
    t_start = time.time()

    # 1. Inputs: recipe, model folder, method, schedule, data -- all checked before the run
    #    directory exists, so bad input never leaves a half-written run behind.
    resume_point = None
    if resume is not None:
        from .resume import find_resume_point

        resume_point = find_resume_point(resume)
        recipe, _ = load_recipe(resume_point.recipe_file)
        recipe_dir = resume_point.recipe_dir
        if recipe.digest() != resume_point.recipe_digest:
            raise PlanError(f"{resume_point.recipe_file} no longer matches the recipe the run was approved with.",
                            hint="Restore the file, or start a new run with the changed recipe.")
    else:
        recipe, recipe_dir = load_recipe(recipe_path)
        if recipe_overrides:
            recipe = recipe_overrides(recipe)
    model_dir = resolve_path(recipe.model.path, recipe_dir)
    check_model_dir(model_dir)
    try:
        model_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a usable model config: {exc}") from None
    get_context_method(recipe.context.method, model_config)  # unsupported method -> clear error now
    if recipe.scaling.strategy != "lora":
        from .scaling.strategies import get_strategy

        get_strategy(recipe.scaling.strategy)  # unknown strategy -> clear error now
    base_length = recipe.context.base_length or base_context_length(model_config)
    stages = build_stages(
        base_length,
        recipe.context.target_length,
        recipe.context.method,
        recipe.context.method_params,
        recipe.training.steps_per_stage,
        schedule=recipe.context.schedule,
        passkey_min=recipe.evaluation.passkey.min_accuracy if recipe.evaluation.passkey.enabled else None,
        ppl_max_ratio=recipe.evaluation.perplexity.max_ratio_to_base if recipe.evaluation.perplexity.enabled else None,
        short_max_regression_pct=(
            recipe.evaluation.short_context.max_regression_pct if recipe.evaluation.short_context.enabled else None
        ),
    )
    custom_probes = load_custom_probes(recipe, recipe_dir)
    reporter.phase("reading data")
    train_texts = load_texts([resolve_path(p, recipe_dir) for p in recipe.data.train], recipe.data.text_field)
    if recipe.data.eval:
        eval_texts = load_texts([resolve_path(p, recipe_dir) for p in recipe.data.eval], recipe.data.text_field)
    else:
        train_texts, eval_texts = split_heldout(train_texts, recipe.data.eval_fraction, recipe.run.seed)

    # 2. The run directory, then the human contract: no model is loaded and no step is taken
    #    without a valid approval token bound to this run, recipe, model and data.
    if resume_point is not None:
        run_dir = resume_point.run_dir
        initial = {k: v for k, v in resume_point.status.items() if k not in ("error", "finished_at")}
        initial["state"] = "awaiting_approval"
        initial["resumes"] = [*initial.get("resumes", []), {"at": utc_now(), "snapshot": resume_point.snapshot.ref,
                                                            "step": resume_point.snapshot.step}]
    else:
        created = dist.agree(lambda: new_run_dir(resolve_path(recipe.run.output_dir),
                                                 planned_run_id(recipe, contract), recipe.run.name),
                             "creating the run folder")
        run_dir = Path(dist.broadcast_text(str(created) if created else ""))
        initial = {"state": "awaiting_approval", "started_at": utc_now(), "stage": 0, "stages": len(stages)}
    status = RunStatus(run_dir / "status.json", initial, enabled=dist.is_main)

    def approve():
        try:
            return authorize_run(recipe, recipe_dir, run_id=run_dir.name, run_dir=run_dir, contract_path=contract,
                                 self_approve=self_approve, interactive=interactive, approvers_path=approvers,
                                 resuming=resume_point is not None)
        except BaseException as exc:
            status.update(state="rejected" if resume_point is None else "failed", finished_at=utc_now(),
                          error=str(exc))
            raise

    grant = dist.agree(approve, "the approval")  # None on the other processes: the main one holds it
    # the pid lets `run --resume` refuse a run that is still alive
    status.update(state="running", pid=os.getpid(), processes=dist.world_size)

    if recipe.training.threads:
        torch.set_num_threads(recipe.training.threads)
    set_seed(recipe.run.seed)
    if resume_point is None and dist.is_main:
        _write_run_record(run_dir, recipe, recipe_dir, model_dir, base_length, stages, grant)
    writer = MetricWriter(run_dir / "metrics.jsonl", is_main_process=dist.is_main)
    if resume_point is not None:
        # events after the snapshot step were written before the interruption; readers take
        # the latest value of a metric at a step, so the replayed steps supersede them
        writer.log(resume_point.snapshot.step, "run/resumed", 1.0, snapshot=resume_point.snapshot.ref)
    remote = None
    if recipe.telemetry.remote.url and dist.is_main:  # opt-in aggregation; names leave only as salted hashes
        from .telemetry.remote import RemoteSink

        remote = RemoteSink(recipe.telemetry.remote, run_id=run_dir.name, model_name=recipe.model.path,
                            data_names=recipe.data.train)
        writer.add_listener(remote.submit)
    try:
        reporter.phase(f"loading model from {model_dir}")
        model, tokenizer = load_model_and_tokenizer(model_dir, recipe)
        original_config = copy.deepcopy(model.config)
        train_stream = token_stream(tokenizer, train_texts)
        heldout_stream = token_stream(tokenizer, eval_texts)
        summary = _train_and_evaluate(
            recipe, run_dir, model, tokenizer, stages, base_length, original_config,
            train_stream, heldout_stream, writer, reporter, grant, status, dist, custom_probes,
            resume_point=resume_point,
        )
        if not dist.is_main:
            return RunResult(run_dir, summary, main_process=False)
        summary["approved_by"] = list(grant.approvers)
        if status.get("resumes"):
            summary["resumes"] = status["resumes"]
        summary["wall_time_s"] = round(time.time() - t_start, 1)
        summary["peak_rss_gb"] = round(peak_rss_gb(), 3)
        if torch.cuda.is_available():
            summary["peak_cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        writer.log(summary["total_steps"], "system/peak_rss_gb", summary["peak_rss_gb"])
        writer.close()
        if remote is not None:
            remote.close()
            summary["remote_telemetry"] = remote.stats_dict()
        write_json_atomic(run_dir / "summary.json", summary)
        close_run(grant, "completed")
        status.update(state="completed", finished_at=utc_now(), stage=len(stages))
        return RunResult(run_dir, summary)
    except BaseException as exc:
        writer.close()
        if remote is not None:
            remote.close()
        if grant is not None:
            close_run(grant, "halted" if isinstance(exc, RunHalted) else "failed")
        status.update(state="failed", finished_at=utc_now(), error=f"{type(exc).__name__}: {exc}")
        raise


def _write_run_record(run_dir, recipe, recipe_dir, model_dir, base_length, stages, grant) -> None:
    """recipe.resolved.yaml and envelope.json: what the run is, written once at its start."""
    (run_dir / "recipe.resolved.yaml").write_text(_yaml_dump(recipe.model_dump(mode="json")), encoding="utf-8")
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
            "approved_by": list(grant.approvers),
        },
    )


def probe_base(model, recipe: Recipe, ctx: ProbeContext, base_length: int, stages, run_dir: Path,
               writer: MetricWriter, resumed: bool, *, write: bool = True) -> list[ProbeResult]:
    """The base model, unscaled, at the base length and at every stage length. The results are
    kept in base_probes.json, so a resumed run reuses them instead of probing again."""
    record = run_dir / "base_probes.json"
    if resumed and record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        ctx.baseline.update(saved["baseline"])
        return [ProbeResult(**r) for r in saved["results"]]
    base_lengths = recipe.evaluation.evaluate_base_at or [base_length] + [s.length for s in stages]
    base_results = []
    for length in base_lengths:
        results = probe_at(model, length, ctx, recipe, with_short=False)
        base_results.extend(results)
        for r in results:
            if r.probe == "perplexity" and not r.error:
                ctx.baseline[f"perplexity@{length}"] = r.metrics["perplexity"]
    log_probe_results(writer, 0, base_results, None, "base/")
    if f"perplexity@{base_length}" not in ctx.baseline and recipe.evaluation.perplexity.enabled:
        r = run_probe(PerplexityProbe(recipe.evaluation.perplexity.windows), model, base_length, ctx)
        if not r.error:
            ctx.baseline[f"perplexity@{base_length}"] = r.metrics["perplexity"]
    if write:
        write_json_atomic(record, {"baseline": ctx.baseline, "results": [asdict(r) for r in base_results]})
    return base_results


def _train_and_evaluate(recipe, run_dir, model, tokenizer, stages, base_length, original_config,
                        train_stream, heldout_stream, writer, reporter, grant, status, dist, custom_probes=(),
                        resume_point=None):
    from .resume import RunPosition
    from .safety.gatekeeper import check_scope

    ctx = ProbeContext(tokenizer=tokenizer, heldout_stream=heldout_stream, base_length=base_length)

    # 3. The base model, unscaled, at the base length and at every stage length.
    reporter.phase("probing the base model")
    base_results = probe_base(model, recipe, ctx, base_length, stages, run_dir, writer, resume_point is not None,
                              write=dist.is_main)
    base_ppl = ctx.baseline.get(f"perplexity@{base_length}")

    # 4. Capacity (PEFT LoRA adapters, or new blocks), the teacher, and the run's guards.
    model = attach_strategy(recipe, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    writer.log(0, "model/trainable_params", trainable)
    writer.log(0, "model/total_params", total)
    teacher, distill_config = prepare_distillation(recipe, model, tokenizer, original_config, base_length)

    guards = RunGuards(recipe, run_dir, writer, baseline=ctx.baseline, dist=dist)
    lr = recipe.training.learning_rate

    # 5. Stages: scale positions, train, probe, gate.
    from .training.safety_callback import SafetyCallback
    from .training.stage_trainer import (
        ResumeFrom,
        SnapshotCallback,
        StageTelemetryCallback,
        train_stage,
        trainer_state_json,
    )

    passkey_builder = PasskeyBuilder(tokenizer, tokenizer.bos_token_id) if recipe.data.synthetic_passkey_share else None
    outcomes: list[StageOutcome] = []
    global_step = 0
    first_losses, last_losses = [], []
    pos: RunPosition | None = resume_point.position if resume_point is not None else None
    if pos is not None:
        # Continue where the snapshot was taken: its weights and the loop's bookkeeping.
        guards.load_weights(model, resume_point.snapshot)
        outcomes = [StageOutcome(**o) for o in pos.outcomes]
        global_step, lr = pos.global_step, pos.learning_rate
        first_losses, last_losses = list(pos.first_losses), list(pos.last_losses)
        if pos.envelope:  # the spike rules' windows and the rollbacks used continue, not restart
            guards.envelope.load_state_dict(pos.envelope)

    def position(**where: Any) -> RunPosition:
        return RunPosition(outcomes=[asdict(o) for o in outcomes], learning_rate=lr,
                           envelope=guards.envelope.state_dict(), **where)

    # rows per optimizer step over all processes: one stage is exactly one pass over its rows
    rows_per_stage_step = (recipe.training.micro_batch_size * recipe.training.gradient_accumulation_steps
                           * dist.world_size)
    for stage in stages:
        if pos is not None and (stage.index < pos.stage or (stage.index == pos.stage and pos.complete)):
            continue  # finished before the interruption
        t_stage = time.time()
        status.update(stage=stage.index, length=stage.length, awaiting_approval=False)
        apply_to_model(model, stage.method, base_length, stage.length, stage.method_params,
                       original_config=original_config)
        pending_resume, carried_losses = None, []
        if pos is not None and stage.index == pos.stage:
            # resumed inside this stage: attempt, step and stage-start snapshot from the position
            stage_start = (guards.cache.get(run_dir.name, pos.stage_start_snapshot) if pos.stage_start_snapshot
                           else resume_point.snapshot)
            attempts, steps_trained, global_step = pos.attempt - 1, pos.steps_trained, pos.attempt_start_step
            if pos.stage_step > 0:
                pending_resume = ResumeFrom(guards.cache.open_files(resume_point.snapshot), pos.trainer_state)
                carried_losses = list(pos.last_losses)
        else:
            stage_start = guards.snapshot(model, global_step, stage.index, pinned=True, position=position(
                stage=stage.index, complete=False, attempt=1, attempt_start_step=global_step, global_step=global_step,
                first_losses=first_losses, last_losses=last_losses))
            attempts, steps_trained = 0, 0
        decision = "pass"
        while True:
            attempts += 1
            resume_from, pending_resume = pending_resume, None
            rows = build_stage_rows(
                train_stream,
                stage.length,
                stage.steps * rows_per_stage_step,
                passkey_share=recipe.data.synthetic_passkey_share,
                passkey_builder=passkey_builder,
                pad_id=tokenizer.pad_token_id,
                seed=recipe.run.seed + 1000 * stage.index + attempts,
                pack=recipe.data.packing,
            )
            rows = mix_in_replay(recipe, rows, train_stream, base_length, tokenizer.pad_token_id,
                                 seed=recipe.run.seed + 7 * stage.index + attempts, teacher=teacher)
            tokens_per_step = stage.length * rows_per_stage_step
            writer.log(global_step, "data/padding_fraction", rows.padding_fraction, stage=stage.index)
            side: dict = {}
            telemetry = StageTelemetryCallback(
                lambda step, name, value, _s=stage.index: writer.log(step, name, value, stage=_s),
                tokens_per_step, global_step, on_step=reporter.advance_training, side_metrics=side,
                flush=writer.flush,
            )
            safety = SafetyCallback(guards.envelope, guards.telegrams, inbox=guards.inbox, step_offset=global_step,
                                    stage=stage.index, tokens_per_step=tokens_per_step, metric_writer=writer)

            def save_resume_point(state, mdl, optimizer, scheduler, _stage=stage.index, _attempt=attempts,
                                  _start=global_step, _done=steps_trained, _telemetry=telemetry,
                                  _carried=carried_losses, _stage_start=stage_start):
                losses = _carried + _telemetry.losses
                guards.commit(mdl, _start + state.global_step, _stage, pinned=False, optimizer=optimizer,
                                scheduler=scheduler, position=position(
                                    stage=_stage, complete=False, attempt=_attempt, stage_step=state.global_step,
                                    attempt_start_step=_start, global_step=_start + state.global_step,
                                    steps_trained=_done, stage_start_snapshot=_stage_start.snapshot_id,
                                    trainer_state=trainer_state_json(state),
                                    # first_losses: the run's, as it is when the snapshot is taken
                                    first_losses=first_losses or losses[:2],  # noqa: B023
                                    last_losses=losses[-2:]))

            snapshots = SnapshotCallback(recipe.training.snapshot_every, save_resume_point)
            # the approval covers this stage's length, steps and data, or the run stops here
            dist.agree(lambda _st=stage, _g=global_step: check_scope(
                grant, stage_length=_st.length, steps_so_far=_g, stage_steps=_st.steps, recipe=recipe,
                stage_index=_st.index), "the approval scope check")
            reporter.start_training(stage, stage.steps)
            trainer = train_stage(model, rows, recipe, stage.steps, run_dir / ".trainer",
                                  recipe.run.seed + stage.index + 100 * attempts, [telemetry, safety, snapshots],
                                  learning_rate=lr, teacher=teacher, distill=distill_config, side_metrics=side,
                                  resume=resume_from)
            reporter.end_training()
            done = trainer.state.global_step
            global_step += done
            steps_trained += done
            guards.relay_telegrams()
            losses, carried_losses = carried_losses + telemetry.losses, []
            if losses:
                if not first_losses:
                    first_losses = losses[:2]
                last_losses = losses[-2:]
            if safety.requested_action in ("halt", "abort"):
                raise RunHalted(
                    f"Training stopped at step {safety.stopped_at_step} of stage {stage.index}: {safety.stop_reason}.",
                    hint="See telegrams.jsonl in the run directory; snapshots are in the checkpoint cache.",
                )
            if safety.requested_action == "rollback":
                # PaLM-style recovery: back to the last good snapshot, other batches, lower LR.
                guards.restore(model, stage_start)
                global_step = stage_start.step
                lr = guards.envelope.rollback_lr(lr)
                writer.log(global_step, "safety/rollback", 1.0, stage=stage.index, lr=lr, reason=safety.stop_reason)
                continue

            reporter.phase(f"stage {stage.index}/{len(stages)}: probing at {stage.length} tokens")
            results = probe_at(model, stage.length, ctx, recipe, with_short=True)
            results += [run_probe(p, model, stage.length, ctx) for p in custom_probes]
            log_probe_results(writer, global_step, results, stage.index, "")
            guards.observe_eval(global_step, stage.index, results)
            failed = gate(stage, results, base_ppl)
            if not failed:
                decision = "pass"
                break
            policy = recipe.context.gate_policy
            if policy == "extend" and attempts == 1:
                decision = "extend"
                writer.log(global_step, "gate/extend", 1.0, stage=stage.index, reasons=failed)
                continue
            decision = {"extend": "stop", "stop": "stop", "rollback": "rollback", "continue": "continue"}[policy]
            break
        writer.log(global_step, "gate/passed", float(not failed), stage=stage.index, decision=decision,
                   reasons=failed or None)
        outcomes.append(StageOutcome(stage.index, stage.length, steps_trained, [asdict(r) for r in results],
                                     not failed, decision, failed, round(time.time() - t_stage, 1)))
        writer.sync()
        if decision == "rollback":
            guards.restore(model, stage_start)
            break
        if decision == "stop":
            break
        guards.snapshot(model, global_step, stage.index, pinned=True, metrics=flatten_results(results),
                        position=position(stage=stage.index, complete=True, global_step=global_step,
                                          first_losses=first_losses, last_losses=last_losses))
        if recipe.context.manual_gates and stage.index < len(stages):
            approvals = [c for c in safety.approvals if c.args.get("stage") in (None, stage.index + 1)]
            dist.agree(lambda _st=stage, _g=global_step, _a=bool(approvals): wait_for_approval(
                guards, status, writer, _st, _g, already=_a,
                timeout_s=recipe.context.manual_gate_timeout_s), "the manual gate")
    guards.close()
    if not dist.is_main:
        return {"total_steps": global_step}  # the main process evaluates, saves and reports

    # 6. Final figures at every length, the adapter and the merged model.
    reporter.phase("final evaluation")
    final_lengths = sorted({base_length, *[s.length for s in stages]})
    reached = max((o.length for o in outcomes if o.decision in ("pass", "continue")), default=base_length)
    if reached != stages[-1].length or outcomes[-1].decision == "rollback":
        # the model ends at the last stage that passed
        apply_to_model(model, recipe.context.method, base_length, max(reached, stages[0].length),
                       recipe.context.method_params, original_config=original_config)
    final_results = []
    for length in final_lengths:
        final_results.extend(probe_at(model, length, ctx, recipe, with_short=False))
    log_probe_results(writer, global_step, final_results, None, "final/")

    reporter.phase("saving adapter and merged model")
    if hasattr(model, "peft_config"):
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
    export_check = None
    if recipe.output.merge:
        export_check = export_merged(model, tokenizer, run_dir / "model", heldout_stream, stages[-1].length,
                                     recipe.output.save_dtype)

    base_figures, final_figures = flatten_results(base_results), flatten_results(final_results)
    target = stages[-1].length
    final_ppl_target = final_figures.get(f"perplexity@{target}")
    final_ppl_base = final_figures.get(f"perplexity@{base_length}")
    summary = {
        "run_id": run_dir.name,
        "model": recipe.model.path,
        "method": recipe.context.method,
        "base_length": base_length,
        "target_length": target,
        "reached_length": reached,
        "stages": [asdict(o) for o in outcomes],
        "total_steps": global_step,
        "trainable_params": trainable,
        "total_params": total,
        "export_check": export_check,
        "train_loss_first": sum(first_losses) / len(first_losses) if first_losses else None,
        "train_loss_last": sum(last_losses) / len(last_losses) if last_losses else None,
        "base": base_figures,
        "final": final_figures,
        "passkey_by_depth": {
            str(r.length): r.details.get("accuracy_by_depth") for r in final_results if r.probe == "passkey"
        },
        "headline": {
            f"passkey@{target}": final_figures.get(f"passkey@{target}"),
            f"base_passkey@{target}": base_figures.get(f"passkey@{target}"),
            f"base_passkey@{base_length}": base_figures.get(f"passkey@{base_length}"),
            f"perplexity@{target}": final_ppl_target,
            f"base_perplexity@{base_length}": base_ppl,
            f"ppl@{target}_vs_base_ppl@{base_length}_pct": (
                100 * (final_ppl_target / base_ppl - 1) if final_ppl_target and base_ppl else None
            ),
            f"short_context_ppl_change_pct@{base_length}": (
                100 * (final_ppl_base / base_ppl - 1) if final_ppl_base and base_ppl else None
            ),
        },
    }
    from .report import write_report

    write_report(run_dir, summary, base_results, final_results)
    return summary


class RunGuards:
    """What watches a run: the safety envelope and its telegrams, the operator's control inbox,
    the alert throttle, and the checkpoint cache holding the stage snapshots."""

    def __init__(self, recipe: Recipe, run_dir: Path, writer: MetricWriter, baseline: dict[str, float],
                 dist=None):
        from .alerts.throttle import CognitiveLoadThrottle
        from .cache.checkpoints import CheckpointCache, default_cache_root
        from .distributed import Dist
        from .safety.envelope import SafetyEnvelope
        from .safety.telegrams import ControlInbox, TelegramWriter
        from .telemetry.reader import JsonlTail

        self.run_dir = run_dir
        self.writer = writer
        self.dist = dist or Dist()
        self.envelope = SafetyEnvelope(recipe.safety, baseline={f"eval/{k}": v for k, v in baseline.items()},
                                       run_id=run_dir.name)
        self.telegrams = TelegramWriter(run_dir, is_main_process=self.dist.is_main)
        self.inbox = ControlInbox(run_dir / "control.jsonl")
        self.throttle = CognitiveLoadThrottle(recipe.alerts,
                                              log_path=run_dir / "alerts.jsonl" if self.dist.is_main else None)
        self.cache = CheckpointCache(default_cache_root(run_dir.parent))  # beside the run folders
        self._telegram_tail = JsonlTail(run_dir / "telegrams.jsonl", from_start=True)

    def snapshot(self, model, step: int, stage: int, *, pinned: bool, metrics: dict | None = None, position=None):
        """A stage-boundary snapshot (a rollback target), committed by the main process; every
        process gets its SnapshotInfo once the commit is complete."""
        info = self.dist.agree(lambda: self.commit(model, step, stage, pinned=pinned, metrics=metrics,
                                                   position=position), "a snapshot commit")
        snapshot_id = self.dist.broadcast_text(info.snapshot_id if info is not None else "")
        return info if info is not None else self.cache.get(self.run_dir.name, snapshot_id)

    def commit(self, model, step: int, stage: int, *, pinned: bool, metrics: dict | None = None,
               position=None, optimizer=None, scheduler=None):
        """Commit a snapshot from this process (the main one). Mid-stage resume points carry
        the optimizer, scheduler and RNG state too, for exact resume."""
        from .cache.checkpoints import PHASE_STAGE_END, PHASE_TRAIN
        from .cache.state import save_snapshot

        self.writer.sync()  # telemetry is durable up to every snapshot
        return save_snapshot(self.cache, self.run_dir.name, step=step, model=model, stage=stage,
                             phase=PHASE_TRAIN if optimizer is not None else PHASE_STAGE_END,
                             metrics=metrics or {}, pinned=pinned, optimizer=optimizer, scheduler=scheduler,
                             data_position=position.to_json() if position is not None else None)

    def load_weights(self, model, snap) -> None:
        from .cache.state import load_snapshot

        load_snapshot(self.cache, snap, model=model, restore_rng=False)

    def restore(self, model, snap) -> None:
        """Rollback: the snapshot's weights, and the envelope forgets what came after it."""
        self.load_weights(model, snap)
        self.envelope.record_rollback(snap.step)

    def observe_eval(self, step: int, stage: int, results: list[ProbeResult]) -> None:
        metrics = {}
        for r in results:
            if r.error:
                continue
            if r.probe == "perplexity":
                metrics[f"eval/perplexity@{r.length}"] = r.metrics["perplexity"]
            elif r.probe == "short_context":
                metrics[f"eval/short_context_regression_pct@{r.length}"] = r.metrics["regression_pct"]
            elif r.probe == "passkey":
                metrics[f"probe/passkey@{r.length}"] = r.metrics["accuracy"]
        self.telegrams.write(self.envelope.observe(step, metrics, stage=stage), force=True)
        self.relay_telegrams()

    def relay_telegrams(self) -> None:
        """Every warn/stop telegram becomes an alert request; the throttle decides the channels."""
        if not self.dist.is_main:
            return
        severity = {"warn": "warning", "stop": "critical"}
        for t in self._telegram_tail.poll():
            if t.get("action") in severity:
                reasons = "; ".join(t.get("reasons") or []) or t["action"]
                self.throttle.request("safety", severity[t["action"]], reasons, key=f"safety/{t['action']}")

    def close(self) -> None:
        self.relay_telegrams()
        self.throttle.flush()


def attach_strategy(recipe: Recipe, model):
    """Add capacity through the strategy registry (``scaling/strategies.py``): PEFT LoRA
    adapters (``lora``), new decoder blocks (``block_expansion``), or a plugin strategy from the
    ``scaler_wizard.strategies`` entry points. Built-ins take their typed recipe section."""
    from .scaling.strategies import get_strategy

    name = recipe.scaling.strategy
    typed = {"lora": recipe.scaling.lora, "block_expansion": recipe.scaling.block_expansion}
    options = typed[name].model_dump() if name in typed else recipe.scaling.options
    return get_strategy(name).prepare(model, options)


def wait_for_approval(guards: RunGuards, status: RunStatus, writer: MetricWriter, stage: Stage, step: int, *,
                      already: bool, timeout_s: float | None, poll_s: float = 0.5) -> None:
    """Manual gate: the next stage starts only after an operator's ``approve`` (cockpit button or
    a control.jsonl line); ``abort`` while waiting halts the run."""
    writer.log(step, "gate/awaiting_approval", 1.0, stage=stage.index)
    writer.sync()
    status.update(state="running", awaiting_approval=True, stage=stage.index, length=stage.length)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    approved = already
    while not approved:
        for cmd in guards.inbox.poll():
            if cmd.action == "abort":
                raise RunHalted(f"Aborted by the operator while waiting for approval of stage {stage.index + 1}.")
            if cmd.action == "approve" and cmd.args.get("stage") in (None, stage.index + 1):
                approved = True
        if not approved:
            if deadline is not None and time.monotonic() > deadline:
                raise RunHalted(f"No approval for stage {stage.index + 1} within {timeout_s:.0f} s.",
                                hint="Approve in the cockpit, or append an approve line to control.jsonl.")
            time.sleep(poll_s)
    writer.log(step, "gate/approved", 1.0, stage=stage.index + 1)


def prepare_distillation(recipe: Recipe, model, tokenizer, original_config, base_length: int):
    """(teacher, DistillConfig) when distillation is on, else (None, None)."""
    d = recipe.distillation
    if not d.enabled:
        return None, None
    from .distill.losses import DistillConfig
    from .distill.teacher import BaseModelTeacher, build_teacher

    config = DistillConfig(divergence=d.divergence, beta=d.beta, temperature=d.temperature, kd_weight=d.kd_weight,
                           chunk_size=recipe.training.loss_chunk_size)
    if d.teacher == "base" and recipe.scaling.strategy == "block_expansion":
        grow = recipe.scaling.block_expansion
        if grow.train_norms or grow.train_embeddings:
            raise PlanError(
                "The 'base' teacher of block expansion is the grown model with its new blocks bypassed; with "
                "train_norms/train_embeddings the old weights change too, so it would not be the base model.",
                hint="Use distillation.teacher: model or offline, or train only the new blocks.",
            )
        from .scaling.strategies import bypass_new_blocks

        teacher = BaseModelTeacher(model, original_config, context_length=d.teacher_context_length or base_length,
                                   extra_views=[bypass_new_blocks])
        return teacher, config

    teacher = build_teacher(
        d.teacher, model, original_config=original_config,
        teacher_path=resolve_path(d.teacher_path) if d.teacher_path else None,
        cache_dir=resolve_path(d.cache) if d.cache else None,
        context_length=d.teacher_context_length or base_length,
        dtype=recipe.model.dtype, student_tokenizer=tokenizer,
    )
    return teacher, config


def mix_in_replay(recipe: Recipe, rows, train_stream: list[int], base_length: int, pad_id: int, seed: int,
                  teacher: Any = None):
    """Replace a share of the stage's rows by base-length rows of the original data (replay).
    With an offline teacher the replay rows are the cache's own rows (their top-k is stored)."""
    ratio = recipe.distillation.replay_ratio
    if not ratio:
        return rows
    from .distill.replay import mix_replay, replay_count, sample_short_rows
    from .distill.teacher import OfflineTeacher

    if isinstance(teacher, OfflineTeacher):
        replay = teacher.cache.token_rows()
    else:
        replay = sample_short_rows(train_stream, base_length, replay_count(len(rows), ratio), seed=seed)
    return mix_replay(rows, replay, ratio, pad_id=pad_id, seed=seed)


def export_merged(model, tokenizer, out: Path, stream: list[int], length: int, save_dtype: str) -> dict[str, Any]:
    """Merge the adapter (if any), save a plain model, reload it with plain transformers and
    compare its logits with the training model's on one held-out window: the export is checked,
    not assumed. A grown model (block expansion) is saved as it is, with its larger config."""
    import torch
    from transformers import AutoModelForCausalLM

    window = torch.tensor([stream[:length]])
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        before = model(input_ids=window.to(device)).logits.float().cpu()
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.to(getattr(torch, save_dtype))
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        after = reloaded(input_ids=window).logits.float()
    diff = (before - after).abs().max().item()
    return {"max_abs_logit_diff": diff, "tokens": int(window.numel()), "dtype": save_dtype}


def flatten_results(results: list[ProbeResult]) -> dict[str, float]:
    """{"perplexity@L", "bits_per_byte@L", "passkey@L"} from probe results (errors skipped)."""
    out: dict[str, float] = {}
    for r in results:
        if r.error:
            continue
        if r.probe == "perplexity":
            out[f"perplexity@{r.length}"] = r.metrics["perplexity"]
            out[f"bits_per_byte@{r.length}"] = r.metrics["bits_per_byte"]
        elif r.probe == "passkey":
            out[f"passkey@{r.length}"] = r.metrics["accuracy"]
    return out


def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


__all__ = ["Reporter", "RunResult", "ScalerWizardError", "check_model_dir", "run"]
