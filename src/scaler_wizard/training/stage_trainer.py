"""One stage of training through ``transformers.Trainer`` (devices, accumulation, gradient
checkpointing and ``accelerate launch`` come from it), with our loss and our callbacks.

The loss is computed from the decoder's hidden states with :func:`chunked_token_ce` so the
full-vocabulary logits are never materialised, and balanced per task (language modelling vs
synthetic retrieval rows).

Exact resume (``scaler-wizard run --resume``) goes through the Trainer's own resume path --
``train(resume_from_checkpoint=DIR)`` restores ``global_step``, skips the batches already seen
(``skip_first_batches``) and re-syncs the RNG after the skip -- but every loader that would
``torch.load`` a pickle is overridden to read our snapshot instead (safetensors + JSON,
``cache/state.py``). DIR only holds the Trainer's own ``trainer_state.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, TrainerState

from ..errors import PlanError
from ..losses.chunked_ce import chunked_token_ce, target_task, task_balanced_mean, task_means
from ..models import decoder_and_head
from ..recipe import Recipe

TASK_NAMES = {0: "lm", 1: "retrieval"}  # data.TASK_LM, data.TASK_PASSKEY


class ScalingTrainer(Trainer):
    """Trainer with the chunked, task-balanced loss and, when a teacher is given, the chunked
    distillation loss ``(1-lambda)*CE + lambda*T^2*KD`` (``distill/losses.py``)."""

    def __init__(self, *args: Any, loss_chunk_size: int | str = "auto", teacher: Any = None, distill: Any = None,
                 side_metrics: dict[str, float] | None = None, resume_files: Mapping[str, Any] | None = None,
                 task_weights: Mapping[int, float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # snapshot files (logical name -> path) that the overridden loaders below read on resume
        self.resume_files = resume_files
        # sharded mode (training.sharding: fsdp2): the snapshot loader of training/sharded.py
        self.sharded_resume: Callable[..., None] | None = None
        self.loss_chunk_size = loss_chunk_size
        self.task_weights = dict(task_weights or {})
        self.teacher = teacher
        self.distill = distill
        # running sums of the loss parts since the last log, read by StageTelemetryCallback
        self.side_metrics = side_metrics if side_metrics is not None else {}
        # Our loss is a mean already; let the Trainer scale it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``train/loss`` is the sum over the tasks present in the batch of ``task_weights[task] x
        mean CE of that task`` (language modelling: every token; retrieval: the answer tokens);
        with a teacher it becomes ``(1-lambda) x that + lambda x T^2 x KD``. The per-task means
        are logged beside it (``train/loss/lm``, ``train/loss/retrieval``, ``train/loss/kd``)
        with the retrieval rows' answer-token accuracy, so no part can hide inside the sum."""
        labels = inputs["labels"]
        # per-row task [B], or per-token task [B, T] (packed rows) cut to the targets labels[:, 1:]
        task = target_task(inputs.get("task"))
        hidden, head = self._hidden_states(model, inputs)
        targets = labels[:, 1:]
        if self.teacher is not None:
            from ..distill.losses import distillation_loss

            # PoSE rows: the teacher reads the window at its own contiguous positions
            teacher_batch = self.teacher(model, {k: v for k, v in inputs.items() if k not in ("position_ids", "pose")}
                                         if "pose" in inputs else inputs)
            out = distillation_loss(hidden[:, :-1], head.weight, targets, teacher_batch, self.distill,
                                    bias=head.bias, task=task, task_weights=self.task_weights)
            loss, by_task = out.loss, out.extras["ce_by_task"]
            # detached tensors, summed where they live: float() here would wait for the device every step
            self._accumulate("distill/ce", out.ce.detach())
            self._accumulate("distill/kl", out.kd.detach())
            self._accumulate("train/loss/kd", out.kd.detach())
        else:
            # predict token t+1 from position t
            token_loss = chunked_token_ce(
                hidden[:, :-1], head.weight, targets, bias=head.bias, chunk_size=self.loss_chunk_size
            )
            by_task = {k: v.detach() for k, v in task_means(token_loss, targets, task).items()}
            loss = task_balanced_mean(token_loss, targets, task, self.task_weights)
        for kind, mean in by_task.items():
            self._accumulate(f"train/loss/{TASK_NAMES.get(kind, kind)}", mean)
        self._retrieval_accuracy(hidden[:, :-1], head, targets, task)
        return (loss, {"loss": loss}) if return_outputs else loss

    @torch.no_grad()
    def _retrieval_accuracy(self, hidden, head, targets, task) -> None:
        """Greedy accuracy on the retrieval rows' answer tokens (a handful per row: cheap)."""
        if task is None:
            return
        from ..data import TASK_PASSKEY

        rows = task[:, None].expand_as(targets) if task.dim() == 1 else task
        mask = (targets != -100) & (rows == TASK_PASSKEY)
        if not bool(mask.any()):
            return
        logits = torch.nn.functional.linear(hidden[mask].to(head.weight.dtype), head.weight, head.bias)
        correct = (logits.argmax(-1) == targets[mask]).float().mean()
        self._accumulate("train/retrieval_token_acc", correct)

    def _hidden_states(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Module]:
        """The decoder's final (normalised) hidden states and the output projection.

        Packed rows (packing.py) carry per-document position_ids and no attention_mask:
        transformers then keeps attention inside each document (use_cache=False is required).
        """
        decoder, head = decoder_and_head(self.model)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
                  "position_ids": inputs.get("position_ids"), "use_cache": False}
        # (a model sharded with FSDP2 is never wrapped, but its root must run to gather its shards)
        if model is self.model and not self.is_distributed_loading_by_transformers:
            return decoder(**kwargs).last_hidden_state, head
        # Wrapped for several processes (DDP / FSDP): the forward must go through the wrapper
        # (DDP prepares its gradient all-reduce there, FSDP gathers its shards), so run the whole
        # model with logits for one position only and catch the decoder's output on the way.
        captured: list[torch.Tensor] = []
        handle = decoder.register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
        try:
            model(**kwargs, logits_to_keep=1)
        finally:
            handle.remove()
        return captured[-1], head

    def _accumulate(self, name: str, value: float | torch.Tensor) -> None:
        total, count = self.side_metrics.get(name, (0.0, 0))
        self.side_metrics[name] = (total + value, count + 1)

    # --- resume: the Trainer's loaders, reading our safe snapshot instead of pickles ---------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from ..cache.state import apply_training_state

        if self.sharded_resume is not None:
            self.sharded_resume(model or self.model, parts=("model",))
            return

        apply_training_state(self._resume_required(), model=model or self.model, restore_rng=False)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from ..cache.state import load_component

        if self.sharded_resume is not None:
            self.sharded_resume(self.model, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                parts=("optimizer", "scheduler"))
            return
        files = self._resume_required()
        self.optimizer.load_state_dict(load_component(files, "optimizer"))
        self.lr_scheduler.load_state_dict(load_component(files, "scheduler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called by the Trainer *after* it skipped the consumed batches, so the generators
        # continue exactly where the interrupted run left them at the snapshot step.
        if checkpoint is None:
            return
        from ..cache.state import load_component, set_rng_state

        if self.sharded_resume is not None:
            self.sharded_resume(self.model, parts=(), restore_rng=True)
            return
        set_rng_state(load_component(self._resume_required(), "rng"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        return  # no GradScaler state in our snapshots (fp16 mixed precision keeps its default)

    def _resume_required(self) -> Mapping[str, Any]:
        if self.resume_files is None:
            raise RuntimeError("resume_from_checkpoint needs the snapshot files (resume_files)")
        return self.resume_files


def run_optimizer(model: Any, recipe: Recipe, total_steps: int) -> tuple[Any, Any]:
    """One AdamW and one LR schedule for the whole run (``training.optimizer_scope: run``): the
    Trainer's defaults (betas 0.9/0.999, eps 1e-8, no weight decay on biases and norms), the
    recipe's learning rate, warm-up and schedule over every planned step of every stage."""
    from transformers import get_scheduler

    t = recipe.training
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate, betas=(0.9, 0.999),
                                  eps=1e-8)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=min(t.warmup_steps, total_steps - 1),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Lower a run-wide schedule after a rollback (PaLM restarted at a lower learning rate)."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def task_weight_ids(weights: Mapping[str, float]) -> dict[int, float]:
    """The recipe's ``{"lm": w, "retrieval": w}`` as task ids."""
    ids = {name: kind for kind, name in TASK_NAMES.items()}
    return {ids[name]: float(w) for name, w in weights.items()}


def trainer_state_json(state: TrainerState) -> str:
    """The Trainer's own state as ``TrainerState.save_to_json`` writes it (plain JSON)."""
    return json.dumps(dataclasses.asdict(state), sort_keys=True)


@dataclass
class ResumeFrom:
    """A mid-stage snapshot to continue from: its files and the Trainer state saved with it."""

    files: Mapping[str, Any]
    trainer_state_json: str
    sharded: Callable[..., None] | None = None  # sharded mode: loads the snapshot into the sharded objects


class SnapshotCallback(TrainerCallback):
    """Commits a resumable snapshot every ``every`` optimizer steps (main process only).

    The snapshot is taken at the step's *log* (a log is forced on snapshot steps), after the
    safety callback has judged that step: a step the envelope stopped, or one that left a
    non-finite trainable weight, is never committed as a resume point. Nothing between the end
    of a step and its log draws random numbers, so the RNG state captured here is the one the
    next step starts from.
    """

    def __init__(self, every: int, save: Callable[[TrainerState, Any, Any, Any], None], *, collective: bool = False):
        self.every = every
        self.save = save
        # sharded mode: every process takes part in the commit (each writes its own shard)
        self.collective = collective
        self.model = self.optimizer = self.lr_scheduler = None

    def _due(self, state: TrainerState) -> bool:
        return self.every > 0 and state.global_step % self.every == 0 and state.global_step < state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self._due(state):
            control.should_log = True

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if not self._due(state) or control.should_training_stop:
            return
        if not (self.collective or state.is_world_process_zero):
            return
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters() if p.requires_grad)
        if self.collective:
            finite = _on_every_process(finite)
        if not finite:
            return
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            return
        self.save(state, model, optimizer, lr_scheduler)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) parameter, or the parameter itself."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def _on_every_process(flag: bool) -> bool:
    """True when ``flag`` holds on every process (one all_reduce MIN)."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class StageTelemetryCallback(TrainerCallback):
    """Streams the Trainer's logs as MetricEvents and tracks throughput of the stage."""

    def __init__(self, log: Callable[[int, str, float], None], tokens_per_step: int, step_offset: int,
                 on_step: Callable[[int], None] | None = None, side_metrics: dict | None = None,
                 flush: Callable[[], None] | None = None):
        self.log = log
        self.flush = flush
        self.side_metrics = side_metrics if side_metrics is not None else {}
        self.tokens_per_step = tokens_per_step
        self.step_offset = step_offset
        self.on_step = on_step
        self._t_last = None
        self._step_last = 0
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._t_last = time.perf_counter()
        self._step_last = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_step:
            self.on_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        step = self.step_offset + state.global_step
        now = time.perf_counter()
        steps = state.global_step - self._step_last
        if steps > 0 and self._t_last is not None:
            self.log(step, "train/tokens_per_s", steps * self.tokens_per_step / (now - self._t_last))
        self._t_last, self._step_last = now, state.global_step
        for key, name in (("loss", "train/loss"), ("grad_norm", "train/grad_norm"), ("learning_rate", "train/lr")):
            if key in logs:
                self.log(step, name, float(logs[key]))
                if key == "loss":
                    self.losses.append(float(logs[key]))
        for name, (total, count) in list(self.side_metrics.items()):
            if count:
                self.log(step, name, float(total / count))  # one device sync per log, not per step
        self.side_metrics.clear()
        if self.flush:
            self.flush()  # one write per log: live readers (cockpit, tail -f) see every log promptly


def training_arguments(recipe: Recipe, steps: int, output_dir: Path, seed: int) -> TrainingArguments:
    t = recipe.training
    dtype = recipe.model.dtype
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=min(t.warmup_steps, max(0, steps - 1)),
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        # HF's default filter hides NaN losses from the logs; the safety envelope must see them.
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to=list(recipe.telemetry.mirrors),
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # every trainable parameter (adapters, new blocks) takes part in each step: no DDP search
        ddp_find_unused_parameters=False,
        bf16=dtype == "bfloat16" and torch.cuda.is_available(),
        fp16=dtype == "float16" and torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )


