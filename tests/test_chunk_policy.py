"""Chunk sizing of the chunked losses (``losses/chunk_policy.py``)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler_wizard.errors import PlanError
from scaler_wizard.losses.chunk_policy import (
    DEFAULT_BUDGET_BYTES,
    FP32_BUFFERS,
    auto_chunk_size,
    chunk_bytes_per_token,
    positions_per_chunk,
)
from scaler_wizard.losses.chunked_ce import chunked_token_ce

MB = 2**20


def test_small_vocabulary_is_one_chunk_of_the_whole_batch():
    # the demo model (vocabulary 4096) at the full perf bench batch: 4 x 512 tokens = 96 MB < 256 MB
    assert auto_chunk_size(4 * 512, 4096) == 4 * 512
    assert positions_per_chunk(4, 512, 4096) == 512


def test_large_vocabulary_is_cut_into_balanced_chunks_under_the_budget():
    # 4096 tokens x 128,256 vocabulary: 12 B per token and vocabulary entry -> 1.54 MB per token,
    # 174 tokens fit 256 MB -> 24 chunks -> 4096 / 24 = 170.7 -> 171 tokens each
    per_token = chunk_bytes_per_token(128_256)
    assert per_token == 128_256 * 4 * 3
    chunk = auto_chunk_size(4096, 128_256)
    assert chunk == 171
    assert chunk * per_token <= DEFAULT_BUDGET_BYTES
    assert math.ceil(4096 / chunk) == math.ceil(4096 / (DEFAULT_BUDGET_BYTES // per_token))


def test_chunks_are_balanced_not_a_remainder():
    per_token = chunk_bytes_per_token(1000)
    # room for 600 tokens: 1000 tokens become 2 x 500, not 600 + 400
    assert auto_chunk_size(1000, 1000, budget_bytes=600 * per_token) == 500
    # exactly the budget still fits in one chunk
    assert auto_chunk_size(600, 1000, budget_bytes=600 * per_token) == 600


def test_half_precision_logits_cost_an_extra_copy():
    assert chunk_bytes_per_token(32_000, dtype_bytes=2) == 32_000 * (12 + 2)
    assert auto_chunk_size(8192, 32_000, dtype_bytes=2) < auto_chunk_size(8192, 32_000)


def test_distillation_losses_get_smaller_chunks_than_cross_entropy():
    ce = auto_chunk_size(8192, 128_256)
    kl = auto_chunk_size(8192, 128_256, loss="forward_kl")
    jsd = auto_chunk_size(8192, 128_256, loss="jsd")
    assert jsd < kl < ce
    assert FP32_BUFFERS["jsd"] > FP32_BUFFERS["forward_kl"] > FP32_BUFFERS["ce"]


def test_budget_below_one_token_still_gives_one_token():
    assert auto_chunk_size(100, 128_256, budget_bytes=1) == 1
    assert positions_per_chunk(8, 100, 128_256, budget_bytes=1) == 1


def test_positions_keep_every_row_in_the_chunk():
    # 8 rows x 4096 positions, vocabulary 128,256: 174 tokens fit -> 21 positions per chunk of 8 rows
    p = positions_per_chunk(8, 4096, 128_256)
    assert 8 * p * chunk_bytes_per_token(128_256) <= DEFAULT_BUDGET_BYTES
    assert p < 4096
    # one fewer chunk would not fit
    fewer = math.ceil(4096 / (math.ceil(4096 / p) - 1))
    assert 8 * fewer * chunk_bytes_per_token(128_256) > DEFAULT_BUDGET_BYTES


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200_000), vocab=st.integers(1, 300_000), budget_mb=st.integers(1, 4096),
       dtype_bytes=st.sampled_from([2, 4]), loss=st.sampled_from(sorted(FP32_BUFFERS)))
def test_chunk_fits_and_uses_the_fewest_chunks(n, vocab, budget_mb, dtype_bytes, loss):
    budget = budget_mb * MB
    per_token = chunk_bytes_per_token(vocab, dtype_bytes=dtype_bytes, loss=loss)
    chunk = auto_chunk_size(n, vocab, dtype_bytes=dtype_bytes, budget_bytes=budget, loss=loss)
    assert 1 <= chunk <= n
    if per_token <= budget:
        assert chunk * per_token <= budget
    if n * per_token <= budget:
        assert chunk == n
    fit = max(1, budget // per_token)
    assert math.ceil(n / chunk) == math.ceil(n / fit)  # as few chunks as the budget allows
    assert chunk - math.ceil(n / math.ceil(n / chunk)) == 0  # balanced: no short remainder chunk


def test_positions_use_the_fewest_chunks():
    # demo vocabulary, 4 rows x 511 targets, JSD (14 buffers): 1170 tokens fit -> 292 positions
    # -> 2 chunks of 256 (a balanced token count first, 1022 // 4 = 255, would have made 3)
    assert positions_per_chunk(4, 511, 4096, loss="jsd") == 256


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 64), seq=st.integers(1, 65_536), vocab=st.integers(1, 300_000),
       budget_mb=st.integers(1, 2048))
def test_positions_fit_the_budget(batch, seq, vocab, budget_mb):
    budget = budget_mb * MB
    per_token = chunk_bytes_per_token(vocab)
    p = positions_per_chunk(batch, seq, vocab, budget_bytes=budget)
    assert 1 <= p <= seq
    if batch * per_token <= budget:  # at least one position of every row fits
        assert batch * p * per_token <= budget
        # as few chunks as the budget allows
        assert math.ceil(seq / p) == math.ceil(seq / min(seq, budget // (batch * per_token)))
    if batch * seq * per_token <= budget:
        assert p == seq


def test_chosen_positions_give_the_same_loss_as_one_chunk():
    torch.manual_seed(0)
    h = torch.randn(3, 40, 8, requires_grad=True)
    w = torch.randn(500, 8, requires_grad=True)
    y = torch.randint(0, 500, (3, 40))
    # a budget for ~20 tokens: 3 rows -> 6 positions -> 7 chunks of 6 (balanced 40 / 7 -> 6)
    p = positions_per_chunk(3, 40, 500, budget_bytes=20 * chunk_bytes_per_token(500))
    assert p == 6
    whole = chunked_token_ce(h, w, y, chunk_size=40)
    cut = chunked_token_ce(h, w, y, chunk_size=p)
    assert torch.allclose(whole, cut, atol=1e-6)
    gw_whole, = torch.autograd.grad(whole.sum(), w)
    gw_cut, = torch.autograd.grad(cut.sum(), w)
    assert torch.allclose(gw_whole, gw_cut, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    ({"n_tokens": 0, "vocab_size": 10}, "n_tokens"),
    ({"n_tokens": 10, "vocab_size": -1}, "vocab_size"),
    ({"n_tokens": 10, "vocab_size": 10, "budget_bytes": 0}, "budget_bytes"),
    ({"n_tokens": 10, "vocab_size": 10, "dtype_bytes": 0}, "dtype_bytes"),
    ({"n_tokens": True, "vocab_size": 10}, "n_tokens"),
    ({"n_tokens": 10.0, "vocab_size": 10}, "n_tokens"),
])
def test_bad_arguments_name_the_argument(kwargs, field):
    with pytest.raises(PlanError, match=field):
        auto_chunk_size(**kwargs)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(PlanError, match="jsd"):
        auto_chunk_size(10, 10, loss="mse")
    with pytest.raises(PlanError, match="batch_size"):
        positions_per_chunk(0, 10, 10)
