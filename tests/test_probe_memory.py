"""Memory-bounded probes: the chunked head gives the full path's figures, through PEFT, tied
embeddings and soft-capped heads; unknown heads fall back with a reason; an out-of-memory
halves the rows and at one row is a typed error naming the length. The 32K-token / 128K-vocab
figures are measured by bench/probe_memory.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scaler_wizard.errors import PlanError
from scaler_wizard.evaluation import probes as probes_mod
from scaler_wizard.evaluation.probes import (
    PasskeyProbe,
    PerplexityProbe,
    ProbeContext,
    ProbeMemoryError,
    ShortContextProbe,
    resolve_head,
    rows_for,
    run_probe,
    self_check,
    token_logprobs,
)
from scaler_wizard.scaling.memory import (
    MemoryRequest,
    ModelDims,
    StrategyPlan,
    estimate_memory,
    probe_batch_for,
    probe_working_bytes,
)


def _llama(vocab=384, tie=False, seed=0, arch="llama", **extra):
    import transformers

    torch.manual_seed(seed)
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "gemma2": transformers.Gemma2Config}[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    if arch == "gemma2":
        cfg.head_dim = 8
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the init's, so differences would show
        model.get_output_embeddings().weight.mul_(20)
    return model.eval()


def _full_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _old_perplexity(model, stream, length, windows, batch):
    """The probe as it was: full [batch, length, vocab] logits and cross-entropy."""
    n = min(windows, (len(stream) - 1) // length)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = [stream[w * length : (w + 1) * length] for w in range(start, min(n, start + batch))]
            ids = torch.tensor(rows)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            tokens += ids[:, 1:].numel()
    return math.exp(nll / tokens)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_chunked_logprobs_equal_the_full_path(arch, tie):
    model = _llama(tie=tie, arch=arch)
    ids = torch.randint(0, 384, (3, 50))
    with torch.no_grad():
        for chunk in (1, 7, 49, 1000):
            scores = token_logprobs(model, ids, chunk=chunk)
            assert scores.head == "chunked"
            torch.testing.assert_close(scores.logprobs, _full_logprobs(model, ids), rtol=1e-5, atol=1e-5)


def test_selected_positions_and_argmax_equal_the_full_path_with_right_padding():
    model = _llama()
    ids = torch.randint(1, 384, (2, 40))
    ids[1, 30:] = 0  # right padding: no mask needed for the positions before it
    select = torch.tensor([[10, 11, 12], [27, 28, 28]])
    with torch.no_grad():
        scores = token_logprobs(model, ids, select=select, want_argmax=True, chunk=2)
        mask = (ids != 0).long()
        mask[0] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    want = logits.gather(1, select[..., None].expand(-1, -1, logits.size(-1)))
    assert scores.argmax.tolist() == want.argmax(-1).tolist()
    lp = want.log_softmax(-1).gather(-1, ids.gather(1, select + 1)[..., None]).squeeze(-1)
    torch.testing.assert_close(scores.logprobs, lp, rtol=1e-5, atol=1e-5)


def test_perplexity_probe_equals_the_unchunked_probe(tiny_tokenizer):
    model = _llama(vocab=len(tiny_tokenizer))
    rng = np.random.default_rng(0)
    stream = rng.integers(0, len(tiny_tokenizer), 64 * 5 + 1).tolist()
    want = _old_perplexity(model, stream, 64, windows=5, batch=2)
    for batch, chunk in ((2, None), (4, 5), (1, 63)):
        ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=stream, base_length=64, batch_size=batch,
                           head_chunk=chunk)
        res = run_probe(PerplexityProbe(windows=5), model, 64, ctx)
        assert res.error is None, res.error
        assert res.metrics["perplexity"] == pytest.approx(want, rel=1e-5)
        assert res.details["head"] == "chunked"
    # a memory-mapped / numpy token stream works the same
    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=np.asarray(stream, dtype=np.int32), base_length=64)
    assert run_probe(PerplexityProbe(windows=5), model, 64, ctx).metrics["perplexity"] == pytest.approx(want, rel=1e-5)
    short = run_probe(ShortContextProbe(windows=5), model, 128, ctx)
    assert short.metrics["perplexity"] == pytest.approx(want, rel=1e-5)


def test_peft_wrapped_model_uses_its_adapters_including_one_on_the_head(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = _llama(vocab=len(tiny_tokenizer))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    peft_model.eval()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 33))
    with torch.no_grad():
        scores = token_logprobs(peft_model, ids, chunk=8)
        with peft_model.disable_adapter():
            without = _full_logprobs(peft_model, ids)
    assert scores.head == "chunked"
    torch.testing.assert_close(scores.logprobs, _full_logprobs(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert (scores.logprobs - without).abs().max() > 1e-2  # the adapters did count
    stream = torch.randint(0, len(tiny_tokenizer), (200,)).tolist()
    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=stream, base_length=32)
    res = run_probe(PerplexityProbe(windows=4), peft_model, 32, ctx)
    assert res.metrics["perplexity"] == pytest.approx(_old_perplexity(peft_model, stream, 32, 4, 4), rel=1e-5)
    assert run_probe(PasskeyProbe(trials=4, depths=[0.0, 1.0]), peft_model, 96, ctx).error is None


def test_soft_capped_head_is_applied_in_the_chunked_path():
    model = _llama(arch="gemma2", final_logit_softcapping=3.0)
    path = resolve_head(model)
    assert path.chunked and path.softcap == 3.0
    ids = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        scores = token_logprobs(model, ids, chunk=6)
    assert scores.head == "chunked"
    torch.testing.assert_close(scores.logprobs, _full_logprobs(model, ids), rtol=1e-5, atol=1e-5)


def test_an_unknown_head_transform_falls_back_to_the_full_path_with_its_reason():
    model = _llama()

    class Scaled(torch.nn.Module):  # a wrapper whose forward changes the logits after the head
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config
            self.base_model_prefix = "model"
            self.model = inner.model

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids, **kw):
            out = self.inner(input_ids=input_ids)
            out.logits = out.logits * 0.3
            return out

    wrapped = Scaled(model).eval()
    ids = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        path = self_check(wrapped, resolve_head(wrapped), ids)
        scores = token_logprobs(wrapped, ids, chunk=6)
    assert not path.chunked and "differs" in path.reason
    assert scores.head.startswith("full (")
    torch.testing.assert_close(scores.logprobs, _full_logprobs(wrapped, ids), rtol=1e-5, atol=1e-5)


def test_passkey_probe_finds_the_key_with_an_oracle_head(tiny_tokenizer):
    """A Llama whose decoder output is the one-hot of the *next* token and whose head is the
    identity: retrieval is perfect, so the chunked selection of answer positions is exact."""
    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=[], base_length=64, batch_size=3)

    class NextTokenDecoder(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kw):
            nxt = torch.roll(input_ids, -1, dims=1)
            hidden = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10
            return type("O", (), {"last_hidden_state": hidden})()

    class Oracle(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self, vocab):
            super().__init__()
            self.model = NextTokenDecoder(vocab)
            self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(torch.eye(vocab))

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, **kw):
            return type("O", (), {"logits": self.lm_head(self.model(input_ids).last_hidden_state)})()

    res = run_probe(PasskeyProbe(trials=6, depths=[0.0, 0.5, 1.0]), Oracle(len(tiny_tokenizer)), 160, ctx)
    assert res.error is None, res.error
    assert res.details["head"] == "chunked"
    assert res.metrics["accuracy"] == 1.0


def test_out_of_memory_halves_the_rows_then_is_a_typed_error(tiny_tokenizer, monkeypatch):
    model = _llama(vocab=len(tiny_tokenizer))
    stream = torch.randint(0, len(tiny_tokenizer), (64 * 4 + 1,)).tolist()
    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=stream, base_length=64, batch_size=4)
    real = probes_mod.token_logprobs
    seen = []

    def only_one_row_fits(model, ids, **kw):
        seen.append(ids.size(0))
        if ids.size(0) > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(model, ids, **kw)

    monkeypatch.setattr(probes_mod, "token_logprobs", only_one_row_fits)
    res = run_probe(PerplexityProbe(windows=4), model, 64, ctx)
    assert res.error is None and seen[:3] == [4, 2, 1]
    assert res.metrics["perplexity"] == pytest.approx(_old_perplexity(model, stream, 64, 4, 4), rel=1e-5)

    def never_fits(model, ids, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(probes_mod, "token_logprobs", never_fits)
    with pytest.raises(ProbeMemoryError) as info:
        run_probe(PerplexityProbe(windows=4), model, 64, ctx)
    err = info.value
    assert isinstance(err, PlanError) and err.exit_code == 2
    assert err.length == 64 and "64 tokens" in str(err) and "probe_batch_size" in str(err)
    # other failures stay error results
    monkeypatch.setattr(probes_mod, "token_logprobs", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    assert run_probe(PerplexityProbe(windows=4), model, 64, ctx).error == "ValueError: boom"


def test_rows_per_forward_come_from_the_memory_budget(tiny_tokenizer):
    model = _llama(vocab=len(tiny_tokenizer))
    dims = ModelDims.from_config(model.config)
    one = probe_working_bytes(dims, 64, 1)
    assert probe_working_bytes(dims, 64, 4) > 3 * one - probe_working_bytes(dims, 1, 1)
    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=[], base_length=64, batch_size=8,
                       memory_budget_bytes=int(2.5 * one))
    assert rows_for(model, 64, ctx) == 2
    ctx.memory_budget_bytes = 1
    assert rows_for(model, 64, ctx) == 1
    ctx.memory_budget_bytes = None  # what the machine has free: plenty for this model
    assert rows_for(model, 64, ctx) == 8
    assert probe_batch_for(dims, 64, 10**12, upper=5) == 5  # never above the cap


def test_planner_counts_the_probes():
    llama3_tiny = ModelDims.from_config({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "vocab_size": 128256})
    req = MemoryRequest(seq_len=32768, dtype="float32", backend="cpu", loss_chunk=512)
    est = estimate_memory(llama3_tiny, StrategyPlan(), req)
    full_logits = 32768 * 128256 * 4
    assert 0 < est.probe < full_logits / 10  # never the [length, vocab] logits
    assert est.total == max(est.step_total, est.probe_total)
    assert est.probe_total == est.weights + est.trainable + est.probe + est.overhead
    assert "probe" in est.breakdown_gb()
    two = estimate_memory(llama3_tiny, StrategyPlan(), MemoryRequest(seq_len=32768, dtype="float32", backend="cpu",
                                                                     probe_batch=2))
    assert two.probe > 1.8 * est.probe - 200 * 2**20
