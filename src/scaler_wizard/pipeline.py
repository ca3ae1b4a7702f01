"""The one orchestration path, recipe to report, readable top to bottom:

    check inputs -> run folder -> approval -> load model -> probe the base model -> add
    capacity -> teacher -> stage loop (scale, train, probe, gate) -> final figures -> export
    -> summary and report, with the run's verdict first

Everything that can be wrong with the user's input is checked before the run folder is created
(``preflight.py``); no model is loaded and no drop-in code runs before the run is approved. A
run that fails later is marked ``failed`` in ``status.json`` and never gets a ``summary.json``,
so a half-written run never looks complete. A run whose gates failed completes with the verdict
``gates_failed`` and ends at the last (weights, position encoding) pair that passed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .allocator import tune_cpu_allocator
from .data import token_stream
from .distill.setup import prepare_distillation
from .errors import DataError, PlanError, ScalerWizardError
from .evaluation.figures import log_probe_results, probe_at
from .evaluation.probes import PerplexityProbe, ProbeContext, ProbeResult, run_probe
from .fsutil import utc_now, write_json_atomic
from .models import export_merged, load_causal_lm, save_adapter
from .preflight import RunInputs, check_inputs, load_custom_probes
from .recipe import Recipe, load_recipe, resolve_path
from .run_record import PhaseMarker, Reporter, RunRecorder, RunStatus, build_summary, new_run_dir
from .safety.guards import RunGuards
from .scaling.strategies import attach_strategy
from .training.stage_loop import LoopEnv, LoopResult, StageLoop


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    main_process: bool = True  # False on the other processes of `accelerate launch` (nothing to report)


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
    newest valid snapshot: same recipe, a new approval, the loop restarted at its saved position."""
    from .distributed import Dist

    dist = Dist.from_env()  # under `accelerate launch` every process runs this; only the main one writes
    reporter = (reporter or Reporter()) if dist.is_main else Reporter()

    # 1. Inputs: schema and meaning, all checked before anything is written.
    resume_point = _find_resume_point(resume)
    inputs = _check_inputs(recipe_path, recipe_overrides, resume_point)
    recipe = inputs.recipe

    # 2. The run folder, then the approval.
    run_dir, status = _open_run_dir(inputs, resume_point, contract, dist)
    grant = _approve(inputs, run_dir, status, dist, contract=contract, self_approve=self_approve,
                     interactive=interactive, approvers=approvers, resuming=resume_point is not None)
    reporter = PhaseMarker(reporter, status)  # each phase also goes to status.json
    with RunRecorder(inputs, run_dir, status, grant, dist, resumed_at=resume_point) as record:
        approved = record.keep_until_exit(use_approved_bytes(inputs, grant, dist, run_dir))
        custom_probes = load_custom_probes(recipe, approved.probe_dirs)  # drop-in code runs only now

        # 3. The model, its tokenizer, the token streams.
        reporter.phase(f"loading model from {inputs.model_dir}")
        if not _cuda_available():
            tune_cpu_allocator()  # freed activations go back to the OS (allocator.py)
        model, tokenizer = load_causal_lm(approved.model_dir, dtype=recipe.model.dtype,
                                          attn_implementation=recipe.model.attn_implementation,
                                          quantization=recipe.model.quantization)
        original_config = copy.deepcopy(model.config)
        train_stream = training_tokens(inputs, approved, tokenizer, run_dir, grant, record.writer)
        heldout_stream = token_stream(tokenizer, approved.eval_texts)

        # 4. The base model, unscaled, at the base length and at every stage length.
        reporter.phase("probing the base model")
        ctx = ProbeContext(tokenizer=tokenizer, heldout_stream=heldout_stream, base_length=inputs.base_length,
                           batch_size=recipe.evaluation.probe_batch_size,
                           memory_budget_bytes=int(recipe.evaluation.probe_memory_gb * 2**30)
                           if recipe.evaluation.probe_memory_gb else None)
        base_results = probe_base(model, inputs, ctx, run_dir, record.writer, resumed=resume_point is not None,
                                  write=dist.is_main)

        # 5. Capacity (LoRA adapters or new blocks), the teacher, the guards.
        model = attach_strategy(recipe, model)
        record.log_parameters(model)
        teacher, distill_config = prepare_distillation(recipe, model, tokenizer, original_config,
                                                       inputs.base_length, teacher_dir=approved.teacher_dir,
                                                       cache_dir=approved.cache_dir)
        guards = RunGuards(recipe, run_dir, record.writer, baseline=ctx.baseline, dist=dist)

        # 6. The stages: scale positions, train, probe, gate (a resumed run restarts at its position).
        env = LoopEnv(recipe, run_dir, model, tokenizer, inputs.stages, inputs.base_length, original_config,
                      train_stream, ctx, record.writer, reporter, grant, status, dist, guards, teacher,
                      distill_config, custom_probes, ctx.baseline.get(f"perplexity@{inputs.base_length}"))
        loop = StageLoop(env, *((resume_point.position, resume_point.snapshot) if resume_point else ())).run()
        if not dist.is_main:
            return RunResult(run_dir, {"total_steps": loop.global_step}, main_process=False)

        # 7. Final figures at every length, on the pair the loop ended with.
        reporter.phase("final evaluation")
        final_results = final_probes(model, inputs, ctx, loop, record.writer)

        # 8. The adapter and the merged model (checked by reloading it with plain transformers).
        reporter.phase("saving adapter and merged model")
        export_check = export_outputs(model, tokenizer, recipe, run_dir, heldout_stream, loop.model_length)

        # 9. Summary and report, the verdict first.
        summary = build_summary(inputs, run_dir, loop, base_results, final_results, export_check,
                                record.parameters, ctx.baseline.get(f"perplexity@{inputs.base_length}"))
        return RunResult(run_dir, record.finish(summary, base_results, final_results))


