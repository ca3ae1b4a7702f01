"""Data loading through `datasets` and the stage batches built from it.

Accepted inputs (recipe ``data.train`` / ``data.eval``): ``.jsonl``/``.json`` (a ``text`` field,
name configurable), ``.txt`` (one document per line), ``.parquet``, ``.csv``, or a folder
written by ``Dataset.save_to_disk``. Documents are tokenized once and joined with EOS into a
token stream; stage rows are windows of that stream, plus optional synthetic passkey rows,
either one example per padded row or packed (``build_stage_rows(pack=True)``).

Real corpora take another road (``corpus.py``): tokenized once into a memory-mapped cache, with
windows that respect documents; ``build_stage_rows`` takes such a source (``DocumentWindows``)
in place of the token stream.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import DataError
from .packing import PADDING_TASK, FirstFitRows, MaskMode, pack_documents

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

TASK_LM = 0
DEPTH_STRATA = 10  # synthetic retrieval rows cycle through this many key-depth bands
TASK_PASSKEY = 1
TASK_PADDING = PADDING_TASK  # per-token task of a packed row's padding tail (-1)


def load_texts(paths: list[Path], text_field: str) -> list[str]:
    """All non-empty documents of the given files/folders, in order."""
    import datasets

    texts: list[str] = []
    for path in paths:
        if not path.exists():
            raise DataError(f"Data file {path} does not exist.", hint="Fix the path in data.train / data.eval.")
        try:
            if path.is_dir():
                if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
                    raise DataError(
                        f"Data folder {path} is not a saved `datasets` folder (no dataset_info.json/state.json).",
                        hint="Point data.train at files (.jsonl/.txt/.parquet) or a Dataset.save_to_disk folder.",
                    )
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[next(iter(ds))]
            else:
                builder = _BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise DataError(
                        f"Data file {path} has an unsupported extension '{path.suffix}'.",
                        hint=f"Use one of {', '.join(sorted(_BUILDERS))} or a saved datasets folder.",
                    )
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(
                f"Could not read data file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                hint="Check that the file is valid (one JSON object per line for .jsonl).",
            ) from None
        field = "text" if (path.is_file() and path.suffix.lower() == ".txt") else text_field
        if field not in ds.column_names:
            raise DataError(
                f"Data file {path} has no '{field}' field (columns: {ds.column_names}).",
                hint="Set data.text_field to the column holding the text.",
            )
        bad = [i for i, t in enumerate(ds[field]) if t is not None and not isinstance(t, str)]
        if bad:
            raise DataError(f"Data file {path}: field '{field}' is not text in row {bad[0] + 1}.")
        texts.extend(t for t in ds[field] if t and t.strip())
    if not texts:
        raise DataError(f"No text found in {[str(p) for p in paths]}.", hint="The data files are empty.")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    return ids


def split_heldout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic document-level split used when the recipe names no eval data."""
    held = heldout_indices(len(texts), fraction, seed)
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def heldout_indices(n_docs: int, fraction: float, seed: int) -> set[int]:
    """The documents :func:`split_heldout` holds out of ``n_docs`` (the corpus cache leaves the
    same ones out of its training windows)."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(n_docs * fraction)) if n_docs > 1 else 0
    return set(order[:n_eval])


@runtime_checkable
class DocumentWindows(Protocol):
    """A token source whose windows respect document boundaries (``corpus.CorpusSampler``):
    ``draw`` gives ``length`` tokens as whole documents / document chunks; ``len`` counts its tokens."""

    def __len__(self) -> int: ...

    def draw(self, length: int, rng: random.Random) -> list[list[int]]: ...


@dataclass
class StageRows:
    """Pre-built training rows for one stage (all of ``length`` tokens).

    Two layouts, told apart by ``position_ids``:

    * padded (``position_ids`` None): one example per row, right-padded; ``attention_mask``
      marks the real tokens and ``task`` is one id per row;
    * packed (``position_ids`` set, ``attention_mask`` None): whole examples back to back
      (``packing.py``), position ids restarting at 0 at each example and at the padding tail, so
      transformers keeps attention inside each example; ``task`` is one id per token,
      ``TASK_PADDING`` on the padding tail;
    * PoSE (``position_ids`` and ``attention_mask`` set): padded rows of the base window whose
      position ids skip up to the stage length (``context/pose.py``).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]] | None
    task: list[int] | list[list[int]]
    position_ids: list[list[int]] | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None and self.attention_mask is None

    @property
    def pose(self) -> bool:
        return self.position_ids is not None and self.attention_mask is not None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = {"input_ids": torch.tensor(self.input_ids[i]), "labels": torch.tensor(self.labels[i])}
        if self.position_ids is not None:
            # packed: no attention_mask, transformers derives the per-example blocks from the
            # restarts; PoSE: skipping positions for the student, contiguous ones for a teacher
            item["position_ids"] = torch.tensor(self.position_ids[i])
        if self.attention_mask is not None:
            item["attention_mask"] = torch.tensor(self.attention_mask[i])
        if self.pose:
            item["pose"] = torch.tensor(1)
        item["task"] = torch.tensor(self.task[i])
        return item

    @property
    def padding_fraction(self) -> float:
        """Share of the stage's token slots that are padding: ``attention_mask`` 0 when padded,
        the padding tail (``TASK_PADDING``) when packed. Prompt tokens without a label are real
        tokens (they are computed and attended to), so they do not count as padding."""
        total = sum(len(r) for r in self.input_ids)
        if not total:
            return 0.0
        if self.packed:
            real = total - sum(row.count(TASK_PADDING) for row in self.task)
        else:
            real = sum(sum(m) for m in self.attention_mask)
        return 1 - real / total

    def examples_per_task(self) -> dict[int, int]:
        """How many examples (LM windows, passkey prompts, ...) of each task the rows hold."""
        counts: dict[int, int] = {}
        for r in range(len(self)):
            if self.packed:
                kinds = [k for k, p in zip(self.task[r], self.position_ids[r]) if p == 0 and k != TASK_PADDING]
            else:
                kinds = [self.task[r]]
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        return counts


def build_stage_rows(
    stream: Sequence[int] | DocumentWindows,
    length: int,
    n_rows: int,
    *,
    passkey_share: float,
    passkey_builder: Any | None,
    pad_id: int,
    seed: int,
    pack: bool = False,
    pose_target: int | None = None,
    pose_chunks: int = 2,
) -> StageRows:
    """``n_rows`` rows of ``length`` tokens: windows of the stream and, for ``passkey_share`` of
    the rows, passkey examples. A ``DocumentWindows`` source gives windows that respect
    documents: padded rows hold its pieces back to back, packed rows restart position ids at
    each piece (no attention across documents).

    Passkey examples are supervised on the answer only (a completion-style loss); the
    language-model windows on every token. Each passkey example asks for ``U[min(64, length),
    length]`` tokens; key depths are stratified (``DEPTH_STRATA`` bands, cycled). With a
    ``MixedTemplateBuilder`` each example draws its wording from the training templates, never
    the probe's (no contamination of the evaluation).

    ``pack=False``: one passkey example per row, right-padded (about half of each passkey row is
    padding). ``pack=True``: the passkey rows are filled with whole examples back to back
    (``packing.FirstFitRows``, then ``packing.pack_documents``, position-id mask mode). The row
    budget stays the same -- exactly ``n_rows`` rows, ``round(n_rows * passkey_share)`` of them
    passkey rows, the same share of compute as unpacked -- and the room that packing frees is
    filled with *more* examples drawn from the same seeded RNG and the same length
    distribution, so a stage trains at least as many passkey examples as unpacked (every
    passkey row holds at least one) and typically 1.5-1.9x as many (demo tokenizer, lengths 512
    and 1024, 20 seeds). The alternative -- the same examples in fewer rows, the rest language
    modelling -- would silently lower the recipe's passkey share of compute by about half. The
    row order is fixed by ``seed``.
    """
    if len(stream) < length + 1:
        raise DataError(
            f"The training data has {len(stream)} tokens, fewer than one {length}-token window.",
            hint="Add more text or lower context.target_length.",
        )
    rng = random.Random(seed)
    n_passkey = round(n_rows * passkey_share) if passkey_builder is not None else 0
    kinds = [TASK_PASSKEY] * n_passkey + [TASK_LM] * (n_rows - n_passkey)
    rng.shuffle(kinds)
    min_pk = min(64, length)
    if passkey_builder is not None and n_passkey:
        min_pk = max(min_pk, passkey_builder.min_length())
        if min_pk > length:
            raise DataError(
                f"Synthetic passkey examples need at least {min_pk} tokens with this tokenizer; the {length}-token "
                "stage is too short for them.",
                hint="Set data.synthetic_passkey_share to 0, or start the schedule at a longer length.",
            )

    def lm_pieces() -> list[list[int]]:
        """One language-model row: a window of the stream, or a corpus window's document pieces."""
        if isinstance(stream, DocumentWindows):
            return stream.draw(length, rng)
        start = rng.randrange(0, len(stream) - length)
        return [stream[start : start + length]]

    passkey_example = _passkey_examples(passkey_builder, rng, min_pk, length)
    if pack:
        return _packed_stage_rows(kinds, length, lm_pieces, passkey_example, pad_id)

    rows = StageRows([], [], [], [])
    for kind in kinds:
        if kind == TASK_LM:
            window = list(chain.from_iterable(lm_pieces()))
            rows.input_ids.append(window)
            rows.labels.append(list(window))
            rows.attention_mask.append([1] * length)
        else:
            ids, labels = passkey_example()
            pad = length - len(ids)
            rows.input_ids.append(ids + [pad_id] * pad)
            rows.labels.append(labels + [-100] * pad)
            rows.attention_mask.append([1] * len(ids) + [0] * pad)
        rows.task.append(kind)
    if pose_target is not None:
        rows.position_ids = _pose_positions(rows.attention_mask, pose_target, pose_chunks, random.Random(seed + 1))
    return rows


def _pose_positions(masks: list[list[int]], target: int, chunks: int, rng: random.Random) -> list[list[int]]:
    """PoSE position ids per row: skipping ones for the real tokens, the padding continuing."""
    from .context.pose import skip_positions

    out = []
    for mask in masks:
        real = sum(mask)
        positions = skip_positions(real, target, chunks, rng)
        tail = positions[-1] + 1 if positions else 0
        out.append(positions + list(range(tail, tail + len(mask) - real)))
    return out


def _passkey_examples(builder: Any, rng: random.Random, min_len: int, length: int):
    """A function drawing the next synthetic retrieval example as (ids, labels): answer-only
    labels, a length in [min_len, length], a key depth from the next of ``DEPTH_STRATA`` bands
    (cycled, so every depth is trained equally often even in a short stage), and with a
    ``MixedTemplateBuilder`` a training wording drawn from the same seeded ``rng``."""
    from .evaluation.passkey import KEY_RANGE

    drawn = [0]

    def example() -> tuple[list[int], list[int]]:
        stratum, drawn[0] = drawn[0] % DEPTH_STRATA, drawn[0] + 1
        size, depth, key = rng.randint(min_len, length), (stratum + rng.random()) / DEPTH_STRATA, rng.randint(*KEY_RANGE)
        ex = (builder.build(size, depth, key, rng=rng) if hasattr(builder, "builders")
              else builder.build(size, depth, key))
        ids = ex.input_ids
        return ids, [-100] * len(ex.prompt_ids) + ids[len(ex.prompt_ids) :]

    return example


def _packed_stage_rows(kinds: list[int], length: int, lm_pieces, passkey_example, pad_id: int) -> StageRows:
    """The packed layout of :func:`build_stage_rows` for the shuffled row kinds ``kinds``. All
    language-model windows are drawn first, then the passkey examples, so a seed's packed rows
    hold other windows than its padded rows (both are fixed by the seed). A window's document
    pieces are separate examples of its row."""
    docs: list[list[int]] = []
    labels: list[list[int]] = []
    doc_tasks: list[int] = []

    def add(ids: list[int], labs: list[int], kind: int) -> int:
        docs.append(ids)
        labels.append(labs)
        doc_tasks.append(kind)
        return len(docs) - 1

    # language-model windows are a full row each: its document pieces (a stream window: one)
    lm_docs = [[add(p, list(p), TASK_LM) for p in pieces] for pieces in (lm_pieces() for k in kinds if k == TASK_LM)]
    # passkey rows: examples in the order drawn, first fit, until one fits in no row
    filler = FirstFitRows(sum(1 for k in kinds if k == TASK_PASSKEY), length)
    first_pk = len(docs)
    while filler.rows:
        ids, labs = passkey_example()
        if filler.place(len(ids)) is None:
            break  # dropped: keeping only a prefix of the draws keeps their length distribution
        add(ids, labs, TASK_PASSKEY)
    lm_rows = iter(lm_docs)
    pk_rows = iter([[first_pk + j for j in row] for row in filler.plan])
    plan = [next(lm_rows) if k == TASK_LM else next(pk_rows) for k in kinds]
    if not plan:
        return StageRows([], [], None, [], position_ids=[])
    packed = pack_documents(docs, length, pad_id=pad_id, labels=labels, doc_tasks=doc_tasks, plan=plan,
                            mask_mode=MaskMode.POSITION_IDS)
    return StageRows(packed.input_ids, packed.labels, None, packed.token_task, position_ids=packed.position_ids)
