"""Replay mixing: share, determinism, padding, order of the kept rows, errors."""

from __future__ import annotations

import pytest
import torch

from scaler_wizard.data import TASK_LM, TASK_PASSKEY, StageRows, build_stage_rows
from scaler_wizard.distill.replay import NOT_REPLAY, mix_replay, replay_count, sample_short_rows
from scaler_wizard.errors import DataError, RecipeError

STREAM = list(range(1000, 1600))


def stage_rows(n=20, length=32):
    return build_stage_rows(STREAM, length, n, passkey_share=0.0, passkey_builder=None, pad_id=0, seed=3)


def test_short_rows_are_windows_of_the_stream_and_deterministic():
    a = sample_short_rows(STREAM, 8, 5, seed=1)
    assert a == sample_short_rows(STREAM, 8, 5, seed=1)
    assert a != sample_short_rows(STREAM, 8, 5, seed=2)
    for row in a:
        assert len(row) == 8 and row == list(range(row[0], row[0] + 8))
    with pytest.raises(DataError, match="fewer than one 700-token window"):
        sample_short_rows(STREAM, 700, 1, seed=0)


@pytest.mark.parametrize("ratio,expected", [(0.0, 0), (0.25, 5), (0.5, 10), (0.33, 7)])
def test_share_and_budget(ratio, expected):
    rows = stage_rows()
    short = sample_short_rows(STREAM, 8, 50, seed=4)
    mixed = mix_replay(rows, short, ratio, pad_id=0, seed=5)
    assert len(mixed) == len(rows) == 20  # replay replaces: same step/token budget
    assert sum(r != NOT_REPLAY for r in mixed.replay_index) == expected == replay_count(20, ratio)
    assert mixed.replay_share == pytest.approx(expected / 20)


def test_replay_rows_are_padded_and_supervised_and_kept_rows_keep_order():
    rows = stage_rows()
    short = sample_short_rows(STREAM, 8, 3, seed=4)  # fewer sources than picks: reused
    mixed = mix_replay(rows, short, 0.5, pad_id=7, seed=6)
    kept = [i for i, r in enumerate(mixed.replay_index) if r == NOT_REPLAY]
    assert [mixed.input_ids[i] for i in kept] == rows.input_ids[: len(kept)]
    for i, src in enumerate(mixed.replay_index):
        if src == NOT_REPLAY:
            continue
        assert mixed.input_ids[i] == short[src] + [7] * 24
        assert mixed.labels[i] == short[src] + [-100] * 24
        assert mixed.attention_mask[i] == [1] * 8 + [0] * 24
        assert mixed.task[i] == TASK_LM
    used = [s for s in mixed.replay_index if s != NOT_REPLAY]
    assert sorted(set(used)) == [0, 1, 2]  # every source used before any is repeated
    item = mixed[next(i for i, r in enumerate(mixed.replay_index) if r != NOT_REPLAY)]
    assert item["replay_index"].dtype == torch.int64 and int(item["replay_index"]) >= 0
    assert set(item) == {"input_ids", "labels", "attention_mask", "task", "replay_index"}


def test_deterministic_with_seed():
    rows, short = stage_rows(), sample_short_rows(STREAM, 8, 50, seed=4)
    a = mix_replay(rows, short, 0.3, pad_id=0, seed=9)
    b = mix_replay(rows, short, 0.3, pad_id=0, seed=9)
    c = mix_replay(rows, short, 0.3, pad_id=0, seed=10)
    assert a == b
    assert a.replay_index != c.replay_index


def test_keeps_task_of_stage_rows_and_custom_replay_task():
    rows = StageRows([[1] * 4] * 4, [[1] * 4] * 4, [[1] * 4] * 4, [TASK_PASSKEY] * 4)
    mixed = mix_replay(rows, [[5, 6]], 0.5, pad_id=0, seed=0, task=2)
    assert sorted(mixed.task) == [TASK_PASSKEY, TASK_PASSKEY, 2, 2]


def test_errors():
    rows = stage_rows()
    with pytest.raises(RecipeError) as err:
        mix_replay(rows, [[1]], 1.0, pad_id=0, seed=0)
    assert err.value.problems[0][0] == "distillation.replay_ratio"
    with pytest.raises(DataError, match="no replay rows"):
        mix_replay(rows, [], 0.2, pad_id=0, seed=0)
    with pytest.raises(DataError, match="more than the stage length 32"):
        mix_replay(rows, [[1] * 40], 0.2, pad_id=0, seed=0)
    assert mix_replay(rows, [], 0.0, pad_id=0, seed=0).replay_index == [NOT_REPLAY] * 20