# ------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------


def _find_resume_point(resume: str | Path | None):
    if resume is None:
        return None
    from .resume import find_resume_point

    return find_resume_point(resume)


def _check_inputs(recipe_path, recipe_overrides, resume_point) -> RunInputs:
    if resume_point is not None:
        recipe, _ = load_recipe(resume_point.recipe_file)
        recipe_dir = resume_point.recipe_dir
        if recipe.digest() != resume_point.recipe_digest:
            raise PlanError(f"{resume_point.recipe_file} no longer matches the recipe the run was approved with.",
                            hint="Restore the file, or start a new run with the changed recipe.")
        source = str(resume_point.recipe_file)
    else:
        recipe, recipe_dir = load_recipe(recipe_path)
        if recipe_overrides:
            recipe = recipe_overrides(recipe)
        source = str(recipe_path or "the demo recipe")
    return check_inputs(recipe, recipe_dir, source=source)


def _open_run_dir(inputs: RunInputs, resume_point, contract: Path | None, dist) -> tuple[Path, RunStatus]:
    from .safety.gatekeeper import planned_run_id

    recipe = inputs.recipe
    if resume_point is not None:
        run_dir = resume_point.run_dir
        initial = {k: v for k, v in resume_point.status.items() if k not in ("error", "finished_at")}
        initial["state"] = "awaiting_approval"
        snap = resume_point.snapshot
        initial["resumes"] = [*initial.get("resumes", []), {"at": utc_now(), "snapshot": snap.ref if snap else None,
                                                            "step": snap.step if snap else 0}]
    else:
        created = dist.agree(lambda: new_run_dir(resolve_path(recipe.run.output_dir),
                                                 planned_run_id(recipe, contract), recipe.run.name),
                             "creating the run folder")
        run_dir = Path(dist.broadcast_text(str(created) if created else ""))
        initial = {"state": "awaiting_approval", "started_at": utc_now(), "stage": 0, "stages": len(inputs.stages)}
    return run_dir, RunStatus(run_dir / "status.json", initial, enabled=dist.is_main)


