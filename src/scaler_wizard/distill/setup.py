"""The run's knowledge preservation, built from the recipe: the teacher and its loss settings
(``distill/teacher.py``, ``distill/losses.py``) and the replay rows (``distill/replay.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..recipe import Recipe


def prepare_distillation(recipe: Recipe, model, tokenizer, original_config, base_length: int, *,
                         teacher_dir: Path | None = None, cache_dir: Path | None = None):
    """(teacher, DistillConfig) when distillation is on, else (None, None). ``teacher_dir`` and
    ``cache_dir``: where to read ``distillation.teacher_path`` and ``distillation.cache`` (the
    pipeline passes the private copies of their approved bytes)."""
    d = recipe.distillation
    if not d.enabled:
        return None, None
    from .losses import DistillConfig
    from .teacher import BaseModelTeacher, build_teacher

    config = DistillConfig(divergence=d.divergence, beta=d.beta, temperature=d.temperature, kd_weight=d.kd_weight,
                           chunk_size=recipe.training.loss_chunk_size)
    if d.teacher == "base" and recipe.scaling.strategy == "block_expansion":
        grow = recipe.scaling.block_expansion
        if grow.train_norms or grow.train_embeddings:
            raise PlanError(
                "The 'base' teacher of block expansion is the grown model with its new blocks bypassed; with "
                "train_norms/train_embeddings the old weights change too, so it would not be the base model.",
                hint="Use distillation.teacher: model or offline, or train only the new blocks.",
            )
        from ..scaling.strategies import bypass_new_blocks

        teacher = BaseModelTeacher(model, original_config, context_length=d.teacher_context_length or base_length,
                                   extra_views=[bypass_new_blocks])
        return teacher, config

    teacher = build_teacher(
        d.teacher, model, original_config=original_config,
        teacher_path=teacher_dir,
        cache_dir=cache_dir,
        context_length=d.teacher_context_length or base_length,
        dtype=recipe.model.dtype, student_tokenizer=tokenizer,
    )
    return teacher, config


def mix_in_replay(recipe: Recipe, rows, train_stream: list[int], base_length: int, pad_id: int, seed: int,
                  teacher: Any = None):
    """Replace a share of the stage's rows by base-length rows of the original data (replay).
    With an offline teacher the replay rows are the cache's own rows (their top-k is stored)."""
    ratio = recipe.distillation.replay_ratio
    if not ratio:
        return rows
    from .replay import mix_replay, replay_count, sample_short_rows
    from .teacher import OfflineTeacher

    if isinstance(teacher, OfflineTeacher):
        replay = teacher.cache.token_rows()
    else:
        replay = sample_short_rows(train_stream, base_length, replay_count(len(rows), ratio), seed=seed)
    return mix_replay(rows, replay, ratio, pad_id=pad_id, seed=seed)
