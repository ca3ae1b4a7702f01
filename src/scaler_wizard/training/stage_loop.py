"""The stage loop: for each planned stage, scale positions, train, probe, gate.

Its live state *is* the :class:`~scaler_wizard.resume.RunPosition` that every snapshot stores,
so a resumed run is the same loop started from a saved position, not a special case: the
weights are loaded, the position encoding they were trained with is applied, and the loop goes
on from there.

What a gate result means is one table (:data:`GATE_POLICY`); what the safety envelope's
telegrams mean is another (:meth:`StageLoop._act_on_telegram`). A run that stops or rolls back
ends at the last (weights, position encoding) pair that passed its gate: the exported model is
always a pair that was trained together.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..context.methods import apply_to_model
from ..context.schedule import Stage
from ..corpus import CorpusSampler
from ..data import build_stage_rows
from ..distill.setup import mix_in_replay
from ..errors import RunHalted
from ..evaluation.figures import flatten_results, gate, log_probe_results, probe_at
from ..evaluation.lm_eval_probe import LmEvalProbe, lm_eval_gate
from ..evaluation.probes import ProbeResult, run_probe
from ..packing import document_attention_for_training
from ..recipe import Recipe
from ..resume import RunPosition
from ..run_record import StageOutcome, mark_phase

# context.gate_policy -> what a failed gate does on the stage's first attempt and afterwards.
#   extend:   train the stage once more (same weights, fresh rows), then stop
#   rollback: retrain once from the stage-start snapshot with a lower learning rate, then end
#             at the previous pair (decision "rollback")
#   stop:     end at the previous pair
#   continue: record the failure and go on (the run's verdict is still "gates_failed")
GATE_POLICY: dict[str, tuple[str, str]] = {
    "extend": ("extend", "stop"),
    "rollback": ("retry", "rollback"),
    "stop": ("stop", "stop"),
    "continue": ("continue", "continue"),
}
ENDS_THE_RUN = frozenset({"stop", "rollback"})


def gate_decision(policy: str, passed: bool, attempt: int) -> str:
    """``pass``, or the policy's answer to a failed gate on this attempt (see GATE_POLICY)."""
    if passed:
        return "pass"
    first, later = GATE_POLICY[policy]
    return first if attempt == 1 else later


@dataclass
class LoopEnv:
    """What the loop works with and never replaces."""

    recipe: Recipe
    run_dir: Path
    model: Any
    tokenizer: Any
    stages: list[Stage]
    base_length: int
    original_config: Any
    train_stream: Any  # list[int], or a corpus.CorpusSampler (the tokenized-corpus cache)
    probe_ctx: Any
    writer: Any
    reporter: Any
    grant: Any
    status: Any
    dist: Any
    guards: Any
    teacher: Any = None
    distill_config: Any = None
    custom_probes: list[Any] = field(default_factory=list)
    base_ppl: float | None = None


@dataclass
class LoopResult:
    outcomes: list[StageOutcome]
    global_step: int
    model_length: int  # the position encoding the final weights were trained with
    first_losses: list[float]
    last_losses: list[float]


