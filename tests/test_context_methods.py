"""Context methods: registry, and numerics of every RoPE type against independent
implementations of the published formulas, through transformers' own ROPE_INIT_FUNCTIONS and
through the rotary modules our apply_to_model builds."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from scaler_wizard.context import methods as M
from scaler_wizard.errors import PluginError, UnsupportedMethodError

BASE, TARGET, THETA, HEAD_DIM = 64, 256, 10000.0, 16


def tiny_config(**kw):
    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=BASE,
                       rope_parameters={"rope_type": "default", "rope_theta": THETA}, **kw)


def default_inv_freq(base=THETA, dim=HEAD_DIM):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def ref_linear(s):  # PI (Chen et al. 2023): positions / s  <=> frequencies / s
    return default_inv_freq() / s, 1.0


def ref_ntk(s):  # NTK-aware: b' = b * s^(d/(d-2))
    return default_inv_freq(THETA * s ** (HEAD_DIM / (HEAD_DIM - 2))), 1.0


def ref_yarn(s, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023), as in the authors' reference code: correction range in dimension
    index from the rotations beta_fast/beta_slow over the original length, floor/ceil, linear ramp;
    h(theta) = (1-gamma) theta/s + gamma theta; temperature 0.1 ln s + 1."""
    dim = HEAD_DIM

    def corr_dim(rot):
        return dim * math.log(BASE / (rot * 2 * math.pi)) / (2 * math.log(THETA))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    gamma = 1 - ramp  # 1: keep (extrapolate), 0: interpolate
    inv = default_inv_freq()
    return (inv / s) * (1 - gamma) + inv * gamma, 0.1 * math.log(s) + 1.0


def ref_llama3(s, low_ff=1.0, high_ff=4.0):
    inv = default_inv_freq()
    wavelen = 2 * math.pi / inv
    lo_w, hi_w = BASE / low_ff, BASE / high_ff
    out = []
    for f, w in zip(inv.tolist(), wavelen.tolist()):
        if w < hi_w:
            out.append(f)
        elif w > lo_w:
            out.append(f / s)
        else:
            smooth = (BASE / w - low_ff) / (high_ff - low_ff)
            out.append((1 - smooth) * f / s + smooth * f)
    return torch.tensor(out), 1.0


REFS = {"linear": ref_linear, "ntk": ref_ntk, "yarn": ref_yarn, "llama3": ref_llama3}


@pytest.mark.parametrize("name", list(REFS))
def test_rope_numerics_against_published_formulas(name):
    s = TARGET / BASE
    cfg = M.scaled_config(tiny_config(), name, BASE, TARGET)
    params = cfg.rope_parameters
    assert params["rope_theta"] > 0  # always carried
    rope_type = params["rope_type"]
    if rope_type == "default":
        inv = default_inv_freq(params["rope_theta"])
        scale = 1.0
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    ref_inv, ref_scale = REFS[name](s)
    assert torch.allclose(inv.float(), ref_inv, rtol=1e-5), name
    assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "ntk", "dynamic", "yarn", "llama3"])
def test_apply_to_model_rebuilds_rotary_from_original_config(name):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    original = M.scaled_config(model.config, "none", BASE, BASE)
    for length in (128, 256):  # two stages: each scales from the original, never compounds
        M.apply_to_model(model, name, BASE, length, original_config=original)
    rot = model.model.rotary_emb
    cfg = model.config
    if cfg.rope_parameters["rope_type"] == "default":
        expected = default_inv_freq(cfg.rope_parameters["rope_theta"])
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    assert torch.allclose(rot.inv_freq, expected)
    if name in REFS:
        assert torch.allclose(rot.inv_freq, REFS[name](TARGET / BASE)[0], rtol=1e-5)
    if name == "dynamic":
        assert cfg.max_position_embeddings == BASE  # transformers reads it as the original length
    else:
        assert cfg.max_position_embeddings == TARGET
    model(input_ids=torch.randint(0, 64, (1, TARGET)))


