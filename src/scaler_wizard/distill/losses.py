"""Distillation losses computed in sequence chunks from hidden states and the output projection.

Divergences (per token, between the teacher distribution P and the student distribution Q, both
at temperature T):

- ``forward_kl``  KL(P || Q) = sum P (log P - log Q)  -- standard KD (Hinton et al. 2015);
  mass-covering.
- ``reverse_kl``  KL(Q || P) = sum Q (log Q - log P)  -- MiniLLM (Gu et al. 2023); mode-seeking.
- ``jsd``         generalised JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M),
  M = beta P + (1 - beta) Q  (GKD, Agarwal et al. 2024, arXiv 2306.13649). As in GKD and TRL's
  ``generalized_jsd_loss``, the end points are defined as the divergences the family interpolates
  between: beta = 0 is forward KL, beta = 1 is reverse KL (the raw formula would be 0 there).

Combined objective (Hinton et al. 2015): ``(1 - lambda) * CE + lambda * T^2 * KD``. The T^2 keeps
the soft-target gradients on the same scale as the hard-target ones when T changes.

Memory: like :mod:`scaler_wizard.losses.chunked_ce`, each chunk of positions computes its
student logits (and, for a hidden-state teacher, the teacher's logits) in fp32, reduces them to
per-token losses and frees them; under autograd the chunk is recomputed in backward
(``torch.utils.checkpoint``). Neither side's full-vocabulary logits ever exist for the whole
sequence: peak extra memory is a few ``[batch, chunk, vocab]`` fp32 buffers.

Teacher signals (see :mod:`scaler_wizard.distill.teacher`):

- :class:`TeacherHidden` -- final (normed) hidden states + the teacher's output projection
  (``base`` and ``model`` teachers); the full distribution is used.
- :class:`TeacherTopK` -- top-k token ids and log-probabilities (``offline`` teacher). KD is then
  restricted to the top-k support: both the teacher and the student distributions are
  renormalised over those k tokens and the divergence is taken between the two renormalised
  distributions. Renormalising both sides keeps every divergence a proper divergence (reverse KL
  and JSD need student mass only where the teacher's is known) at the price of giving no signal
  about the student's mass outside the support; the CE term still trains the full distribution.
  Log-probabilities stored at temperature T_c are re-tempered exactly: on the support,
  softmax(z/T) = softmax(logp_Tc * T_c / T) because logp_Tc = z/T_c - const per position.

Every teacher signal covers positions ``0 .. tc-1`` of the (already shifted) student positions,
``tc <= t``: a teacher with the original positional settings is only trusted within its trained
context, so it may cover just a prefix; positions it does not cover get CE only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import RecipeError
from ..losses.chunked_ce import IGNORE_INDEX, resolve_chunk_size, task_balanced_mean, task_means

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class DistillConfig:
    """What the loss computes. ``kd_weight`` is lambda in ``(1-lambda)*CE + lambda*T^2*KD``."""

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 0.5
    chunk_size: int | str = "auto"  # positions per chunk, or "auto" (losses/chunk_policy.py)

    def __post_init__(self) -> None:
        problems = []
        if self.divergence not in DIVERGENCES:
            problems.append(("distillation.divergence", f"must be one of {list(DIVERGENCES)}, got {self.divergence!r}"))
        if not 0.0 <= self.beta <= 1.0:
            problems.append(("distillation.beta", f"must be within [0, 1], got {self.beta}"))
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(("distillation.temperature", f"must be a positive number, got {self.temperature}"))
        if not 0.0 <= self.kd_weight <= 1.0:
            problems.append(("distillation.kd_weight", f"must be within [0, 1], got {self.kd_weight}"))
        if self.chunk_size != "auto" and not (isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool)
                                              and self.chunk_size > 0):
            problems.append(("distillation.chunk_size", f"must be a positive integer or 'auto', got {self.chunk_size!r}"))
        if problems:
            raise RecipeError("distillation settings", problems)


@dataclass
class TeacherHidden:
    """Teacher final hidden states ``[b, tc, h]`` and its output projection ``weight [V, h]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.hidden.size(1)

    def narrow(self, start: int, end: int) -> TeacherHidden:
        return TeacherHidden(self.hidden[:, start:end], self.weight, self.bias)


