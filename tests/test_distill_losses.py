"""Distillation losses against a straightforward full-logits reference (values and gradients),
chunking invariance, temperature, the lambda mix and the top-k (offline) variant."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler_wizard.distill.losses import (
    DistillConfig,
    TeacherBatch,
    TeacherHidden,
    TeacherTopK,
    chunked_distill_token_losses,
    distillation_loss,
)
from scaler_wizard.errors import RecipeError

B, T, H, V = 2, 7, 8, 11


def _inputs(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    t_hidden = torch.randn(B, T, H, generator=g)
    t_weight = torch.randn(V, H, generator=g) * 0.7
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        labels[0, 2] = -100
        labels[1, -1] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    return hidden, weight, t_hidden, t_weight, labels, mask


# ---- the reference: written out from the definitions, float64, full logits -------------------


def ref_divergence(s_logits, t_logits, divergence, beta, temp):
    q = torch.softmax(s_logits.double() / temp, -1)
    p = torch.softmax(t_logits.double() / temp, -1)
    if divergence == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if divergence == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


def ref_loss(hidden, weight, labels, t_hidden, t_weight, mask, divergence, beta, temp, lam):
    s_logits = hidden.double() @ weight.double().T
    t_logits = (t_hidden.double() @ t_weight.double().T).detach()
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(s_logits[valid], labels[valid])
    n = t_hidden.size(1)
    kd_tok = ref_divergence(s_logits[:, :n], t_logits, divergence, beta, temp)
    kd = kd_tok[mask].sum() / mask.sum()
    return (1 - lam) * ce + lam * temp**2 * kd, ce, kd


def _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg):
    teacher = TeacherBatch(TeacherHidden(t_hidden, t_weight), mask)
    return distillation_loss(hidden, weight, labels, teacher, cfg)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize(
    "divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9)]
)
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_values_and_gradients_match_reference(divergence, beta, temp):
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    cfg = DistillConfig(divergence=divergence, beta=beta, temperature=temp, kd_weight=0.4, chunk_size=3)
    out = _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg)
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref, ref_ce, ref_kd = ref_loss(h64, w64, labels, t_hidden, t_weight, mask, divergence, beta, temp, 0.4)
    assert out.kd.item() > 1e-3  # the teacher differs from the student: KD is not trivially 0
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ce.double(), ref_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.kd.double(), ref_kd, atol=1e-5, rtol=1e-5)
    g_ours = _grads(out.loss, hidden, weight)
    g_ref = _grads(ref, h64, w64)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_jsd_end_points_are_forward_and_reverse_kl():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(1)
    def kd(divergence, beta):
        cfg = DistillConfig(divergence=divergence, beta=beta, kd_weight=1.0)
        return _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg).kd
    torch.testing.assert_close(kd("jsd", 0.0), kd("forward_kl", 0.5))
    torch.testing.assert_close(kd("jsd", 1.0), kd("reverse_kl", 0.5))
    assert not torch.allclose(kd("forward_kl", 0.5), kd("reverse_kl", 0.5))


def test_jsd_half_is_symmetric_and_bounded():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(2)
    cfg = DistillConfig(divergence="jsd", beta=0.5, kd_weight=1.0)
    a = _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg).kd
    b = _ours(t_hidden, t_weight, labels, hidden, weight, mask, cfg).kd  # teacher and student swapped
    torch.testing.assert_close(a, b)
    assert 0 < a.item() <= math.log(2)


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=T + 3), divergence=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
def test_chunking_invariance(chunk, divergence):
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(3)
    results = []
    for size in (chunk, T):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        cfg = DistillConfig(divergence=divergence, beta=0.4, temperature=1.7, chunk_size=size)
        out = _ours(h, w, labels, t_hidden, t_weight, mask, cfg)
        results.append((out.loss.detach(), *_grads(out.loss, h, w)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_temperature_changes_kd_and_follows_reference():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(4)
    kds = []
    for temp in (0.5, 1.0, 4.0):
        cfg = DistillConfig(temperature=temp, kd_weight=1.0)
        out = _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg)
        _, _, ref_kd = ref_loss(hidden, weight, labels, t_hidden, t_weight, mask, "forward_kl", 0.5, temp, 1.0)
        torch.testing.assert_close(out.kd.double(), ref_kd, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, temp**2 * out.kd)  # lambda = 1: T^2 * KD
        kds.append(out.kd.item())
    assert kds[0] > kds[1] > kds[2]  # softer targets: smaller divergence


def test_lambda_mix():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(5)
    outs = {lam: _ours(hidden, weight, labels, t_hidden, t_weight, mask,
                       DistillConfig(kd_weight=lam, temperature=2.0)) for lam in (0.0, 0.25, 1.0)}
    ce, kd = outs[0.0].ce, outs[0.0].kd
    torch.testing.assert_close(outs[0.0].loss, ce)
    torch.testing.assert_close(outs[1.0].loss, 4.0 * kd)
    torch.testing.assert_close(outs[0.25].loss, 0.75 * ce + 0.25 * 4.0 * kd)
    # and CE is the plain token mean cross-entropy
    valid = labels != -100
    ref_ce = torch.nn.functional.cross_entropy((hidden @ weight.T)[valid], labels[valid])
    torch.testing.assert_close(ce, ref_ce)


def test_teacher_prefix_and_mask():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(6)
    prefix = 4
    cfg = DistillConfig(kd_weight=1.0, chunk_size=3)
    teacher = TeacherBatch(TeacherHidden(t_hidden[:, :prefix], t_weight), mask[:, :prefix])
    ce_tok, kd_tok = chunked_distill_token_losses(hidden, weight, labels, teacher, cfg)
    assert ce_tok.shape == kd_tok.shape == (B, T)
    assert torch.all(kd_tok[:, prefix:] == 0)
    ref = ref_divergence(hidden @ weight.T, t_hidden @ t_weight.T, "forward_kl", 0.5, 1.0)[:, :prefix]
    ref = torch.where(mask[:, :prefix], ref, torch.zeros_like(ref))
    torch.testing.assert_close(kd_tok[:, :prefix].double(), ref, atol=1e-6, rtol=1e-5)
    # a teacher longer than the student positions is cut
    long_teacher = TeacherBatch(TeacherHidden(torch.cat([t_hidden, t_hidden], 1), t_weight),
                                torch.cat([mask, mask], 1))
    out_long = distillation_loss(hidden, weight, labels, long_teacher, cfg)
    out = distillation_loss(hidden, weight, labels, TeacherBatch(TeacherHidden(t_hidden, t_weight), mask), cfg)
    torch.testing.assert_close(out_long.loss, out.loss)
    assert out.kd_tokens == int(mask.sum())


def test_no_teacher_positions_gives_ce_only():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(7)
    cfg = DistillConfig(kd_weight=0.5)
    none = distillation_loss(hidden, weight, labels, None, cfg)
    empty = _ours(hidden, weight, labels, t_hidden, t_weight, torch.zeros_like(mask), cfg)
    for out in (none, empty):
        assert out.kd_tokens == 0 and out.kd.item() == 0.0
        torch.testing.assert_close(out.loss, out.ce)


def test_teacher_sharing_the_student_head_gets_no_gradient_path():
    """Base mode: the teacher's projection is the student's own head tensor; KD must treat the
    teacher's logits as constants."""
    hidden, weight, t_hidden, _, labels, mask = _inputs(8)
    w = weight.clone().requires_grad_(True)
    cfg = DistillConfig(divergence="reverse_kl", kd_weight=0.7, temperature=1.5, chunk_size=2)
    out = _ours(hidden, w, labels, t_hidden, w, mask, cfg)
    (g,) = _grads(out.loss, w)
    w64 = weight.double().requires_grad_(True)
    ref, _, _ = ref_loss(hidden, w64, labels, t_hidden, weight, mask, "reverse_kl", 0.5, 1.5, 0.7)
    (g_ref,) = _grads(ref, w64)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)


