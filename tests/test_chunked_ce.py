import pytest
import torch
import torch.nn.functional as F

from scaler_wizard.losses.chunked_ce import chunked_token_ce, task_balanced_mean


def _naive(h, w, y):
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                           reduction="none").view(y.shape)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100, "auto"])
def test_values_and_grads_match_naive(chunk):
    torch.manual_seed(0)
    h = torch.randn(2, 16, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 16))
    y[0, :3] = -100
    ref = _naive(h, w, y)
    ref_loss = task_balanced_mean(ref, y, None)
    gh, gw = torch.autograd.grad(ref_loss, (h, w))
    out = chunked_token_ce(h, w, y, chunk_size=chunk)
    loss = task_balanced_mean(out, y, None)
    ch, cw = torch.autograd.grad(loss, (h, w))
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out[0, :3] == 0).all()
    assert torch.allclose(ch, gh, atol=1e-6) and torch.allclose(cw, gw, atol=1e-6)


def test_task_balanced_mean_weights_tasks_equally():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    labels = torch.tensor([[1, 1, 1, 1], [-100, -100, -100, 1]])
    task = torch.tensor([0, 1])
    assert task_balanced_mean(loss, labels, task).item() == pytest.approx(1.0 + 5.0)
    assert task_balanced_mean(loss, labels, None).item() == pytest.approx((4 + 5) / 5)


def test_bad_chunk_size():
    with pytest.raises(ValueError):
        chunked_token_ce(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)


def test_one_chunk_is_not_recomputed(monkeypatch):
    """When every position fits one chunk (small vocabulary, "auto"), the loss runs without
    activation checkpointing: recomputing the only chunk would just repeat the head matmul."""
    from scaler_wizard.losses import chunked_ce

    calls = []
    monkeypatch.setattr(chunked_ce, "checkpoint", lambda *a, **k: calls.append(1) or chunked_ce._chunk_ce(*a[1:5]))
    h = torch.randn(2, 16, 8, requires_grad=True)
    w = torch.randn(50, 8)
    y = torch.randint(0, 50, (2, 16))
    chunked_token_ce(h, w, y, chunk_size="auto").sum().backward()
    assert calls == []
    chunked_token_ce(h, w, y, chunk_size=4).sum().backward()
    assert len(calls) == 4