@dataclass
class TeacherTopK:
    """Top-k teacher predictions: ``token_ids [b, tc, k]`` (int) and ``logprobs [b, tc, k]``
    computed at ``temperature`` (the cache's temperature)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    temperature: float = 1.0

    @property
    def length(self) -> int:
        return self.token_ids.size(1)

    def narrow(self, start: int, end: int) -> TeacherTopK:
        return TeacherTopK(self.token_ids[:, start:end], self.logprobs[:, start:end], self.temperature)


TeacherSignal = TeacherHidden | TeacherTopK


@dataclass
class TeacherBatch:
    """A teacher signal plus ``mask [b, tc]`` (bool): the positions whose teacher prediction counts
    (real next token, row covered by the teacher)."""

    signal: TeacherSignal
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.mask.shape[:2] != (self._batch(), self.signal.length):
            raise ValueError(
                f"teacher mask shape {tuple(self.mask.shape)} does not match the teacher signal "
                f"[{self._batch()}, {self.signal.length}]"
            )

    def _batch(self) -> int:
        s = self.signal
        return (s.hidden if isinstance(s, TeacherHidden) else s.token_ids).size(0)


@dataclass
class DistillLossOutput:
    """``loss`` carries the graph; ``ce`` and ``kd`` are detached, for telemetry
    (``distill/ce``, ``distill/kl``); ``kd_tokens`` is how many positions had a teacher."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    kd_tokens: int
    extras: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Per-token divergences on log-probabilities (last dimension = the distribution's support)
# --------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) summed over the last dimension; 0 * log 0 terms count as 0."""
    a = log_a.exp()
    # mask the difference, not the product, so that a -inf log-probability gives a 0 gradient
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * diff).sum(-1)