def _approve(inputs: RunInputs, run_dir: Path, status: RunStatus, dist, **how: Any):
    """A signed contract, the explicit self-approval or the terminal signoff; a refusal marks the
    run ``rejected`` (a resumed run: ``failed``) and stops every process."""
    from .safety.gatekeeper import authorize_run

    def approve():
        try:
            return authorize_run(inputs.recipe, inputs.recipe_dir, run_id=run_dir.name, run_dir=run_dir,
                                 contract_path=how["contract"], self_approve=how["self_approve"],
                                 interactive=how["interactive"], approvers_path=how["approvers"],
                                 resuming=how["resuming"])
        except BaseException as exc:
            status.update(state="failed" if how["resuming"] else "rejected", finished_at=utc_now(), error=str(exc))
            raise

    return dist.agree(approve, "the approval")  # None on the other processes: the main one holds it


@dataclass
class ApprovedInputs:
    """Where the run reads what the approval covers: private copies of the approved bytes."""

    model_dir: Path
    teacher_dir: Path | None
    cache_dir: Path | None
    probe_dirs: list[Path]
    train_texts: list[str]
    eval_texts: list[str]
    folder: Path | None = None  # the private copies, removed when the run ends
    data_folders: dict[str, Path] = field(default_factory=dict)  # recipe value -> approved copy of a datasets folder


def use_approved_bytes(inputs: RunInputs, grant, dist, run_dir: Path) -> ApprovedInputs:
    """Close every gap between what was approved and what is used: the data files read before
    the approval must be the approved bytes; the model, teacher, offline cache, drop-in probe
    code and saved data folders are used from private copies (0700) made from bytes hashed while
    copied, so a file swapped or a link repointed after the approval is never read."""
    recipe = inputs.recipe
    d = recipe.distillation

    def copies() -> dict[str, Any]:
        folder = run_dir / f".approved-{os.getpid()}"
        os.mkdir(folder, 0o700)
        for path, size, digest in inputs.data_reads:
            grant.verified.verify_read(path, size, digest)
        bound = {(f.role, f.root) for f in grant.verified.files}

        def copy_of(role: str, root: str | None, name: str) -> str | None:
            return str(grant.materialize(role, root, folder / name)) if root and (role, root) in bound else None

        return {"folder": str(folder), "model": copy_of("model", recipe.model.path, "model"),
                "teacher": copy_of("teacher", d.teacher_path, "teacher"),
                "cache": copy_of("distill_cache", d.cache, "distill_cache"),
                "probes": [copy_of("probe_code", p, f"probes-{i}") for i, p in enumerate(recipe.evaluation.probe_dirs)],
                "data": {v: copy_of("data", v, f"data-{i}") for i, v in enumerate(inputs.data_folders)}}

    if grant is None and dist.is_main:  # pragma: no cover - authorize_run always returns a grant
        raise PlanError("No approval.")
    paths = json.loads(dist.broadcast_text(json.dumps(dist.agree(copies, "copying the approved files"))))
    texts = (inputs.train_texts, inputs.eval_texts)
    if paths["data"]:  # saved datasets folders: read from their approved copies
        from .preflight import read_texts

        texts = read_texts(recipe, inputs.recipe_dir, {k: Path(v) for k, v in paths["data"].items()})[:2]
    optional = (lambda p: Path(p) if p else None)
    return ApprovedInputs(Path(paths["model"]), optional(paths["teacher"]), optional(paths["cache"]),
                          [Path(p) for p in paths["probes"]], *texts, folder=Path(paths["folder"]),
                          data_folders={k: Path(v) for k, v in paths["data"].items() if v})


CORPUS_CACHE_MIN_BYTES = 64 * 2**20  # a training input this large uses the tokenized-corpus cache


