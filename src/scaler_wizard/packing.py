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

* **per-document attention** (:func:`enable_document_attention`): the two ways above hand sdpa
  a dense ``[T, T]`` block-diagonal mask, so every row costs ``T**2`` attention work whatever its
  documents, and sdpa loses its causal fast path. ``DOCUMENT_ATTENTION`` is an attention
  implementation (registered with transformers' ``AttentionInterface``) that reads the document
  boundaries from the restarting ``position_ids`` and runs causal sdpa on each document alone:
  ``sum(len_i**2) / 2`` work, no mask built. bench/perf.py measures it against the mask path
  (``ours_document_attention`` vs ``ours_sdpa_mask``). The other per-document kernels do not
  train on CPU: ``flex_attention`` has no backward on CPU (torch 2.13) and ``flash_attention_2``
  (``cu_seqlens``) is CUDA-only. The pipeline does not switch to it by itself (a model loaded
  with ``attn_implementation: sdpa`` keeps the mask path); call it on the model to use it.

Padding at the end of a row is a segment of its own (position ids from 0, labels -100), so no
query row of the attention mask is ever fully masked (which would give NaN in softmax).

Rows that mix kinds of documents (language-model windows, passkey examples) carry a task id per
token (``doc_tasks``), ``PADDING_TASK`` (-1) on the padding tail, for the task-balanced loss.

Two ways to plan the rows: :func:`plan_bins` (first-fit decreasing over a given set of documents,
fewest rows) and :class:`FirstFitRows` (a fixed number of rows filled online, for a trainer that
needs an exact row count; see its docstring). :func:`pack_documents` takes either plan.

The planning functions (:func:`pack_documents`, :class:`FirstFitRows`, :func:`length_grouped_batches`,
:func:`padding_waste`) are pure Python; torch is imported only when rows are turned into tensors.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError

IGNORE_INDEX = -100
PADDING_TASK = -1  # per-token task id of the padding tail (never a target)

__all__ = [
    "DOCUMENT_ATTENTION",
    "IGNORE_INDEX",
    "PADDING_TASK",
    "FirstFitRows",
    "MaskMode",
    "PackedRows",
    "PaddingWaste",
    "block_causal_mask",
    "document_attention_forward",
    "enable_document_attention",
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


class FirstFitRows:
    """A fixed number of rows filled online, first fit: each document, in the order it comes, goes
    into the first row with room for it; :meth:`place` answers ``None`` when no row has room.

    For a trainer that needs an exact row count (the stage trainer runs ``steps x batch`` rows per
    stage as one epoch, and exact resume counts on it), with documents drawn one by one at random:
    the caller stops at the first document that fits nowhere, so the packed documents are a prefix
    of the random sequence and keep its length distribution. (Skipping the ones that do not fit
    would favour short documents; first-fit decreasing needs the whole set first and, cut to a row
    count, would keep the long ones.) An empty row fits any document of up to ``row_length``
    tokens, so every row holds at least one document before the first miss. On lengths uniform in
    [64, L] the rows end up ~88-94% full (L = 512 .. 4096), against ~55% for one document per row.

    Finding the first row with room is O(log rows): a max-tree over the rows' free space.
    """

    def __init__(self, n_rows: int, row_length: int):
        if row_length <= 0:
            raise DataError(f"Packing row_length must be positive, got {row_length}.",
                            hint="Pass the training sequence length (context.target_length).")
        if n_rows < 0:
            raise DataError(f"The number of rows to fill must be >= 0, got {n_rows}.")
        self.row_length = row_length
        self.rows: list[list[int]] = [[] for _ in range(n_rows)]
        self._n_docs = 0
        self._leaves = 1
        while self._leaves < max(1, n_rows):
            self._leaves *= 2
        # tree[1] is the root; leaves at [leaves, leaves + n_rows) hold each row's free tokens
        self._tree = [0] * (2 * self._leaves)
        for r in range(n_rows):
            self._tree[self._leaves + r] = row_length
        for i in range(self._leaves - 1, 0, -1):
            self._tree[i] = max(self._tree[2 * i], self._tree[2 * i + 1])

    def place(self, length: int) -> int | None:
        """Put the next document (``length`` tokens) into the first row with room; its document
        index is the count of documents placed before it. ``None`` (nothing placed) when no row
        has room."""
        if length <= 0:
            raise DataError(f"Document {self._n_docs} to pack is empty (length {length}).",
                            hint="Drop empty documents before packing.")
        tree = self._tree
        if not self.rows or tree[1] < length:
            return None
        i = 1
        while i < self._leaves:  # descend to the leftmost leaf with room
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        row = i - self._leaves
        tree[i] -= length
        i //= 2
        while i:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2
        self.rows[row].append(self._n_docs)
        self._n_docs += 1
        return row

    def free(self, row: int) -> int:
        return self._tree[self._leaves + row]

    @property
    def documents(self) -> int:
        return self._n_docs

    @property
    def plan(self) -> list[list[int]]:
        """Document indices per row, for :func:`pack_documents` (``plan=``)."""
        return [list(r) for r in self.rows]


def _split_long(docs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, row_length: int):
    """Cut documents longer than a row into row-length pieces, each then a document of its own.
    Returns (pieces, their labels, the index of the document each piece comes from)."""
    if labels is not None and len(labels) != len(docs):
        raise DataError(f"There are {len(docs)} documents but {len(labels)} label lists.",
                        hint="Give one label list per document.")
    out_docs: list[list[int]] = []
    out_labels: list[list[int]] = []
    owner: list[int] = []
    for k, doc in enumerate(docs):
        lab = list(labels[k]) if labels is not None else list(doc)
        if len(lab) != len(doc):
            raise DataError(f"Document {k} has {len(doc)} tokens but {len(lab)} labels.",
                            hint="Give one label per token (use -100 for tokens that are not targets).")
        for start in range(0, len(doc), row_length):
            out_docs.append(list(doc[start : start + row_length]))
            out_labels.append(lab[start : start + row_length])
            owner.append(k)
    return out_docs, out_labels, owner


def _check_plan(plan: Sequence[Sequence[int]], lengths: Sequence[int], row_length: int) -> None:
    """A caller's plan must use every document exactly once, in rows that fit."""
    seen = [0] * len(lengths)
    for r, members in enumerate(plan):
        if not members:
            raise DataError(f"Row {r} of the packing plan is empty.", hint="Every planned row needs a document.")
        for j in members:
            if not 0 <= j < len(lengths):
                raise DataError(f"Row {r} of the packing plan names document {j}; there are {len(lengths)}.",
                                hint="Plan rows hold indices into the documents.")
            seen[j] += 1
        used = sum(lengths[j] for j in members)
        if used > row_length:
            raise DataError(f"Row {r} of the packing plan holds {used} tokens, more than a {row_length}-token row.",
                            hint="Plan with FirstFitRows or plan_bins for this row_length.")
    wrong = [j for j, c in enumerate(seen) if c != 1]
    if wrong:
        raise DataError(f"Document {wrong[0]} appears {seen[wrong[0]]} times in the packing plan.",
                        hint="A plan places every document exactly once.")


@dataclass
class PackedRows:
    """Packed training rows, a map-style dataset for ``transformers.Trainer``.

    Each row is ``row_length`` tokens: whole documents back to back, then padding. ``seq_ids``
    numbers the segments of a row (0, 1, ...; the padding tail is one more segment);
    ``position_ids`` restart at 0 in every segment. The task is either one per row (``task``) or
    one per token (``token_task``, ``PADDING_TASK`` on the padding tail); items carry either as
    ``"task"``.
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
    token_task: list[list[int]] | None = None

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
        if self.token_task is not None:
            item["task"] = torch.tensor(self.token_task[i])
        elif self.task is not None:
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
    doc_tasks: Sequence[int] | None = None,
    plan: Sequence[Sequence[int]] | None = None,
    mask_mode: MaskMode | str = MaskMode.POSITION_IDS,
) -> PackedRows:
    """Pack tokenized documents into rows of ``row_length`` tokens.

    ``labels`` default to the tokens themselves (language modelling); give them to keep a
    completion-style loss (-100 on the prompt). The first label of every document is set to -100
    so no target crosses a document boundary.

    ``plan`` (document indices per row, e.g. :attr:`FirstFitRows.plan`) fixes the rows and their
    order; every document must then fit a row. Without it, documents longer than a row are cut
    into row-length pieces and :func:`plan_bins` packs them into as few rows as it can.

    Task ids for the task-balanced loss: ``task`` (one kind for all rows; pack each task
    separately so that a row holds one kind) or ``doc_tasks`` (one kind per document, giving a
    per-token ``token_task`` with ``PADDING_TASK`` on the padding, so rows may mix kinds).
    """
    if not docs:
        raise DataError("There are no documents to pack.", hint="Check the training data is not empty.")
    mode = MaskMode(mask_mode)
    lengths = [len(d) for d in docs]
    _check_lengths(lengths, row_length)
    if task is not None and doc_tasks is not None:
        raise DataError("pack_documents got both `task` and `doc_tasks`.",
                        hint="Give one task for all rows or one per document, not both.")
    if doc_tasks is not None and len(doc_tasks) != len(docs):
        raise DataError(f"There are {len(docs)} documents but {len(doc_tasks)} task ids.",
                        hint="Give one task id per document in doc_tasks.")
    if plan is not None:
        too_long = [i for i, n in enumerate(lengths) if n > row_length]
        if too_long:
            raise DataError(f"Document {too_long[0]} has {lengths[too_long[0]]} tokens, more than a "
                            f"{row_length}-token row, and a plan cannot split it.",
                            hint="Split long documents before planning the rows.")
        _check_plan(plan, lengths, row_length)
    pieces, piece_labels, owner = _split_long(docs, labels, row_length)
    bins = [list(b) for b in plan] if plan is not None else plan_bins([len(p) for p in pieces], row_length)
    rows = PackedRows([], [], [], [], [], task=None if task is None else [task] * len(bins),
                      mask_mode=mode, row_length=row_length, token_task=None if doc_tasks is None else [])
    for members in bins:
        ids: list[int] = []
        labs: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        kinds: list[int] = []
        for s, j in enumerate(members):
            n = len(pieces[j])
            ids.extend(pieces[j])
            labs.extend([IGNORE_INDEX] + piece_labels[j][1:])
            pos.extend(range(n))
            seg.extend([s] * n)
            if doc_tasks is not None:
                kinds.extend([doc_tasks[owner[j]]] * n)
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
        if rows.token_task is not None:
            rows.token_task.append(kinds + [PADDING_TASK] * pad)
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


# --------------------------------------------------------------------------- per-document attention

DOCUMENT_ATTENTION = "sw_document_sdpa"


def _document_bounds(position_ids: Any) -> list[tuple[tuple[int, int], ...]]:
    """Per row, the (start, end) of each document: a new one wherever the position does not go up
    by exactly 1 (the rule of ``transformers.masking_utils.find_packed_sequence_indices``)."""
    import torch

    t = position_ids.size(-1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    out = []
    for row in starts.tolist():
        s = [i for i, new in enumerate(row) if new]
        out.append(tuple(zip(s, s[1:] + [t])))
    return out


def document_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                               dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs: Any) -> tuple[Any, None]:
    """Causal sdpa on each document of a packed row alone (boundaries from ``position_ids``).

    Anything that is not a packed training forward (a 2-D padding mask, a KV cache with more keys
    than queries, a non-causal module, no ``position_ids``) goes to transformers' own sdpa path
    unchanged. ``query`` is ``[B, H, T, D]``, ``key``/``value`` ``[B, H_kv, T, D]``; the output is
    ``[B, T, H, D]`` like ``sdpa_attention_forward``'s.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t = query.shape[2]
    if (attention_mask is not None or position_ids is None or not causal or key.shape[2] != t or t == 1
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    extra = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    bounds = _document_bounds(position_ids.expand(query.shape[0], -1))
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for r, b in enumerate(bounds):
        groups.setdefault(b, []).append(r)

    def run(q: Any, k: Any, v: Any, segments: tuple[tuple[int, int], ...]) -> Any:
        parts = [sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout, scale=scaling,
                      is_causal=e - s > 1, **extra) for s, e in segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    if len(groups) == 1:  # every row has the same documents (batch 1, or unpacked rows)
        out = run(query, key, value, bounds[0])
    else:
        rows: list[Any] = [None] * query.shape[0]
        for segments, members in groups.items():
            idx = torch.tensor(members, device=query.device)
            o = run(query.index_select(0, idx), key.index_select(0, idx), value.index_select(0, idx), segments)
            for j, r in enumerate(members):
                rows[r] = o[j : j + 1]
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def _document_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask for packed or plain causal rows (the attention reads ``position_ids``); a caller's
    2-D padding mask becomes transformers' sdpa mask as usual."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable_document_attention(model: Any) -> Any:
    """Switch ``model`` (a transformers model, or a PEFT model around one) to
    ``DOCUMENT_ATTENTION``; registers it with transformers on first use. Only for causal
    full-attention decoders (no sliding window); forwards must pass ``use_cache=False`` and the
    packed rows' ``position_ids`` (as ``ScalingTrainer`` does). Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if DOCUMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DOCUMENT_ATTENTION, document_attention_forward)
        AttentionMaskInterface.register(DOCUMENT_ATTENTION, _document_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "sliding_window", None) or getattr(base.config, "layer_types", None) and any(
            kind != "full_attention" for kind in base.config.layer_types):
        raise DataError("Per-document attention supports full-attention decoders only (this model has sliding-window "
                        "layers).", hint="Keep attn_implementation 'sdpa' for this model.")
    base.set_attn_implementation(DOCUMENT_ATTENTION)
    return model


@contextlib.contextmanager
def document_attention_for_training(model: Any, packed: bool) -> Iterator[bool]:
    """Per-document attention (``DOCUMENT_ATTENTION``) while a stage trains on packed rows, the
    model's own attention implementation restored afterwards (probes, snapshots and the export
    see the stock one, and no custom name reaches a saved config). Only when the model runs
    transformers' ``sdpa`` with full attention everywhere; otherwise (eager, flash, sliding
    windows, unpacked rows) nothing changes. Yields whether it switched.

    Why: with packed rows transformers builds a dense ``[T, T]`` block mask from the restarting
    position ids, and sdpa then computes every cross-document score only to mask it; causal sdpa
    per document does not (bench/perf.py, variable-length section: 1.40x at 1024 tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    original = getattr(config, "_attn_implementation", None)
    sliding = getattr(config, "sliding_window", None) or any(
        kind != "full_attention" for kind in (getattr(config, "layer_types", None) or []))
    if not packed or original != "sdpa" or sliding:
        yield False
        return
    enable_document_attention(model)
    try:
        yield True
    finally:
        base.set_attn_implementation(original)