def token_divergence(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """Divergence between the teacher (P) and student (Q) per position (last dim reduced)."""
    log_q, log_p = student_logprobs, teacher_logprobs
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        # log M = log(beta P + (1 - beta) Q), computed stably in log space
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    raise ValueError(f"unknown divergence {divergence!r}; use one of {list(DIVERGENCES)}")


# --------------------------------------------------------------------------------------------
# The chunked computation
# --------------------------------------------------------------------------------------------


def _chunk_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    kd_mask: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # hidden [b, c, h] -> student logits [b, c, V] in fp32 for a stable log-softmax
    logits = F.linear(hidden, weight, bias).float()
    # one log-softmax serves the CE and, at temperature 1, the student side of the divergence
    # (F.cross_entropy would compute it again): the elementwise passes over [b, c, V] are what
    # bound this loss at small vocabularies (bench/perf.py, distillation vs TRL GKD)
    student_logprobs = F.log_softmax(logits, dim=-1)
    ce = F.nll_loss(
        student_logprobs.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    kd = torch.zeros_like(ce)
    if teacher is None or kd_mask is None or kd_mask.size(1) == 0:
        return ce, kd
    n = kd_mask.size(1)  # teacher-covered positions of this chunk: the first n
    s = logits[:, :n]
    if isinstance(teacher, TeacherHidden):
        # the teacher never receives gradients, even when it shares the student's head tensor
        t_logits = F.linear(teacher.hidden.detach(), teacher.weight.detach(),
                            None if teacher.bias is None else teacher.bias.detach()).float()
        log_p = F.log_softmax(t_logits / temperature, dim=-1)
        log_q = student_logprobs[:, :n] if temperature == 1.0 else F.log_softmax(s / temperature, dim=-1)
    else:
        ids = teacher.token_ids.long()
        log_q = F.log_softmax(s.gather(-1, ids) / temperature, dim=-1)
        log_p = F.log_softmax(teacher.logprobs.float() * (teacher.temperature / temperature), dim=-1)
    per_token = token_divergence(log_q, log_p, divergence, beta)
    per_token = torch.where(kd_mask, per_token, torch.zeros_like(per_token))
    if n == kd.size(1):
        return ce, per_token
    return ce, torch.cat([per_token, kd[:, n:]], dim=1)


def chunked_distill_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherBatch | None,
    config: DistillConfig,
    *,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (CE, KD), each ``[b, t]``: CE 0 where ``labels == -100``, KD 0 where the teacher
    does not cover a position or its mask is False.

    ``hidden [b, t, h]`` must already be aligned with ``labels [b, t]`` (shifted by the caller);
    the teacher signal is aligned with the same positions from 0 and may be longer (it is cut to
    ``t``) or shorter (a prefix).
    """
    signal, mask, covered = None, None, 0
    if teacher is not None:
        covered = min(teacher.signal.length, hidden.size(1))
        signal, mask = teacher.signal, teacher.mask.bool()
    ce_pieces, kd_pieces = [], []
    step = resolve_chunk_size(config.chunk_size, hidden, weight, loss=config.divergence)
    # one chunk: nothing to save by recomputing it in backward (see chunked_ce.chunked_token_ce)
    recompute = step < hidden.size(1)
    for start in range(0, hidden.size(1), step):
        end = min(start + step, hidden.size(1))
        h, y = hidden[:, start:end], labels[:, start:end]
        t_end = min(end, covered)
        t_chunk = signal.narrow(start, t_end) if (signal is not None and start < t_end) else None
        m_chunk = mask[:, start:t_end] if t_chunk is not None else None
        args = (h, weight, bias, y, t_chunk, m_chunk, config.divergence, config.beta, config.temperature)
        if recompute and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            ce, kd = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_losses(*args)
        ce_pieces.append(ce)
        kd_pieces.append(kd)
    return torch.cat(ce_pieces, dim=1), torch.cat(kd_pieces, dim=1)


def kd_position_mask(teacher: TeacherBatch, length: int) -> torch.Tensor:
    """The teacher mask cut or zero-padded to ``length`` positions (bool ``[b, length]``)."""
    m = teacher.mask.bool()[:, :length]
    if m.size(1) < length:
        m = torch.cat([m, m.new_zeros(m.size(0), length - m.size(1))], dim=1)
    return m


def combine(ce: torch.Tensor, kd: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """``(1 - lambda) * CE + lambda * T^2 * KD`` (Hinton et al. 2015)."""
    lam, t = config.kd_weight, config.temperature
    return (1.0 - lam) * ce + lam * (t * t) * kd


def distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherBatch | None,
    config: DistillConfig,
    *,
    bias: torch.Tensor | None = None,
    task: torch.Tensor | None = None,
    task_weights: Mapping[int, float] | None = None,
) -> DistillLossOutput:
    """The training loss for one batch (inputs as for :func:`chunked_distill_token_losses`).

    CE is the task-balanced mean of :func:`~scaler_wizard.losses.chunked_ce.task_balanced_mean`;
    KD is the mean over the positions the teacher covers. A batch with no teacher position
    (no teacher, or offline mode and no cached row in the batch) is trained on CE alone rather
    than on ``(1 - lambda) * CE``, so such batches keep their full learning signal.
    """
    ce_tok, kd_tok = chunked_distill_token_losses(hidden, weight, labels, teacher, config, bias=bias)
    by_task = {k: v.detach() for k, v in task_means(ce_tok, labels, task).items()}
    ce = task_balanced_mean(ce_tok, labels, task, task_weights)
    n_kd = int(kd_position_mask(teacher, hidden.size(1)).sum()) if teacher is not None else 0
    if n_kd == 0:
        return DistillLossOutput(loss=ce, ce=ce.detach(), kd=ce.new_zeros(()), kd_tokens=0,
                                 extras={"ce_by_task": by_task})
    kd = kd_tok.sum() / n_kd
    return DistillLossOutput(loss=combine(ce, kd, config), ce=ce.detach(), kd=kd.detach(), kd_tokens=n_kd,
                             extras={"ce_by_task": by_task})
