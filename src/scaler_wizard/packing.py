"""Sequence packing: several tokenized documents per fixed-length row, with no attention across
documents, plus length-aware batching and a padding-waste report.

Why: variable-length data (passkey examples of 64..L tokens, chat turns, short documents) padded
to a fixed row length wastes the padded fraction of every step. Packing fills rows with whole
documents instead, so nearly every token computed is a real one.

How a packed row stays equivalent to its documents run alone (the contract transformers 5 uses
for packed training, ``DataCollatorWithFlattening``):

* **position ids restart at 0** at each document, so RoPE sees the same positions as unpacked;
* **no attention across documents**. transformers 5 derives this from the position ids alone:
  when a model gets ``position_ids`` and *no* ``attention_mask``, ``masking_utils.create_causal_mask``
  detects the restarts (``find_packed_sequence_indices``) and builds a block-diagonal causal mask
  for ``sdpa``/``eager``, and the flash-attention integrations switch to the variable-length
  kernels (``cu_seqlens`` from the same position ids) on GPU. This is the mechanism we choose
  (``MaskMode.POSITION_IDS``): it costs nothing to store, works for every attention backend, and
  is what the flash varlen path needs. **The forward must run without a KV cache**
  (``use_cache=False``): with a cache, transformers 5.24 skips the detection and silently lets
  documents attend to each other (``masking_utils._preprocess_mask_arguments``).
* For callers that can only forward an ``attention_mask`` (e.g. a loss that calls the decoder
  with ``input_ids`` and ``attention_mask`` only), ``MaskMode.BLOCK_4D`` gives each row an
  additive ``[1, T, T]`` block-diagonal causal mask instead; transformers passes a 4-D mask through
  unchanged (eager adds it, sdpa uses it as ``attn_mask``). RoPE is relative (Su et al. 2021,
  arXiv 2104.09864), so with a block mask the outputs equal the unpacked ones even if the caller
  does not pass the restarted position ids (up to float rounding of larger angles). It costs
  ``T*T`` floats per row and disables sdpa's ``is_causal`` fast path; the mask is built in the
  default dtype, so cast it to the model's dtype for half-precision models.
* **labels**: the first token of each document is not a target (label -100), so the last token
  of one document is never trained to predict the first token of the next (the
  ``separator_id=-100`` of ``DataCollatorWithFlattening``).

Padding at the end of a row is a segment of its own (position ids from 0, labels -100), so no
query row of the attention mask is ever fully masked (which would give NaN in softmax).

The planning functions (:func:`pack_documents`, :func:`length_grouped_batches`,
:func:`padding_waste`) are pure Python; torch is imported only when rows are turned into tensors.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "MaskMode",
    "PackedRows",
    "PaddingWaste",
    "block_causal_mask",
    "length_grouped_batches",
    "pack_documents",
    "padding_waste",
    "plan_bins",
]


class MaskMode(str, enum.Enum):
    """How a packed row tells the model where documents end (see the module docstring)."""

    POSITION_IDS = "position_ids"  # rows carry position_ids and no attention_mask (transformers 5 packed path)
    BLOCK_4D = "block_4d"  # rows carry an additive [1, T, T] block-diagonal causal attention_mask


def _check_lengths(lengths: Sequence[int], row_length: int) -> None:
    if row_length <= 0:
        raise DataError(f"Packing row_length must be positive, got {row_length}.",
                        hint="Pass the training sequence length (context.target_length).")
    bad = [i for i, n in enumerate(lengths) if n <= 0]
    if bad:
        raise DataError(f"Document {bad[0]} to pack is empty (length {lengths[bad[0]]}).",
                        hint="Drop empty documents before packing.")


def plan_bins(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Assign documents (by index) to rows of at most ``row_length`` tokens, first-fit decreasing.

    First-fit decreasing uses at most 11/9 OPT + 6/9 rows (Dósa 2007), and on typical length
    distributions it leaves only a few percent of a row empty. Documents longer than a row must
    be split beforehand (:func:`pack_documents` does so). Rows are returned in order of their
    first document's index; documents within a row keep their original order.
    """
    _check_lengths(lengths, row_length)
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise DataError(f"Document {too_long[0]} has {lengths[too_long[0]]} tokens, more than a {row_length}-token row.",
                        hint="Split long documents first (pack_documents does it) or raise row_length.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if room >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(row_length - n)
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def _split_long(docs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, row_length: int):
    """Cut documents longer than a row into row-length pieces, each then a document of its own."""
    out_docs: list[list[int]] = []
    out_labels: list[list[int]] = []
    for k, doc in enumerate(docs):
        lab = list(labels[k]) if labels is not None else list(doc)
        if len(lab) != len(doc):
            raise DataError(f"Document {k} has {len(doc)} tokens but {len(lab)} labels.",
                            hint="Give one label per token (use -100 for tokens that are not targets).")
        for start in range(0, len(doc), row_length):
            out_docs.append(list(doc[start : start + row_length]))
            out_labels.append(lab[start : start + row_length])
    return out_docs, out_labels


@dataclass
class PackedRows:
    """Packed training rows, a map-style dataset for ``transformers.Trainer``.

    Each row is ``row_length`` tokens: whole documents back to back, then padding. ``seq_ids``
    numbers the segments of a row (0, 1, ...; the padding tail is one more segment);
    ``position_ids`` restart at 0 in every segment.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    seq_ids: list[list[int]]
    real_tokens: list[int]
    task: list[int] | None = None
    mask_mode: MaskMode = MaskMode.POSITION_IDS
    row_length: int = 0
    docs_per_row: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = {
            "input_ids": torch.tensor(self.input_ids[i]),
            "labels": torch.tensor(self.labels[i]),
        }
        if self.mask_mode is MaskMode.POSITION_IDS:
            item["position_ids"] = torch.tensor(self.position_ids[i])
        else:
            item["attention_mask"] = block_causal_mask(torch.tensor(self.seq_ids[i])[None])[0]
        if self.task is not None:
            item["task"] = torch.tensor(self.task[i])
        return item

    @property
    def padding_fraction(self) -> float:
        total = len(self.input_ids) * self.row_length
        return 1 - sum(self.real_tokens) / total if total else 0.0


def pack_documents(
    docs: Sequence[Sequence[int]],
    row_length: int,
    *,
    pad_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    task: int | None = None,
    mask_mode: MaskMode | str = MaskMode.POSITION_IDS,
) -> PackedRows:
    """Pack tokenized documents into rows of ``row_length`` tokens.

    ``labels`` default to the tokens themselves (language modelling); give them to keep a
    completion-style loss (-100 on the prompt). The first label of every document is set to -100
    so no target crosses a document boundary. Documents longer than a row are cut into
    row-length pieces. ``task`` (one kind for all rows) is carried for the task-balanced loss;
    pack each task separately so that a row holds one kind.
    """
    if not docs:
        raise DataError("There are no documents to pack.", hint="Check the training data is not empty.")
    mode = MaskMode(mask_mode)
    _check_lengths([len(d) for d in docs], row_length)
    pieces, piece_labels = _split_long(docs, labels, row_length)
    bins = plan_bins([len(p) for p in pieces], row_length)
    rows = PackedRows([], [], [], [], [], task=None if task is None else [task] * len(bins),
                      mask_mode=mode, row_length=row_length)
    for members in bins:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        for s, j in enumerate(members):
            n = len(pieces[j])
            ids.extend(pieces[j])
            labs.extend([IGNORE_INDEX] + piece_labels[j][1:])
            pos.extend(range(n))
            seg.extend([s] * n)
        real = len(ids)
        pad = row_length - real
        ids.extend([pad_id] * pad)
        labs.extend([IGNORE_INDEX] * pad)
        pos.extend(range(pad))
        seg.extend([len(members)] * pad)
        rows.input_ids.append(ids)
        rows.labels.append(labs)
        rows.position_ids.append(pos)
        rows.seq_ids.append(seg)
        rows.real_tokens.append(real)
        rows.docs_per_row.append(len(members))
    return rows


def block_causal_mask(seq_ids: Any, dtype: Any = None) -> Any:
    """Additive attention mask [batch, 1, T, T]: 0 where query i may attend key j (same segment
    and j <= i), the dtype's minimum elsewhere — the 4-D form transformers passes through as is.

    ``seq_ids`` [batch, T] are segment numbers (as in :class:`PackedRows`).
    """
    import torch

    dtype = dtype or torch.get_default_dtype()
    t = seq_ids.size(-1)
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # [b, T(query), T(key)]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int,
                           megabatch_factor: int = 50) -> list[list[int]]:
    """Batches of document indices with similar lengths, in random order.

    The scheme of ``transformers.trainer_pt_utils.get_length_grouped_indices``: shuffle, cut into
    megabatches of ``megabatch_factor * batch_size``, sort each by length (longest first), then
    cut into batches, so padding to the longest in a batch wastes little while batches stay
    random. Every index appears exactly once.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}.", hint="Use training.micro_batch_size >= 1.")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    mega = max(1, megabatch_factor) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class PaddingWaste:
    """Fraction of computed tokens that are padding, three ways of feeding the same documents.

    * ``fixed``: each document in its own row padded to ``row_length`` (pre-built fixed rows);
    * ``longest``: batches of ``batch_size`` documents in the given order, each padded to the
      longest in its batch (the stock ``DataCollatorWithPadding`` behaviour);
    * ``packed``: rows of ``row_length`` filled by :func:`pack_documents`.
    """

    documents: int
    real_tokens: int
    fixed: float
    longest: float
    packed: float
    packed_rows: int

    def as_dict(self) -> dict[str, float | int]:
        return {"documents": self.documents, "real_tokens": self.real_tokens, "fixed": self.fixed,
                "longest": self.longest, "packed": self.packed, "packed_rows": self.packed_rows}


