"""How many tokens one chunk of the chunked losses should hold (``training.loss_chunk_size: auto``).

Why chunk at all. A causal LM's loss needs ``logits = hidden @ W_out^T``: ``[tokens, vocab]``
floats. With a large vocabulary this one tensor dominates training memory -- 4096 tokens x
128,256 vocabulary in fp32 is 2.1 GB, and the log-softmax and its gradient need as much again
each. Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (Cut
Cross-Entropy, arXiv 2411.09009) show the logits are the largest single allocation of training
for modern vocabularies and remove them with a fused kernel; Liger Kernel's fused linear
cross-entropy (Hsu et al. 2024, arXiv 2410.10989) and Unsloth reach most of the same saving
in a simpler way, by computing the logits a chunk of tokens at a time and discarding each chunk
after it is reduced to per-token losses. :mod:`scaler_wizard.losses.chunked_ce` and
:mod:`scaler_wizard.distill.losses` do the latter in plain PyTorch, recomputing a chunk's
logits in backward (``torch.utils.checkpoint``).

Why not always chunk. Chunking trades memory for time: every chunk's logits are computed
twice (once in forward, once in the recomputing backward), and many small chunks turn one large
matmul into many smaller ones. When the *whole* batch's logits are small (the 4,096-token
vocabulary of the demo model: 2048 tokens x 4096 x 4 B = 34 MB) there is nothing to save and
the recomputation alone costs ~10 % of a LoRA step on CPU (bench/perf.py). So the chunk should be
as large as a memory budget allows, and one chunk -- the whole batch, no recomputation -- when
it all fits. Liger picks its chunk so that a chunk's logits are about as large as the hidden
states (``chunk ~ tokens * hidden / vocab``); we use an explicit byte budget instead, because it
is what the memory planner reasons in and it does not shrink chunks for small vocabularies.

What a chunk costs. Per token of a chunk, the loss holds ``vocab`` floats several times over:
the fp32 logits (or log-softmax, computed in place of them), the gradient of the log-softmax,
the gradient of the logits, plus, for a half-precision model, the logits in the model's dtype
before the fp32 upcast. Distillation adds the teacher's logits and its log-softmax, and the
divergence's own temporaries. The buffer counts in :data:`FP32_BUFFERS` are the peak RSS
increase of one chunk's forward+backward divided by one ``[tokens, vocab]`` fp32 buffer,
measured with torch 2.13 on CPU (1024 tokens x 128,256 vocabulary, hidden 256; the same within
5 % at 512 tokens and at a 32,000 vocabulary) and rounded up: cross-entropy 2.75 -> 3,
forward/reverse KL 8.75 -> 9, generalised JSD 13.0-13.9 -> 14.

Everything here is pure Python (no torch import), so the planner can call it.
"""

from __future__ import annotations

import math

from ..errors import PlanError

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "FP32_BUFFERS",
    "auto_chunk_size",
    "chunk_bytes_per_token",
    "positions_per_chunk",
]

#: the default memory allowed to one chunk's logits and their temporaries
DEFAULT_BUDGET_BYTES = 256 * 2**20

#: fp32 ``[tokens, vocab]`` buffers alive at the peak of one chunk's forward+backward, per loss
#: (measured, see the module docstring)
FP32_BUFFERS: dict[str, int] = {"ce": 3, "forward_kl": 9, "reverse_kl": 9, "jsd": 14}


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"Chunk sizing needs a positive integer {name}, got {value!r}.",
                        hint="Pass the batch's token count and the model's output vocabulary size.")


def chunk_bytes_per_token(vocab_size: int, *, dtype_bytes: int = 4, loss: str = "ce") -> int:
    """Bytes one token of a chunk costs at the peak of the chunk's forward+backward."""
    _check_positive("vocab_size", vocab_size)
    _check_positive("dtype_bytes", dtype_bytes)
    if loss not in FP32_BUFFERS:
        raise PlanError(f"Unknown loss {loss!r} for chunk sizing.", hint=f"Use one of {sorted(FP32_BUFFERS)}.")
    # a half-precision head writes its logits in the model dtype first, then upcasts them
    model_dtype_copy = dtype_bytes if dtype_bytes != 4 else 0
    return vocab_size * (4 * FP32_BUFFERS[loss] + model_dtype_copy)


def auto_chunk_size(
    n_tokens: int,
    vocab_size: int,
    *,
    dtype_bytes: int = 4,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    loss: str = "ce",
) -> int:
    """Tokens per chunk so that one chunk's logits and temporaries stay within ``budget_bytes``.

    Returns ``n_tokens`` (one chunk: the whole batch, nothing to recompute) when everything fits.
    Otherwise the chunks are balanced: ``ceil(n / k)`` tokens for the smallest ``k`` chunks that
    fit, so 1000 tokens with room for 600 become 2 x 500 rather than 600 + 400 (same number of
    chunks, a smaller peak). A budget too small for even one token still gives 1.
    """
    _check_positive("n_tokens", n_tokens)
    _check_positive("budget_bytes", budget_bytes)
    fit = budget_bytes // chunk_bytes_per_token(vocab_size, dtype_bytes=dtype_bytes, loss=loss)
    if fit >= n_tokens:
        return n_tokens
    chunks = math.ceil(n_tokens / max(1, fit))
    return math.ceil(n_tokens / chunks)


def positions_per_chunk(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    *,
    dtype_bytes: int = 4,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    loss: str = "ce",
) -> int:
    """The ``chunk_size`` for :func:`~scaler_wizard.losses.chunked_ce.chunked_token_ce` and
    :class:`~scaler_wizard.distill.losses.DistillConfig`, which cut the *sequence* and keep all
    ``batch_size`` rows in every chunk: positions per chunk such that ``batch_size x positions``
    tokens fit the budget. ``seq_len`` means one chunk. Balanced like :func:`auto_chunk_size`, and
    as few chunks as the budget allows.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    _check_positive("budget_bytes", budget_bytes)
    per_token = chunk_bytes_per_token(vocab_size, dtype_bytes=dtype_bytes, loss=loss)
    # positions that fit, counted directly (not from a balanced token count, whose floor division
    # by the batch could cost a chunk)
    fit = max(1, budget_bytes // (per_token * batch_size))
    if fit >= seq_len:
        return seq_len
    chunks = math.ceil(seq_len / fit)
    return math.ceil(seq_len / chunks)