class StageLoop:
    def __init__(self, env: LoopEnv, start: RunPosition | None = None, start_snapshot: Any = None):
        self.env = env
        recipe = env.recipe
        self.pos = start or RunPosition(stage=env.stages[0].index, complete=False,
                                        learning_rate=recipe.training.learning_rate, model_length=env.base_length)
        self.start_snapshot = start_snapshot  # the snapshot a resumed run starts from
        self.outcomes = [StageOutcome(**o) for o in self.pos.outcomes]
        self.optimizers: tuple[Any, Any] | None = None  # training.optimizer_scope: run
        # rows per optimizer step over all processes: one stage is exactly one pass over its rows
        t = recipe.training
        self.rows_per_step = t.micro_batch_size * t.gradient_accumulation_steps * env.dist.world_size
        self.passkey_builder = None
        if recipe.data.synthetic_passkey_share:
            from ..evaluation.passkey import MixedTemplateBuilder

            # training rows use the training wordings only: the probe's template stays unseen
            self.passkey_builder = MixedTemplateBuilder(env.tokenizer, env.tokenizer.bos_token_id)
        self.sharded = self._shard() if t.sharding == "fsdp2" and env.dist.enabled else None
        lm_eval_spec = recipe.evaluation.lm_eval  # lm-eval tasks as probes: after each stage, gated
        self.lm_eval = LmEvalProbe(lm_eval_spec, env.tokenizer) if lm_eval_spec is not None else None

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> LoopResult:
        if self.start_snapshot is not None:
            self._restore_start()
        for stage in self.env.stages:
            if self.pos.finished:
                break
            if stage.index < self.pos.stage or (stage.index == self.pos.stage and self.pos.complete):
                continue  # finished before the interruption
            self._run_stage(stage)
        if self.sharded is not None:  # the main process exports alone: gather the whole model there
            from .sharded import gather_and_unshard

            gather_and_unshard(self.env.model, self.env.dist)
        self.env.guards.close()
        return LoopResult(self.outcomes, self.pos.global_step, self.pos.model_length or self.env.base_length,
                          list(self.pos.first_losses), list(self.pos.last_losses))

    def _restore_start(self) -> None:
        """A resumed run: the position encoding the snapshot's weights go with, then the weights,
        then the envelope's windows -- and, past a finished stage with a manual gate, the gate."""
        pos, env = self.pos, self.env
        if pos.complete:
            self._set_length(pos.model_length or self._derived_model_length())
        else:
            self._set_length(self._stage(pos.stage).length)
        self._load_weights(self.start_snapshot, **self._optimizer_kwargs())
        if pos.work and env.grant is not None:  # the approval's work done before the interruption
            env.grant.work.restore(pos.work)
        if pos.envelope:  # the spike rules' windows and the rollbacks used continue, not restart
            env.guards.envelope.load_state_dict(pos.envelope)
        if pos.complete and not pos.finished:
            self._manual_gate(self._stage(pos.stage))

    def _derived_model_length(self) -> int:
        """model_length of a snapshot written before the field existed."""
        kept = [o.length for o in self.outcomes if o.decision in ("pass", "continue")]
        return kept[-1] if kept else self.env.base_length

    def _run_stage(self, stage: Stage) -> None:
        env, pos = self.env, self.pos
        t_stage = time.time()
        env.status.update(stage=stage.index, length=stage.length, awaiting_approval=False)
        previous_length = self._derived_model_length()
        self._set_length(stage.length)
        attempt = self._begin_stage(stage)
        while True:
            trainer, safety, losses = self._train_attempt(stage, attempt)
            action = safety.requested_action
            if action in ("halt", "abort"):
                raise RunHalted(
                    f"Training stopped at step {safety.stopped_at_step} of stage {stage.index}: {safety.stop_reason}.",
                    hint="See telegrams.jsonl in the run directory; snapshots are in the checkpoint cache.",
                )
            if action == "rollback":  # PaLM-style recovery: stage start, other batches, lower LR
                self._retry_from_stage_start(stage, attempt, safety.stop_reason, count_rollback=True)
                continue
            results = self._probe(stage)
            failed = gate(stage, results, env.base_ppl) + lm_eval_gate(results, env.recipe.evaluation.lm_eval)
            telegram = env.guards.observe_eval(pos.global_step, stage.index, results)
            if telegram.action == "stop":
                reasons = "; ".join(telegram.reasons)
                if telegram.resolution == "rollback":
                    self._retry_from_stage_start(stage, attempt, f"evaluation: {reasons}", count_rollback=True)
                    continue
                raise RunHalted(f"The safety envelope stopped the run after stage {stage.index}'s probes: {reasons}.",
                                hint="See telegrams.jsonl; loosen safety.evaluation or fix the recipe.")
            decision = gate_decision(env.recipe.context.gate_policy, not failed, attempt.number)
            if decision == "extend":
                env.writer.log(pos.global_step, "gate/extend", 1.0, stage=stage.index, reasons=failed)
                attempt = self._next_attempt(attempt)
                continue
            if decision == "retry":
                env.writer.log(pos.global_step, "gate/retry", 1.0, stage=stage.index, reasons=failed)
                self._retry_from_stage_start(stage, attempt, "gate failed", count_rollback=False)
                continue
            break
        # an operator may approve the next stage while this one trains
        approved = any(c.args.get("stage") in (None, stage.index + 1) for c in safety.approvals)
        self._end_stage(stage, decision, failed, results, attempt, previous_length, time.time() - t_stage,
                        approved)

    def _end_stage(self, stage: Stage, decision: str, failed: list[str], results: list[ProbeResult],
                   attempt: _StageAttempt, previous_length: int, wall_s: float, approved: bool) -> None:
        env, pos = self.env, self.pos
        env.writer.log(pos.global_step, "gate/passed", float(not failed), stage=stage.index, decision=decision,
                       reasons=failed or None)
        self.outcomes.append(StageOutcome(stage.index, stage.length, pos.steps_trained, [asdict(r) for r in results],
                                          not failed, decision, failed, round(wall_s, 1)))
        env.writer.sync()
        if decision in ENDS_THE_RUN:
            # back to the last pair that passed: the stage-start weights with the previous length
            self._load_weights(attempt.stage_start)
            self._set_length(previous_length)
            env.writer.log(pos.global_step, "gate/ended_at_length", float(previous_length), stage=stage.index)
        pos.complete, pos.finished = True, decision in ENDS_THE_RUN or stage.index == len(env.stages)
        pos.model_length = previous_length if decision in ENDS_THE_RUN else stage.length
        pos.stage_step, pos.trainer_state = 0, None
        mark_phase(env.status, f"stage {stage.index}: stage-complete snapshot")
        self._snapshot(stage.index, pinned=True, metrics=flatten_results(results))
        if not pos.finished:
            self._manual_gate(stage, already=approved)

    # ------------------------------------------------------------------------- the attempts
    def _begin_stage(self, stage: Stage) -> _StageAttempt:
        """The attempt to train first: a fresh one with a stage-start snapshot, or the one a
        resumed run was inside of."""
        env, pos = self.env, self.pos
        if self.start_snapshot is not None and pos.stage == stage.index and not pos.complete:
            start, self.start_snapshot = self.start_snapshot, None
            stage_start = env.guards.cache.get(env.run_dir.name, pos.stage_start_snapshot) \
                if pos.stage_start_snapshot else start
            attempt = _StageAttempt(pos.attempt, stage_start)
            if pos.stage_step > 0:
                from .stage_trainer import ResumeFrom

                attempt.resume_from = ResumeFrom(env.guards.cache.open_files(start), pos.trainer_state,
                                                 sharded=self._sharded_loader(start))
                attempt.carried_losses = list(pos.last_losses)
            pos.global_step = pos.attempt_start_step
            return attempt
        pos.stage, pos.complete, pos.attempt, pos.stage_step = stage.index, False, 1, 0
        pos.attempt_start_step, pos.steps_trained = pos.global_step, 0
        pos.stage_start_snapshot, pos.trainer_state = None, None
        stage_start = self._snapshot(stage.index, pinned=True)
        return _StageAttempt(1, stage_start)

    def _next_attempt(self, attempt: _StageAttempt) -> _StageAttempt:
        self.pos.attempt = attempt.number + 1
        self.pos.attempt_start_step = self.pos.global_step
        self.pos.stage_step = 0
        return _StageAttempt(attempt.number + 1, attempt.stage_start)

    def _retry_from_stage_start(self, stage: Stage, attempt: _StageAttempt, reason: str, *,
                                count_rollback: bool) -> None:
        """Back to the stage-start snapshot with a lower learning rate; the next attempt trains
        on other batches (its rows are seeded by the attempt number)."""
        env, pos = self.env, self.pos
        self._load_weights(attempt.stage_start, **self._optimizer_kwargs())
        if count_rollback:
            env.guards.envelope.record_rollback(attempt.stage_start.step)
        pos.global_step = attempt.stage_start.step
        lowered = env.guards.envelope.rollback_lr(pos.learning_rate)
        if self.optimizers is not None:
            from .stage_trainer import scale_learning_rate

            scale_learning_rate(*self.optimizers, lowered / pos.learning_rate)
        pos.learning_rate = lowered
        env.writer.log(pos.global_step, "safety/rollback", 1.0, stage=stage.index, lr=pos.learning_rate, reason=reason)
        nxt = self._next_attempt(attempt)
        attempt.number, attempt.resume_from, attempt.carried_losses = nxt.number, None, []

    def _train_attempt(self, stage: Stage, attempt: _StageAttempt):
        from .safety_callback import SafetyCallback, WorkBudgetCallback
        from .stage_trainer import SnapshotCallback, StageTelemetryCallback, train_stage, trainer_state_json

        env, pos, recipe = self.env, self.pos, self.env.recipe
        resume_from, attempt.resume_from = attempt.resume_from, None
        carried, attempt.carried_losses = attempt.carried_losses, []
        rows = self._rows(stage, attempt.number)
        tokens_per_step = (env.base_length if recipe.context.pose else stage.length) * self.rows_per_step
        env.writer.log(pos.global_step, "data/padding_fraction", rows.padding_fraction, stage=stage.index)
        side: dict = {}
        start_step = pos.global_step
        telemetry = StageTelemetryCallback(
            lambda step, name, value, _s=stage.index: env.writer.log(step, name, value, stage=_s),
            tokens_per_step, start_step, on_step=env.reporter.advance_training, side_metrics=side,
            flush=env.writer.flush,
        )
        safety = SafetyCallback(env.guards.envelope, env.guards.telegrams, inbox=env.guards.inbox,
                                step_offset=start_step, stage=stage.index, tokens_per_step=tokens_per_step,
                                metric_writer=env.writer)

        def save_resume_point(state, model, optimizer, scheduler):
            losses = carried + telemetry.losses
            pos.stage_step, pos.global_step = state.global_step, start_step + state.global_step
            pos.stage_start_snapshot = attempt.stage_start.snapshot_id
            pos.trainer_state = trainer_state_json(state)
            pos.model_length = stage.length
            first = pos.first_losses or losses[:2]
            commit = env.guards.commit if self.sharded is None else self._sharded_commit
            commit(model, pos.global_step, stage.index, pinned=False, optimizer=optimizer,
                   scheduler=scheduler, position=self._position(first_losses=first, last_losses=losses[-2:]))

        snapshots = SnapshotCallback(recipe.training.snapshot_every, save_resume_point,
                                     collective=self.sharded is not None)
        budget = WorkBudgetCallback(env.grant.work if env.grant is not None else None, tokens_per_step)
        # a resumed attempt has done pos.stage_step of its steps already (charged before the kill)
        self._check_scope(stage, stage.steps - (pos.stage_step if resume_from is not None else 0), tokens_per_step)
        env.reporter.start_training(stage, stage.steps)
        # packed rows: causal attention per document, no dense block mask (packing.py)
        with document_attention_for_training(env.model, recipe.data.packing and self.sharded is None):
            trainer = train_stage(env.model, rows, recipe, stage.steps, env.run_dir / ".trainer",
                                  recipe.run.seed + stage.index + 100 * attempt.number,
                                  [budget, telemetry, safety, snapshots],
                                  learning_rate=pos.learning_rate, teacher=env.teacher, distill=env.distill_config,
                                  side_metrics=side, resume=resume_from, optimizers=self._run_optimizers())
        env.reporter.end_training()
        done = trainer.state.global_step  # a resumed attempt counts the steps before the snapshot too
        pos.global_step = start_step + done
        pos.steps_trained += done
        pos.stage_step = 0
        env.guards.relay_telegrams()
        losses = carried + telemetry.losses
        if losses:
            if not pos.first_losses:
                pos.first_losses = losses[:2]
            pos.last_losses = losses[-2:]
        return trainer, safety, losses

    def _rows(self, stage: Stage, attempt_number: int):
        env, recipe = self.env, self.env.recipe
        pose = recipe.context.pose  # PoSE: base-length windows, positions skipping to the stage length
        rows = build_stage_rows(
            self._stage_source(stage),
            env.base_length if pose else stage.length,
            stage.steps * self.rows_per_step,
            passkey_share=recipe.data.synthetic_passkey_share,
            passkey_builder=self.passkey_builder,
            pad_id=env.tokenizer.pad_token_id,
            seed=recipe.run.seed + 1000 * stage.index + attempt_number,
            pack=recipe.data.packing,
            pose_target=stage.length if pose else None,
            pose_chunks=recipe.context.pose_chunks,
        )
        return mix_in_replay(recipe, rows, env.train_stream, env.base_length, env.tokenizer.pad_token_id,
                             seed=recipe.run.seed + 7 * stage.index + attempt_number, teacher=env.teacher)

    def _stage_source(self, stage: Stage) -> Any:
        """The stage's training tokens: with data.long_document_upsampling (only on the corpus
        cache), the sampler reweighted for this stage's length, its mix logged per source."""
        env, ups = self.env, self.env.recipe.data.long_document_upsampling
        if not (ups.enabled and isinstance(env.train_stream, CorpusSampler)):
            return env.train_stream
        source, mix = env.train_stream.upsampled(ups.min_length or stage.length, ups.factor)
        for name, m in mix.items():
            tags = {"source": name, "min_length": ups.min_length or stage.length, "factor": ups.factor}
            env.writer.log(self.pos.global_step, "data/source_token_share", m["token_share_after"], stage=stage.index,
                           tags={**tags, "before": m["token_share_before"]})
            env.writer.log(self.pos.global_step, "data/long_doc_share", m["long_doc_share_after"], stage=stage.index,
                           tags={**tags, "before": m["long_doc_share_before"], "docs": m["docs"],
                                 "long_docs": m["long_docs"]})
        return source

    def _check_scope(self, stage: Stage, steps: int, tokens_per_step: int) -> None:
        """Before every attempt: the approval still stands and covers this stage's length, steps,
        tokens and data (work done so far counted, rollbacks included), and every bound input
        file still has its approved bytes -- or the run stops here."""
        from ..safety.gatekeeper import check_scope

        env = self.env
        env.dist.agree(lambda: check_scope(
            env.grant, stage_length=stage.length, steps_so_far=env.grant.work.steps, stage_steps=steps,
            tokens_so_far=env.grant.work.tokens, stage_tokens=steps * tokens_per_step,
            data_sha256=env.grant.verified.data_sha256, recipe=env.recipe, stage_index=stage.index,
            recheck_files=True, require_counts=True), "the approval scope check")

    # -------------------------------------------------------------------------- the pieces
    def _probe(self, stage: Stage) -> list[ProbeResult]:
        env = self.env
        env.reporter.phase(f"stage {stage.index}/{len(env.stages)}: probing at {stage.length} tokens")
        results = probe_at(env.model, stage.length, env.probe_ctx, env.recipe, with_short=True)
        results += [run_probe(p, env.model, stage.length, env.probe_ctx) for p in env.custom_probes]
        if self.lm_eval is not None:
            results += self.lm_eval.run(env.model, stage.length)
        log_probe_results(env.writer, self.pos.global_step, results, stage.index, "")
        return results

    def _set_length(self, length: int) -> None:
        """Apply the position encoding of ``length`` (the base length: the original one)."""
        env = self.env
        if length <= env.base_length:
            apply_to_model(env.model, "none", env.base_length, env.base_length, original_config=env.original_config)
            return
        stage = next((s for s in env.stages if s.length == length), None)
        method, params = (stage.method, stage.method_params) if stage else (env.recipe.context.method,
                                                                            env.recipe.context.method_params)
        apply_to_model(env.model, method, env.base_length, length, params, original_config=env.original_config)

    def _stage(self, index: int) -> Stage:
        return next(s for s in self.env.stages if s.index == index)

    def _position(self, **override: Any) -> RunPosition:
        data = asdict(self.pos)
        data.update(outcomes=[asdict(o) for o in self.outcomes], envelope=self.env.guards.envelope.state_dict(),
                    **override)
        if self.env.grant is not None:  # the approval's work budget, carried across a resume
            data["work"] = self.env.grant.work.to_dict()
        return RunPosition(**data)

    def _snapshot(self, stage_index: int, *, pinned: bool, metrics: dict | None = None):
        """A stage-boundary snapshot (a rollback and resume target) of the loop's position."""
        if self.sharded is not None:
            return self._sharded_commit(self.env.model, self.pos.global_step, stage_index, pinned=pinned,
                                        metrics=metrics, position=self._position(), **self._optimizer_kwargs())
        return self.env.guards.snapshot(self.env.model, self.pos.global_step, stage_index, pinned=pinned,
                                        metrics=metrics, position=self._position(), **self._optimizer_kwargs())

    # ------------------------------------------------- sharded mode (training.sharding: fsdp2)
    def _shard(self):
        """FSDP2 over every process (training/sharded.py), after the strategy was attached."""
        from ..errors import PlanError
        from .sharded import ShardedCheckpoints, local_parameter_bytes, shard_model

        env = self.env
        if env.teacher is not None:
            raise PlanError("training.sharding: fsdp2 does not support distillation yet (the teacher would need "
                            "its own sharding).", hint="Set distillation.enabled: false, or training.sharding: none.")
        shard_model(env.model, env.dist.world_size)
        env.writer.log(self.pos.global_step, "dist/param_bytes_per_process", float(local_parameter_bytes(env.model)),
                       processes=env.dist.world_size)
        return ShardedCheckpoints(env.guards.cache, env.run_dir.name, env.dist)

    def _sharded_commit(self, model, step: int, stage: int, **kwargs: Any):
        self.env.writer.sync()  # telemetry is durable up to every snapshot (a no-op off the main process)
        return self.sharded.commit(model, step, stage, **kwargs)

    def _load_weights(self, snap, **kwargs: Any) -> None:
        if self.sharded is not None:
            self.sharded.load(self.env.model, snap, **kwargs)
        else:
            self.env.guards.load_weights(self.env.model, snap, **kwargs)

    def _sharded_loader(self, snap):
        if self.sharded is None:
            return None
        return lambda model, **kwargs: self.sharded.load(model, snap, **kwargs)

    def _run_optimizers(self) -> tuple[Any, Any] | None:
        """The run-wide optimizer and schedule (``training.optimizer_scope: run``), built once
        over every planned step; None: each attempt's Trainer builds its own."""
        if self.env.recipe.training.optimizer_scope != "run":
            return None
        if self.optimizers is None:
            from .stage_trainer import run_optimizer

            total = sum(s.steps for s in self.env.stages)
            self.optimizers = run_optimizer(self.env.model, self.env.recipe, total)
        return self.optimizers

    def _optimizer_kwargs(self) -> dict[str, Any]:
        shared = self._run_optimizers()
        return {"optimizer": shared[0], "scheduler": shared[1]} if shared else {}

    def _manual_gate(self, stage: Stage, *, already: bool = False) -> None:
        """With ``context.manual_gates`` the next stage starts only after an operator's approve."""
        env = self.env
        if not env.recipe.context.manual_gates or stage.index >= len(env.stages):
            return
        from ..safety.guards import wait_for_approval

        mark_phase(env.status, f"stage {stage.index}: manual gate")
        env.dist.agree(lambda: wait_for_approval(env.guards, env.status, env.writer, stage, self.pos.global_step,
                                                 already=already, timeout_s=env.recipe.context.manual_gate_timeout_s),
                       "the manual gate")


@dataclass
class _StageAttempt:
    number: int
    stage_start: Any  # SnapshotInfo of the stage-start snapshot
    resume_from: Any = None  # ResumeFrom: a mid-stage snapshot to continue from
    carried_losses: list[float] = field(default_factory=list)