def train_stage(
    model: Any,
    rows: Any,
    recipe: Recipe,
    steps: int,
    output_dir: Path,
    seed: int,
    callbacks: list[TrainerCallback],
    *,
    learning_rate: float | None = None,
    teacher: Any = None,
    distill: Any = None,
    side_metrics: dict | None = None,
    resume: ResumeFrom | None = None,
    optimizers: tuple[Any, Any] | None = None,
) -> Any:
    args = training_arguments(recipe, steps, output_dir, seed)
    if learning_rate is not None:
        args.learning_rate = learning_rate
    trainer = ScalingTrainer(model=model, args=args, train_dataset=rows, callbacks=callbacks, teacher=teacher,
                             loss_chunk_size=recipe.training.loss_chunk_size,
                             distill=distill, side_metrics=side_metrics,
                             resume_files=resume.files if resume else None,
                             task_weights=task_weight_ids(recipe.training.task_weights),
                             optimizers=optimizers or (None, None))
    if resume is not None and resume.sharded is not None:
        trainer.sharded_resume = resume.sharded
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # accelerate's own sharding: snapshots would read each trainable tensor whole on the main
        # process and hang in a half-entered collective. Sharding goes through training.sharding:
        # fsdp2 (training/sharded.py: the model arrives already sharded, with sharded snapshots).
        raise PlanError(
            "accelerate's FSDP / DeepSpeed sharded launches are not supported (snapshots and resume need whole "
            "tensors or training.sharding: fsdp2).",
            hint="Set training.sharding: fsdp2 (torch FSDP2, sharded snapshots) or launch data-parallel: "
            "accelerate launch --config_file configs/accelerate/ddp.yaml ...",
        )
    # Progress and metrics go through our callbacks (rich bar, metrics.jsonl), not stdout dicts.
    trainer.remove_callback(PrinterCallback)
    if resume is None:
        trainer.train()
        return trainer
    # The Trainer's resume path reads trainer_state.json from a folder; everything else comes
    # from the snapshot through the overridden loaders above.
    checkpoint = Path(output_dir) / "resume"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text(resume.trainer_state_json, encoding="utf-8")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer
