"""Replay: a share of short-context rows from the original distribution mixed into a
long-context stage, so the model keeps seeing the kind of input it was good at.

Why: context-extension fine-tuning on long windows only drifts the model at short range (PI
reports up to 2% regression, YaRN ~1.3 MMLU points at s = 16). Rehearsing the original
distribution at the original length is the cheap half of knowledge preservation; distillation on
the same rows (any teacher mode) is the other half. In ``offline`` mode the replay rows are the
offline cache's own rows, and ``replay_index`` tells the teacher which cached row each one is.

Replay rows *replace* stage rows (the number of rows, hence the step and token budget, stays the
same). A short row is right-padded to the stage length (labels -100): it keeps positions
``0 .. base_length-1``, exactly the positions it had originally. In padded stage rows the padding
has ``attention_mask`` 0; in packed stage rows (``StageRows.packed``) the row gets position ids
``0 .. n-1`` and the padding is a segment of its own (position ids from 0 again, task
``TASK_PADDING``), with no ``attention_mask``, like every packed row. The padding costs compute in
proportion to ``ratio * (1 - base_length / stage_length)``.

Pure Python: no torch import at module level (``StageRows.__getitem__`` imports it lazily).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data import TASK_LM, TASK_PADDING, StageRows
from ..errors import DataError, RecipeError

NOT_REPLAY = -1


@dataclass
class MixedRows(StageRows):
    """Stage rows plus ``replay_index``: the index of each row in the replay source, -1 for a
    stage row. Items carry it as ``"replay_index"`` (the key the offline teacher reads)."""

    replay_index: list[int] = field(default_factory=list)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = super().__getitem__(i)
        item["replay_index"] = torch.tensor(self.replay_index[i])
        return item

    @property
    def replay_share(self) -> float:
        return sum(1 for r in self.replay_index if r != NOT_REPLAY) / len(self) if len(self) else 0.0


def replay_count(n_rows: int, ratio: float) -> int:
    """How many of ``n_rows`` are replay rows for ``ratio`` (a share in [0, 1))."""
    if not (0.0 <= ratio < 1.0):
        raise RecipeError("replay settings", [("distillation.replay_ratio", f"must be within [0, 1), got {ratio}")])
    return round(n_rows * ratio)


def sample_short_rows(stream: Sequence[int], length: int, n_rows: int, *, seed: int) -> list[list[int]]:
    """``n_rows`` random windows of ``length`` tokens (the base context) from a token stream of the
    original distribution; deterministic for a seed."""
    if len(stream) < length + 1:
        raise DataError(
            f"The replay data has {len(stream)} tokens, fewer than one {length}-token window.",
            hint="Add more text or lower distillation.replay_ratio to 0.",
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - length) for _ in range(n_rows)]
    return [list(stream[s : s + length]) for s in starts]


def _choose_sources(n_source: int, n_pick: int, rng: random.Random) -> list[int]:
    """Distinct source rows while they last, then further shuffled passes over them."""
    picks: list[int] = []
    while len(picks) < n_pick:
        order = list(range(n_source))
        rng.shuffle(order)
        picks.extend(order[: n_pick - len(picks)])
    return picks


def mix_replay(
    rows: StageRows,
    replay_rows: Sequence[Sequence[int]],
    ratio: float,
    *,
    pad_id: int,
    seed: int,
    task: int = TASK_LM,
) -> MixedRows:
    """``rows`` with ``round(len(rows) * ratio)`` of them replaced by replay rows, placed at
    seeded random positions; the kept stage rows keep their order. Replay rows are supervised on
    every real token and padded to the stage length, in the layout of ``rows`` (padded or
    packed)."""
    n = len(rows)
    n_replay = replay_count(n, ratio)
    if n_replay and not replay_rows:
        raise DataError("distillation.replay_ratio > 0 but there are no replay rows.",
                        hint="Give replay data (or an offline cache), or set distillation.replay_ratio to 0.")
    length = len(rows.input_ids[0]) if n else 0
    too_long = [i for i, r in enumerate(replay_rows) if len(r) > length]
    if n_replay and too_long:
        raise DataError(
            f"Replay row {too_long[0]} has {len(replay_rows[too_long[0]])} tokens, more than the stage length {length}.",
            hint="Replay rows are short-context rows: build them at the base context length.",
        )
    rng = random.Random(seed)
    positions = set(rng.sample(range(n), n_replay))
    sources = _choose_sources(len(replay_rows), n_replay, rng) if n_replay else []

    packed, pose = rows.packed, getattr(rows, "pose", False)
    out = MixedRows([], [], None if packed else [], [], position_ids=[] if packed or pose else None)
    kept = iter(range(n))
    picked = iter(sources)
    for slot in range(n):
        if slot in positions:
            src = next(picked)
            ids = list(replay_rows[src])
            pad = length - len(ids)
            out.input_ids.append(ids + [pad_id] * pad)
            out.labels.append(ids + [-100] * pad)
            if packed:
                out.position_ids.append(list(range(len(ids))) + list(range(pad)))
                out.task.append([task] * len(ids) + [TASK_PADDING] * pad)
            else:
                out.attention_mask.append([1] * len(ids) + [0] * pad)
                out.task.append(task)
                if pose:  # a replay row is a plain base-length window: contiguous positions
                    out.position_ids.append(list(range(length)))
            out.replay_index.append(src)
        else:
            i = next(kept)
            out.input_ids.append(rows.input_ids[i])
            out.labels.append(rows.labels[i])
            if packed or pose:
                out.position_ids.append(rows.position_ids[i])
            if not packed:
                out.attention_mask.append(rows.attention_mask[i])
            out.task.append(rows.task[i])
            out.replay_index.append(NOT_REPLAY)
    return out