def _topk(t_logits, k, cache_temp):
    lp = torch.log_softmax(t_logits / cache_temp, -1)
    vals, ids = lp.topk(k, -1)
    return TeacherTopK(ids, vals, temperature=cache_temp)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_full_support_equals_full_teacher_even_after_retempering(divergence):
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(9)
    t_logits = t_hidden @ t_weight.T
    cfg = DistillConfig(divergence=divergence, beta=0.3, temperature=2.0, kd_weight=0.6, chunk_size=4)
    full = _ours(hidden, weight, labels, t_hidden, t_weight, mask, cfg)
    topk = distillation_loss(hidden, weight, labels, TeacherBatch(_topk(t_logits, V, 0.7), mask), cfg)
    torch.testing.assert_close(topk.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_topk_restricted_support_matches_renormalised_reference():
    hidden, weight, t_hidden, t_weight, labels, mask = _inputs(10)
    hidden.requires_grad_(True)
    k = 4
    t_logits = t_hidden @ t_weight.T
    cfg = DistillConfig(divergence="forward_kl", temperature=1.0, kd_weight=1.0, chunk_size=5)
    sig = _topk(t_logits, k, 1.0)
    out = distillation_loss(hidden, weight, labels, TeacherBatch(sig, mask), cfg)
    # reference: both distributions renormalised over the teacher's top-k tokens
    s_k = (hidden.double() @ weight.double().T).gather(-1, sig.token_ids)
    t_k = t_logits.double().gather(-1, sig.token_ids)
    ref_tok = ref_divergence(s_k, t_k, "forward_kl", 0.5, 1.0)
    ref = ref_tok[mask].sum() / mask.sum()
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = _grads(out.loss, hidden)
    (g_ref,) = _grads(ref, hidden)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_config_reports_every_problem():
    with pytest.raises(RecipeError) as err:
        DistillConfig(divergence="kl", beta=2.0, temperature=0.0, kd_weight=-1, chunk_size=0)
    fields = [p for p, _ in err.value.problems]
    assert fields == ["distillation.divergence", "distillation.beta", "distillation.temperature",
                      "distillation.kd_weight", "distillation.chunk_size"]
