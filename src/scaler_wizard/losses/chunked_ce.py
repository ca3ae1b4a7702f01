"""Cross-entropy computed from hidden states in sequence chunks, never materialising the
full [batch, length, vocab] logits (the idea of Liger's fused linear cross-entropy and Apple's
Cut Cross-Entropy, here with plain PyTorch recomputation).

Each chunk's logits are computed, reduced to per-token losses and freed; under autograd the
chunk is recomputed in backward (``torch.utils.checkpoint``), so peak memory holds one chunk of
logits instead of all of them: for 4096 tokens x 128,256 vocab in fp32 that is 2.1 GB at once
for the stock loss versus 263 MB with 512-token chunks.

``chunk_size="auto"`` sizes the chunks from the batch's shape and the logits' dtype
(:mod:`scaler_wizard.losses.chunk_policy`): as large as a 256 MB budget allows, and one chunk
without recomputation when everything fits (small vocabularies), where chunking would only cost time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .chunk_policy import positions_per_chunk

IGNORE_INDEX = -100


def resolve_chunk_size(chunk_size: int | str, hidden: torch.Tensor, weight: torch.Tensor, *, loss: str = "ce") -> int:
    """``chunk_size`` as given, or for ``"auto"`` the positions per chunk (all rows in each) that
    fit the default budget for this batch's shape and logits dtype (the autocast dtype under autocast)."""
    if chunk_size == "auto":
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        return positions_per_chunk(max(1, hidden.size(0)), max(1, hidden.size(1)), weight.size(0),
                                   dtype_bytes=dtype.itemsize, loss=loss)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}")
    return chunk_size


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    # hidden [b, c, h] -> logits [b, c, V] in fp32 for a stable log-softmax
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


def chunked_token_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | str = "auto",
) -> torch.Tensor:
    """Per-token cross-entropy [batch, length]; 0 where ``labels == -100``.

    ``hidden`` [b, t, h] must already be aligned with ``labels`` [b, t] (shifted by the caller).
    """
    chunk_size = resolve_chunk_size(chunk_size, hidden, weight)
    if chunk_size >= hidden.size(1):
        # One chunk: recomputing it in backward would save nothing (the loss is the last op of the
        # forward, its logits are needed again at once) and would cost a second head matmul.
        return _chunk_ce(hidden, weight, bias, labels)
    pieces = []
    for start in range(0, hidden.size(1), chunk_size):
        h = hidden[:, start : start + chunk_size]
        y = labels[:, start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_ce, h, weight, bias, y, use_reentrant=False))
        else:
            pieces.append(_chunk_ce(h, weight, bias, y))
    return torch.cat(pieces, dim=1)


def target_task(task: torch.Tensor | None) -> torch.Tensor | None:
    """The task ids aligned with the shifted targets ``labels[:, 1:]``: a per-row task ``[B]`` as
    it is, a per-token task ``[B, T]`` (packed rows) without its first position, ``[B, T-1]``.
    Position ``t`` of the shifted loss predicts token ``t+1``, and the task of that token is the
    one the loss is about."""
    if task is None or task.dim() == 1:
        return task
    return task[:, 1:]


def task_means(token_loss: torch.Tensor, labels: torch.Tensor, task: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Mean token loss of each task present in the batch (task id -> mean over its supervised
    targets). Without task ids everything is task 0. Negative ids mark padding, never counted."""
    mask = labels != IGNORE_INDEX
    if task is None:
        m = mask.to(token_loss.dtype)
        return {0: (token_loss * m).sum() / m.sum().clamp_min(1)}
    if task.dim() == 1 and task.size(0) == labels.size(0):
        task = task[:, None].expand_as(labels)
    elif task.shape != labels.shape:
        raise ValueError(
            f"task has shape {tuple(task.shape)}; expected one id per row {(labels.size(0),)} or one per target "
            f"{tuple(labels.shape)}. For per-token task ids of unshifted rows with labels[:, 1:], pass "
            "target_task(task) (= task[:, 1:])."
        )
    means = {}
    for kind in torch.unique(task[mask]).tolist():
        if kind < 0:
            continue
        sel = (mask & (task == kind)).to(token_loss.dtype)
        means[int(kind)] = (token_loss * sel).sum() / sel.sum()
    return means


def task_balanced_mean(token_loss: torch.Tensor, labels: torch.Tensor, task: torch.Tensor | None,
                       weights: Mapping[int, float] | None = None) -> torch.Tensor:
    """Weighted sum of the per-task mean losses (:func:`task_means`); a task's weight defaults to 1.

    With one task this is the ordinary token mean. With a mixture (language modelling rows and
    short-answer retrieval rows) each task keeps its own weight instead of the retrieval answers
    being drowned by thousands of language-modelling tokens -- or, at weight 1, a handful of
    answer tokens weighing as much as every language-modelling token together: the recipe's
    ``training.task_weights`` states the balance, and both means are logged.

    ``task`` is per row ``[B]``, or per token ``[B, T]`` aligned with ``labels`` (packed rows mix
    tasks within a row; pass :func:`target_task` of the unshifted ids when ``labels`` are the
    shifted ``labels[:, 1:]``). Negative task ids mark padding and are never counted.
    """
    total = token_loss.new_zeros(())
    for kind, mean in task_means(token_loss, labels, task).items():
        total = total + (1.0 if weights is None else float(weights.get(kind, 1.0))) * mean
    return total
