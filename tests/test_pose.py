"""PoSE (positional skip-wise training): position ids that skip so base-length windows cover
the stage's distances; rows, replay and a pipeline run with ``context.pose``."""

from __future__ import annotations

import json
import random

import pytest
from conftest import write_recipe

from scaler_wizard.context.pose import skip_positions


@pytest.mark.parametrize("seed", range(20))
def test_skip_positions_stay_in_range_and_reach_far(seed):
    rng = random.Random(seed)
    pos = skip_positions(256, 1024, 2, rng)
    assert len(pos) == 256 and pos[0] == 0 and pos[-1] < 1024
    assert all(b > a for a, b in zip(pos, pos[1:]))  # strictly increasing
    jumps = [b - a for a, b in zip(pos, pos[1:]) if b - a != 1]
    assert len(jumps) <= 1  # two chunks: at most one skip


def test_skips_cover_the_target_distances_over_many_rows():
    rng = random.Random(0)
    spans = [p[-1] - p[0] for p in (skip_positions(256, 1024, 2, rng) for _ in range(400))]
    assert max(spans) > 900 and min(spans) < 400  # long and short distances are both trained
    assert skip_positions(0, 1024, 2, rng) == [] and skip_positions(5, 4, 3, rng) == [0, 1, 2, 3, 4]


def test_pose_rows_keep_the_base_window_and_skip_positions(tiny_tokenizer):
    from scaler_wizard.data import build_stage_rows, token_stream
    from scaler_wizard.distill.replay import mix_replay
    from scaler_wizard.evaluation.passkey import MixedTemplateBuilder

    texts = [json.loads(x)["text"] for x in open(
        __import__("conftest").DEMO_DATA / "heldout.jsonl").read().splitlines()[:10]]
    stream = token_stream(tiny_tokenizer, texts)
    rows = build_stage_rows(stream, 128, 12, passkey_share=0.5,
                            passkey_builder=MixedTemplateBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id),
                            pad_id=0, seed=3, pose_target=512)
    assert rows.pose and not rows.packed and len(rows) == 12
    for ids, pos, mask in zip(rows.input_ids, rows.position_ids, rows.attention_mask):
        assert len(ids) == len(pos) == len(mask) == 128
        real = sum(mask)
        assert pos[real - 1] < 512 and all(b > a for a, b in zip(pos, pos[1:]))
    item = rows[0]
    assert {"position_ids", "attention_mask", "pose"} <= set(item)
    mixed = mix_replay(rows, [stream[:100]], 0.25, pad_id=0, seed=1)
    replay = [i for i, r in enumerate(mixed.replay_index) if r >= 0]
    assert replay and all(mixed.position_ids[i] == list(range(128)) for i in replay)
    assert all(mixed.attention_mask[i] is not None for i in range(len(mixed)))


def test_pipeline_trains_with_pose_and_base_teacher(tmp_path, tiny_model_dir):
    from scaler_wizard.pipeline import run

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", run__run_id="pose",
                          context__schedule=[256], context__base_length=128, context__pose=True,
                          training__steps_per_stage=3,
                          data__synthetic_passkey_share=0.5, distillation__enabled=True,
                          distillation__replay_ratio=0.25, output__merge=False)
    result = run(recipe, self_approve=True)
    events = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["value"] for e in events if e["metric"] == "train/loss"]
    # PoSE trains on base-length windows (128 tokens here), probes at the stage length
    tps = [e for e in events if e["metric"] == "train/tokens_per_s"]
    assert tps and "eval/perplexity@256" in {e["metric"] for e in events}


def test_pose_with_packing_is_refused(tmp_path, tiny_model_dir):
    from scaler_wizard.errors import RecipeError
    from scaler_wizard.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "runs", context__pose=True,
                        data__packing=True)
    with pytest.raises(RecipeError, match="pose"):
        load_recipe(path)
