"""What watches a run: the safety envelope and its telegrams, the operator's control inbox,
the alert throttle, the checkpoint cache holding the stage snapshots, and the manual gate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import RunHalted
from ..evaluation.figures import eval_metrics
from ..evaluation.probes import ProbeResult
from ..recipe import Recipe
from ..telemetry.sink import MetricWriter
from .envelope import Telegram


class RunGuards:
    """What watches a run: the safety envelope and its telegrams, the operator's control inbox,
    the alert throttle, and the checkpoint cache holding the stage snapshots."""

    def __init__(self, recipe: Recipe, run_dir: Path, writer: MetricWriter, baseline: dict[str, float],
                 dist=None):
        from ..alerts.throttle import CognitiveLoadThrottle
        from ..cache.checkpoints import CheckpointCache, default_cache_root
        from ..distributed import Dist
        from .envelope import SafetyEnvelope
        from .telegrams import ControlInbox, TelegramWriter
        from ..telemetry.reader import JsonlTail

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

    def snapshot(self, model, step: int, stage: int, *, pinned: bool, metrics: dict | None = None, position=None,
                 optimizer=None, scheduler=None):
        """A stage-boundary snapshot (a rollback target), committed by the main process; every
        process gets its SnapshotInfo once the commit is complete. With an optimizer kept across
        stages (``training.optimizer_scope: run``) its state and the scheduler's go in too."""
        info = self.dist.agree(lambda: self.commit(model, step, stage, pinned=pinned, metrics=metrics,
                                                   position=position, optimizer=optimizer, scheduler=scheduler),
                               "a snapshot commit")
        snapshot_id = self.dist.broadcast_text(info.snapshot_id if info is not None else "")
        return info if info is not None else self.cache.get(self.run_dir.name, snapshot_id)

    def commit(self, model, step: int, stage: int, *, pinned: bool, metrics: dict | None = None,
               position=None, optimizer=None, scheduler=None):
        """Commit a snapshot from this process (the main one). Mid-stage resume points carry
        the optimizer, scheduler and RNG state too, for exact resume."""
        from ..cache.checkpoints import PHASE_STAGE_END, PHASE_TRAIN
        from ..cache.state import save_snapshot

        self.writer.sync()  # telemetry is durable up to every snapshot
        return save_snapshot(self.cache, self.run_dir.name, step=step, model=model, stage=stage,
                             phase=PHASE_TRAIN if optimizer is not None else PHASE_STAGE_END,
                             metrics=metrics or {}, pinned=pinned, optimizer=optimizer, scheduler=scheduler,
                             data_position=position.to_json() if position is not None else None)

    def load_weights(self, model, snap, *, optimizer=None, scheduler=None) -> None:
        """The snapshot's trainable weights (and, when given, the optimizer and scheduler state
        it holds) into the live objects."""
        from ..cache.state import load_snapshot

        if optimizer is not None and "optimizer/state.json" not in snap.files:
            optimizer = scheduler = None  # a snapshot taken without them (an older run)
        load_snapshot(self.cache, snap, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)

    def restore(self, model, snap) -> None:
        """Rollback: the snapshot's weights, and the envelope forgets what came after it."""
        self.load_weights(model, snap)
        self.envelope.record_rollback(snap.step)

    def observe_eval(self, step: int, stage: int, results: list[ProbeResult]) -> Telegram:
        """The envelope's evaluation rules (perplexity and short-context ratios, accuracy
        floors) on a stage's probe figures. The telegram is returned so the stage loop acts on
        it: a ``stop`` rolls the stage back or halts the run (``safety.policy.on_stop``)."""
        telegram = self.envelope.observe(step, eval_metrics(results), stage=stage)
        self.telegrams.write(telegram, force=True)
        self.relay_telegrams()
        return telegram

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


def wait_for_approval(guards: RunGuards, status: Any, writer: MetricWriter, stage: Any, step: int, *,
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