def test_dynamic_ntk_changes_only_beyond_original_length():
    cfg = M.scaled_config(tiny_config(), "dynamic", BASE, TARGET)
    inv_short, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=BASE)
    inv_long, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=TARGET)
    assert torch.allclose(inv_short, default_inv_freq())
    # at L' = s*L the dynamic base equals b * s^(d/(d-2)) (factor s): the static NTK value
    s = TARGET / BASE
    base = THETA * ((s * TARGET / BASE) - (s - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    assert torch.allclose(inv_long, default_inv_freq(base), rtol=1e-5)


def test_longrope_consumes_factor_lists():
    short = [1.0] * (HEAD_DIM // 2)
    long = [1.0 + i for i in range(HEAD_DIM // 2)]
    cfg = M.scaled_config(tiny_config(), "longrope", BASE, TARGET, {"short_factor": short, "long_factor": long})
    inv, scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=TARGET)
    assert torch.allclose(inv, default_inv_freq() / torch.tensor(long), rtol=1e-5)
    # attention scaling of LongRoPE (Phi-3): sqrt(1 + ln(s) / ln(L_orig))
    assert scale == pytest.approx(math.sqrt(1 + math.log(TARGET / BASE) / math.log(BASE)), rel=1e-6)
    with pytest.raises(UnsupportedMethodError, match="short_factor"):
        M.scaled_config(tiny_config(), "longrope", BASE, TARGET, {})
    with pytest.raises(UnsupportedMethodError, match="head_dim/2"):
        M.scaled_config(tiny_config(), "longrope", BASE, TARGET, {"short_factor": [1.0], "long_factor": [1.0]})


def test_unknown_parameter_and_method():
    with pytest.raises(UnsupportedMethodError, match="Unknown parameter"):
        M.scaled_config(tiny_config(), "yarn", BASE, TARGET, {"beta_fats": 32})
    with pytest.raises(UnsupportedMethodError, match="available: .*linear.*yarn"):
        M.get_context_method("nope")


def test_learned_table_gpt2_runs_at_new_length():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    old = model.transformer.wpe.weight.detach().clone()
    with pytest.raises(UnsupportedMethodError, match="learned_table"):
        M.get_context_method("yarn", model.config)
    M.apply_to_model(model, "learned_table", 32, 128)
    new = model.transformer.wpe.weight
    assert new.shape == (128, 32) and model.config.n_positions == 128
    assert torch.allclose(new[0], old[0]) and torch.allclose(new[-1], old[-1])
    model(input_ids=torch.randint(0, 64, (1, 128)))

    model2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    old2 = model2.transformer.wpe.weight.detach().clone()
    M.apply_to_model(model2, "learned_table", 32, 96, {"mode": "linear_extrapolation", "tail": 8})
    assert torch.allclose(model2.transformer.wpe.weight[:32], old2)
    model2(input_ids=torch.randint(0, 64, (1, 96)))


def test_alibi_bloom_runs_at_new_length():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    assert M.position_encoding(model.config) == "alibi"
    assert "alibi" in M.available_methods("alibi")
    M.apply_to_model(model, "alibi", 64, 256)
    out = model(input_ids=torch.randint(0, 64, (1, 256)))
    assert torch.isfinite(out.logits).all()


def test_registry_plugin_checks():
    class Good:
        name = "my_method"
        encodings = frozenset({"rope"})

        def validate_params(self, params):
            return params

        def update_config(self, config, base_length, target_length, params):
            config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": THETA}

    M.register_context_method(Good())
    try:
        assert "my_method" in M.available_methods("rope")
        with pytest.raises(PluginError, match="already registered"):
            M.register_context_method(Good())
    finally:
        M.unregister_context_method("my_method")

    class NoName:
        encodings = frozenset({"rope"})

    with pytest.raises(PluginError, match="lacks"):
        M.register_context_method(NoName())

    class BadEnc(Good):
        name = "bad_enc"
        encodings = frozenset({"sinusoid"})

    with pytest.raises(PluginError, match="unknown encodings"):
        M.register_context_method(BadEnc())


def test_entry_point_plugin_is_discovered_and_broken_one_skipped(monkeypatch):
    from importlib import metadata

    class EP:
        def __init__(self, name, obj):
            self.name, self._obj = name, obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    class Plugin:
        name = "ep_method"
        encodings = frozenset({"rope"})

        def validate_params(self, params):
            return params

        def update_config(self, config, base_length, target_length, params):
            pass

    def fake_entry_points(group=None):
        assert group == M.ENTRY_POINT_GROUP
        return [EP("ep_method", Plugin), EP("broken", ImportError("no module named x"))]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    try:
        with pytest.warns(UserWarning, match="broken"):
            problems = M.load_plugins(reload=True)
        assert len(problems) == 1 and "no module named x" in problems[0]
        names = M.available_methods()
        assert "ep_method" in names and "yarn" in names
        with pytest.raises(UnsupportedMethodError, match="Plugins that failed to load: broken"):
            M.get_context_method("missing_one")
    finally:
        M.unregister_context_method("ep_method")
        monkeypatch.undo()
        M.load_plugins(reload=True)
