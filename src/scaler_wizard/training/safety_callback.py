"""The Safety Envelope wired into ``transformers.Trainer``.

At every log the callback feeds the training loss, gradient norm and throughput into the
:class:`~scaler_wizard.safety.envelope.SafetyEnvelope`, writes the telegram and, on ``stop``,
sets ``control.should_training_stop`` (the Trainer finishes the current step and leaves its
loop cleanly). At every step end it reads new operator commands from ``control.jsonl``:
``abort`` stops training after the current step, ``rollback`` stops it and asks the pipeline
to restore a snapshot, ``approve`` is recorded.

The callback never restores anything itself. After ``trainer.train()`` returns the pipeline
reads :attr:`SafetyCallback.requested_action` (``None | "halt" | "rollback" | "abort"``),
:attr:`request_args` (an operator rollback's ``{"to_step": N}`` / ``{"to_stage": k}``) and
:attr:`stop_telegram`, restores the snapshot through the checkpoint cache, calls
``envelope.record_rollback(step)`` and lowers the learning rate by ``envelope.rollback_lr``.

Several processes (``accelerate launch``): the Trainer's logged loss and gradient norm are
already reduced across processes, so every process's envelope decides alike; commands are
read by the main process only, and the decision is agreed with one ``all_reduce(MAX)`` of a
small integer per step so that a stop reaches every process at the same step (no process is
left waiting in a collective). Only the main process writes telegrams.

The Trainer must log with ``logging_nan_inf_filter=False``: with the default filter a NaN
loss is replaced in the logs by the running mean and the envelope would never see it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Literal

from transformers import TrainerCallback

from ..safety.envelope import SafetyEnvelope, Telegram
from ..safety.telegrams import ControlCommand, ControlInbox, TelegramWriter
from ..telemetry.sink import MetricWriter

RequestedAction = Literal["halt", "rollback", "abort"]
# agreed across processes with all_reduce(MAX): a larger code wins
_ACTION_CODES: dict[str | None, int] = {None: 0, "halt": 1, "rollback": 2, "abort": 3}
_CODE_ACTIONS = {v: k for k, v in _ACTION_CODES.items()}
_TELEGRAM_CODES = {"continue": 0, "warn": 1, "stop": 2}


def _is_distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always has it
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree_max(code: int, device: Any) -> int:
    """The largest ``code`` over all processes."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class SafetyCallback(TrainerCallback):
    """Feeds the envelope at each log, applies operator commands at each step end."""

    def __init__(
        self,
        envelope: SafetyEnvelope,
        telegrams: TelegramWriter | None = None,
        *,
        inbox: ControlInbox | None = None,
        step_offset: int = 0,
        stage: int | None = None,
        tokens_per_step: int | None = None,
        metric_writer: MetricWriter | None = None,
    ):
        self.envelope = envelope
        self.telegrams = telegrams
        self.inbox = inbox
        self.step_offset = step_offset
        self.stage = stage
        self.tokens_per_step = tokens_per_step
        self.metric_writer = metric_writer
        self.requested_action: RequestedAction | None = None
        self.request_args: dict[str, Any] = {}
        self.stop_telegram: Telegram | None = None
        self.stop_reason: str | None = None
        self.stopped_at_step: int | None = None
        self.approvals: list[ControlCommand] = []
        self.telegram_count = 0
        self._t_last: float | None = None
        self._step_last = 0
        self._distributed = False

    # -- what the pipeline reads after train() ----------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self.requested_action is not None

    def reset(self) -> None:
        """Forget the previous request (the pipeline acted on it and trains again)."""
        self.requested_action, self.request_args = None, {}
        self.stop_telegram, self.stop_reason, self.stopped_at_step = None, None, None

    # -- Trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.reset()
        self.envelope.begin_stage(self.stage)
        self._distributed = _is_distributed()  # the process group exists by now (accelerate)
        self._t_last, self._step_last = time.perf_counter(), state.global_step
        if getattr(args, "logging_nan_inf_filter", False):
            warnings.warn(
                "TrainingArguments.logging_nan_inf_filter=True hides NaN/inf losses from the logs, so the "
                "safety envelope cannot see them; set it to False.", RuntimeWarning, stacklevel=2,
            )

    def on_step_end(self, args, state, control, **kwargs):
        step = self.step_offset + state.global_step
        local = self.requested_action
        if state.is_world_process_zero and self.inbox is not None and local is None:
            local = self._apply_commands(step)
        self._settle(local, control, args, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = self.step_offset + state.global_step
        metrics = self._metrics_from_logs(state, logs or {})
        local = self.requested_action
        if metrics:
            telegram = self.observe(step, metrics, is_main=state.is_world_process_zero)
            if telegram.action == "stop" and local is None:
                local = telegram.resolution or "halt"
        self._settle(local, control, args, step)

    # -- the pieces -------------------------------------------------------------------------------
    def observe(self, step: int, metrics: dict[str, float], *, is_main: bool = True) -> Telegram:
        """Run the envelope on ``metrics`` (also usable for probe results between stages),
        write the telegram, and remember a stop."""
        telegram = self.envelope.observe(step, metrics, stage=self.stage)
        # once a stop is decided, telegram.json keeps showing it: later non-stop telegrams of the
        # same training (e.g. the log of the step an abort arrived in) feed the envelope only
        if self.stop_telegram is None or telegram.action == "stop":
            self._emit(telegram, is_main)
        if telegram.action == "stop" and self.stop_telegram is None:
            self.stop_telegram = telegram
            self.stop_reason = "; ".join(telegram.reasons)
        return telegram

    def _metrics_from_logs(self, state, logs: dict[str, Any]) -> dict[str, float]:
        cfg = self.envelope.config
        metrics: dict[str, float] = {}
        for key, name in (("loss", cfg.loss_metric), ("grad_norm", cfg.grad_norm_metric)):
            if key in logs and logs[key] is not None:
                metrics[name] = float(logs[key])
        for key, value in logs.items():  # already-namespaced metrics (eval/..., probe/...) pass through
            if "/" in key and isinstance(value, (int, float)):
                metrics[key] = float(value)
        if metrics and self.tokens_per_step and self._t_last is not None:
            now = time.perf_counter()
            steps = state.global_step - self._step_last
            if steps > 0 and now > self._t_last:
                metrics[cfg.throughput_metric] = steps * self.tokens_per_step / (now - self._t_last)
                self._t_last, self._step_last = now, state.global_step
        return metrics

    def _apply_commands(self, step: int) -> RequestedAction | None:
        action: RequestedAction | None = None
        for command in self.inbox.poll() if self.inbox is not None else []:
            if command.action == "approve":
                self.approvals.append(command)
                continue
            if action is not None:
                continue  # the first stopping command of the batch decides
            resolution = "rollback" if command.action == "rollback" else "halt"
            reason = f"operator {command.action} from {command.source}" + (f" {command.args}" if command.args else "")
            telegram = self.envelope.operator_stop(step, reason, stage=self.stage, resolution=resolution)
            self._emit(telegram, True)
            self.stop_telegram, self.stop_reason = telegram, reason
            self.request_args = dict(command.args)
            action = "abort" if command.action == "abort" else "rollback"
        return action

    def _emit(self, telegram: Telegram, is_main: bool) -> None:
        self.telegram_count += 1
        if not is_main:
            return
        if self.telegrams is not None:
            self.telegrams.write(telegram)
        if self.metric_writer is not None and telegram.action != "continue":
            self.metric_writer.log(
                telegram.step, "safety/action", float(_TELEGRAM_CODES[telegram.action]), stage=self.stage,
                action=telegram.action, reasons=telegram.reasons, resolution=telegram.resolution,
            )

    def _settle(self, local: RequestedAction | None, control, args, step: int) -> None:
        """Agree on the request across processes and stop the Trainer if there is one."""
        code = _ACTION_CODES[local]
        if self._distributed:
            code = _agree_max(code, getattr(args, "device", None))
        agreed = _CODE_ACTIONS[code]
        if agreed is None:
            return
        if self.requested_action is None:
            self.requested_action = agreed
            self.stopped_at_step = step
            if self.stop_reason is None:
                self.stop_reason = f"{agreed} requested by another process"
        control.should_training_stop = True


class WorkBudgetCallback(TrainerCallback):
    """Charges every optimizer step (and its tokens) to the approval's work budget *before* the
    step runs (``gatekeeper.WorkBudget``: work done, rollbacks and extensions included), so the
    step that would pass the approved ``max_steps``/``max_tokens`` never runs. Only the main
    process holds the budget; with several processes the refusal is agreed (one all-reduce per
    step) and every process raises, so none is left waiting in a collective."""

    def __init__(self, work: Any, tokens_per_step: int):
        self.work = work  # None on the non-main processes
        self.tokens_per_step = tokens_per_step

    def on_step_begin(self, args, state, control, **kwargs):
        from ..errors import ContractError

        error = None
        if self.work is not None:
            try:
                self.work.charge(1, self.tokens_per_step)
            except ContractError as exc:
                error = exc
        if _is_distributed():
            refused = _agree_max(int(error is not None), getattr(args, "device", None))
            if refused and error is None:
                error = ContractError("Scope exceeded on the main process; the run stops here.")
        if error is not None:
            raise error


__all__ = ["RequestedAction", "SafetyCallback", "WorkBudgetCallback"]