def training_tokens(inputs: RunInputs, approved: ApprovedInputs, tokenizer, run_dir: Path, grant, writer):
    """Step 3's training tokens. The tokenized-corpus cache (``corpus.py``: tokenized once, in
    several processes, memory-mapped, windows that respect documents) when ``data.cache_dir`` is
    set, ``data.long_document_upsampling`` is on, or a training input is larger than 64 MiB --
    in ``data.cache_dir``, else ``<run.output_dir>/.cache/tokens``. Otherwise (the demo, small
    corpora) the in-memory token stream, exactly as before. The cache reads the approved bytes
    (checked against the approval as hashed) and leaves the held-out split out of the windows."""
    import numpy as np

    from .corpus import CorpusSampler, tokenize_corpus
    from .data import heldout_indices

    recipe, data = inputs.recipe, inputs.recipe.data
    paths = [approved.data_folders.get(v) or resolve_path(v, inputs.recipe_dir) for v in data.train]
    large = any(_input_bytes(p) > CORPUS_CACHE_MIN_BYTES for p in paths)
    if not (data.cache_dir or data.long_document_upsampling.enabled or large):
        return token_stream(tokenizer, approved.train_texts)
    cache_dir = resolve_path(data.cache_dir) if data.cache_dir else run_dir.parent / ".cache" / "tokens"
    corpus = tokenize_corpus(paths, data.text_field, tokenizer, cache_dir, data.num_proc,
                             verify=grant.verified.verify_read if grant is not None else None)
    parsed = len(approved.train_texts) + (0 if data.eval else len(approved.eval_texts))
    if corpus.num_docs() != parsed:
        raise DataError(f"The tokenized corpus {corpus.path} has {corpus.num_docs()} documents, the training data "
                        f"{parsed}.", hint="Delete that cache folder and run again.")
    weights = np.ones(corpus.num_docs())
    if not data.eval:  # the documents split_heldout gave to the held-out text
        weights[sorted(heldout_indices(parsed, data.eval_fraction, recipe.run.seed))] = 0
    writer.log(0, "data/corpus_tokens", float(corpus.num_tokens()),
               tags={"docs": corpus.num_docs(), "cache": "built" if corpus.built else "read",
                     "path": str(corpus.path)})
    return CorpusSampler(corpus, weights)


def _input_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def probe_base(model, inputs: RunInputs, ctx: ProbeContext, run_dir: Path, writer, *, resumed: bool,
               write: bool = True) -> list[ProbeResult]:
    """The base model, unscaled, at the base length and at every stage length. The results are
    kept in base_probes.json, so a resumed run reuses them instead of probing again."""
    recipe, base_length = inputs.recipe, inputs.base_length
    record = run_dir / "base_probes.json"
    if resumed and record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        ctx.baseline.update(saved["baseline"])
        return [ProbeResult(**r) for r in saved["results"]]
    base_results = []
    for length in recipe.evaluation.evaluate_base_at or [base_length] + [s.length for s in inputs.stages]:
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


def final_probes(model, inputs: RunInputs, ctx: ProbeContext, loop: LoopResult, writer) -> list[ProbeResult]:
    """The figures the summary reports, at the base length and every stage length, on the model
    as the loop left it (its weights with the position encoding they were trained with)."""
    results = []
    for length in sorted({inputs.base_length, *[s.length for s in inputs.stages]}):
        results.extend(probe_at(model, length, ctx, inputs.recipe, with_short=False))
    log_probe_results(writer, loop.global_step, results, None, "final/")
    return results


def export_outputs(model, tokenizer, recipe: Recipe, run_dir: Path, heldout_stream: list[int],
                   length: int) -> dict[str, Any] | None:
    if hasattr(model, "peft_config"):
        save_adapter(model, tokenizer, run_dir / "adapter")
    if not recipe.output.merge:
        return None
    return export_merged(model, tokenizer, run_dir / "model", heldout_stream, length, recipe.output.save_dtype)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["Reporter", "RunResult", "ScalerWizardError", "run"]