def padding_waste(lengths: Sequence[int], row_length: int, batch_size: int,
                  batches: Sequence[Sequence[int]] | None = None) -> PaddingWaste:
    """Padding fraction without packing (fixed rows, pad-to-longest batches) and with packing.

    ``batches`` (lists of indices, e.g. from :func:`length_grouped_batches`) replace the default
    consecutive batches for the ``longest`` figure. Documents longer than ``row_length`` are
    counted as the row-length pieces they would be cut into.
    """
    _check_lengths(lengths, row_length)
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}.", hint="Use training.micro_batch_size >= 1.")
    pieces = [min(row_length, n - s) for n in lengths for s in range(0, n, row_length)]
    real = sum(pieces)
    fixed_total = len(pieces) * row_length
    if batches is None:
        batches = [range(k, min(k + batch_size, len(pieces))) for k in range(0, len(pieces), batch_size)]
        sizes = pieces
    else:
        if any(n > row_length for n in lengths):
            raise DataError("Explicit batches need documents no longer than row_length.",
                            hint="Split long documents first or omit `batches`.")
        sizes = list(lengths)
    longest_total = sum(len(b) * max(sizes[i] for i in b) for b in batches if len(b))
    rows = len(plan_bins(pieces, row_length))
    return PaddingWaste(
        documents=len(lengths),
        real_tokens=real,
        fixed=1 - real / fixed_total,
        longest=1 - real / longest_total,
        packed=1 - real / (rows * row_length),
        packed_rows=rows,
    )
