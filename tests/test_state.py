"""Exact resume: optimizer, scheduler, RNG and data position saved as safetensors/JSON, loaded into
fresh objects, give the same next losses as the uninterrupted run (bit for bit, CPU)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from scaler_wizard.cache.checkpoints import CheckpointCache
from scaler_wizard.cache.state import (
    StateFormatError,
    apply_training_state,
    capture_training_state,
    join_tensors,
    load_snapshot,
    save_snapshot,
    split_tensors,
)

BATCHES_PER_EPOCH = 4


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    return x, (x @ torch.randn(6, 1, generator=g)).squeeze(-1)


def _build(init_seed: int):
    """A model with a frozen 'base' and a trainable part (like adapters), AdamW, warmup+decay."""
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )
    model[0].weight.requires_grad_(False)  # frozen base weight
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9**s)
    return model, opt, sched


def _step(model, opt, sched, position: dict) -> float:
    """One step: batch order from a per-epoch seeded permutation (the data position replays it);
    dropout draws from torch's global RNG, label noise from python and numpy RNGs."""
    x, y = _data()
    order = torch.randperm(32, generator=torch.Generator().manual_seed(100 + position["epoch"]))
    idx = order[position["batch"] * 8 : (position["batch"] + 1) * 8]
    noise = torch.tensor([random.gauss(0, 0.01) + float(np.random.normal(0, 0.01)) for _ in range(8)])
    loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(-1), y[idx] + noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    position["batch"] += 1
    if position["batch"] == BATCHES_PER_EPOCH:
        position.update(epoch=position["epoch"] + 1, batch=0)
    return loss.item()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_from_snapshot_reproduces_next_losses_exactly(tmp_path):
    cache = CheckpointCache(tmp_path)
    model, opt, sched = _build(init_seed=1)
    _seed_all(7)
    position = {"epoch": 0, "batch": 0}
    losses = [_step(model, opt, sched, position) for _ in range(5)]
    snap = save_snapshot(
        cache,
        "run",
        step=5,
        stage=1,
        model=model,
        optimizer=opt,
        scheduler=sched,
        data_position=position,
        metrics={"train/loss": losses[-1]},
    )
    reference = [_step(model, opt, sched, position) for _ in range(3)]

    # A fresh process: the frozen base comes from the pretrained weights (same init here), the
    # trainable part is re-initialised, the optimizer is empty and the RNGs are elsewhere.
    fresh, fresh_opt, fresh_sched = _build(init_seed=1)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    _seed_all(12345)
    latest = cache.latest_valid("run")
    restored = load_snapshot(cache, latest, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert restored.components == ["model", "optimizer", "scheduler", "rng", "data"]
    assert latest.ref == snap.ref and restored.data_position == {"epoch": 1, "batch": 1}
    resumed = [_step(fresh, fresh_opt, fresh_sched, restored.data_position) for _ in range(3)]
    assert resumed == reference  # exact equality, not approx
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    index = (cache.blob_path(latest.files["state.json"].sha256)).read_text()
    assert '"0.bias"' in index and '"0.weight"' not in index  # the frozen base is not stored


def test_without_rng_restore_losses_differ(tmp_path):
    """The check above can fail: skipping the RNG states changes dropout masks and noise."""
    model, opt, sched = _build(init_seed=1)
    _seed_all(7)
    position = {"epoch": 0, "batch": 0}
    for _ in range(5):
        _step(model, opt, sched, position)
    files = capture_training_state(model=model, optimizer=opt, scheduler=sched, data_position=position)
    reference = [_step(model, opt, sched, dict(position)) for _ in range(3)]
    fresh, fresh_opt, fresh_sched = _build(init_seed=1)
    _seed_all(12345)
    restored = apply_training_state(
        files, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, restore_rng=False
    )
    assert [_step(fresh, fresh_opt, fresh_sched, restored.data_position) for _ in range(3)] != reference


def test_optimizer_state_round_trip_is_exact():
    model, opt, sched = _build(init_seed=3)
    _seed_all(0)
    position = {"epoch": 0, "batch": 0}
    for _ in range(3):
        _step(model, opt, sched, position)
    files = capture_training_state(model=model, optimizer=opt, scheduler=sched)
    fresh, fresh_opt, fresh_sched = _build(init_seed=4)
    apply_training_state(files, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)
    assert sched.state_dict() == fresh_sched.state_dict()


def test_nothing_is_unpickled_on_load(tmp_path, monkeypatch):
    model, opt, sched = _build(init_seed=0)
    cache = CheckpointCache(tmp_path)
    snap = save_snapshot(
        cache, "r", step=0, model=model, optimizer=opt, scheduler=sched, data_position={"i": 0}
    )
    assert all(name.endswith((".json", ".safetensors")) for name in snap.files)

    def forbidden(*a, **k):
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    fresh, fresh_opt, fresh_sched = _build(init_seed=1)
    load_snapshot(cache, snap, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert torch.equal(fresh[3].weight, model[3].weight)


def test_codec_round_trip_and_refusals():
    state = {
        0: {"step": torch.tensor(3.0), "m": torch.ones(2)},
        "t": (1, 2.5, float("inf")),
        "s": None,
        "nested": [{"__tuple__": "a key that looks like a marker"}],
    }
    tree, tensors = split_tensors(state)
    back = join_tensors(tree, tensors)
    assert back["t"] == (1, 2.5, float("inf")) and torch.equal(back[0]["m"], torch.ones(2))
    assert back["nested"] == state["nested"] and 0 in back
    with pytest.raises(StateFormatError, match="root.f"):
        split_tensors({"f": lambda: 1})
    model, _, _ = _build(init_seed=0)
    with pytest.raises(StateFormatError, match="Data position holds tensors"):
        capture_training_state(model=model, data_position={"pos": torch.tensor(1)})


def test_mismatched_model_is_refused():
    model, opt, _ = _build(init_seed=0)
    files = capture_training_state(model=model, optimizer=opt)
    other = torch.nn.Sequential(torch.nn.Linear(6, 8))
    with pytest.raises(StateFormatError, match="do not match the model"):
        apply_training_state(files, model=other)
