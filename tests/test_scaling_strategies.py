"""ScalerStrategy registry, entry-point discovery, LoRA and LLaMA Pro block expansion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from scaler_wizard.errors import PlanError, PluginError
from scaler_wizard.models import export_merged
from scaler_wizard.scaling import strategies as st
from scaler_wizard.scaling.memory import ModelDims, trainable_params

PLUGINS = Path(__file__).parent / "plugins"


def tiny_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(1))


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _NoTokenizer:
    """export_merged saves the tokenizer beside the weights; these tests have none."""

    def save_pretrained(self, path):
        pass


def export(model, out: Path) -> Path:
    """What the pipeline does for every strategy: merge if adapters, save, reload, compare."""
    check = export_merged(model, _NoTokenizer(), out, ids(16)[0].tolist(), 16, "float32")
    assert check["max_abs_logit_diff"] < 1e-5
    return out


# ------------------------------------------------------------------------------------------
# block expansion
# ------------------------------------------------------------------------------------------


def test_insertion_points_spread_evenly():
    assert st.insertion_points(4, 2) == [1, 3]
    assert st.insertion_points(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert st.insertion_points(3, 3) == [0, 1, 2]
    with pytest.raises(PlanError, match="at most one new block"):
        st.insertion_points(2, 3)
    with pytest.raises(PlanError):
        st.insertion_points(4, 0)


def test_block_expansion_preserves_logits_and_trains_only_new_blocks():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    strat = st.get_strategy("block_expansion")
    model = strat.prepare(model, {"new_blocks": 2})
    assert model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    new = set(model.scaler_wizard_new_blocks)
    assert new == {1, 3}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.layers.3.")) for n in trainable)
    # the planner counts exactly what PyTorch will train
    plan = strat.plan(ModelDims.from_config(tiny_config()), {"new_blocks": 2})
    assert trainable_params(ModelDims.from_config(tiny_config()), plan) == n_trainable(model)


def test_block_expansion_options_norms_and_embeddings():
    model = st.get_strategy("block_expansion").prepare(tiny_model(), {"new_blocks": 1, "train_norms": True,
                                                                      "train_embeddings": True})
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.norm.weight" in names and "model.layers.0.input_layernorm.weight" in names
    assert "model.embed_tokens.weight" in names
    assert not any(n.startswith("model.layers.0.self_attn") for n in names)
    with pytest.raises(PlanError, match="new_blocks"):
        st.get_strategy("block_expansion").plan(ModelDims.from_config(tiny_config()), {"new_blocks": "many"})


def test_block_expansion_trains_then_exports_a_plain_model(tmp_path):
    model = tiny_model()
    strat = st.get_strategy("block_expansion")
    model = strat.prepare(model, {"new_blocks": 2}).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.model.layers[1].mlp.down_proj.weight.abs().sum() > 0  # the new block learned

    out = export(model.eval(), tmp_path / "grown")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert not any("scaler" in k for k in config)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
        # layer_idx renumbered: cached generation of the reloaded model runs and matches
        gen_a = reloaded.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
        gen_b = model.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_a, gen_b)


# ------------------------------------------------------------------------------------------
# lora
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"rank": 4},
    {"rank": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    {"rank": 4, "use_dora": True},
    {"rank": 4, "rank_pattern": {"model.layers.1.mlp.down_proj": 12}},
])
def test_lora_plan_counts_what_peft_trains(options):
    strat = st.get_strategy("lora")
    model = strat.prepare(tiny_model(), options)
    assert model.peft_config["default"].use_rslora == options.get("use_rslora", False)
    assert model.peft_config["default"].use_dora == options.get("use_dora", False)
    dims = ModelDims.from_config(tiny_config())
    assert trainable_params(dims, strat.plan(dims, options)) == model.get_nb_trainable_parameters()[0]


def test_lora_export_is_plain(tmp_path):
    strat = st.get_strategy("lora")
    model = strat.prepare(tiny_model(), {"rank": 4})
    out = export(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())


def test_lora_bad_options_name_the_field():
    with pytest.raises(PlanError, match="rank"):
        st.get_strategy("lora").plan(ModelDims.from_config(tiny_config()), {"rank": 0})
    with pytest.raises(PlanError, match="ranks"):
        st.get_strategy("lora").plan(ModelDims.from_config(tiny_config()), {"ranks": 4})


# ------------------------------------------------------------------------------------------
# full fine-tuning
# ------------------------------------------------------------------------------------------


def test_full_finetune_trains_every_weight_and_the_plan_counts_them(tmp_path):
    strat = st.get_strategy("full")
    model = strat.prepare(tiny_model(), {}).train()
    dims = ModelDims.from_config(tiny_config())
    assert n_trainable(model) == sum(p.numel() for p in model.parameters())
    assert trainable_params(dims, strat.plan(dims, {})) == dims.n_params()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert any("layers.0.self_attn.q_proj" in n for n in changed)
    out = export(model.eval(), tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_full_finetune_has_no_options_and_no_base_teacher():
    from scaler_wizard.recipe import Recipe

    with pytest.raises(PlanError, match="rank"):
        st.get_strategy("full").plan(ModelDims.from_config(tiny_config()), {"rank": 4})
    recipe = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "context": {"target_length": 1024},
              "scaling": {"strategy": "full"}, "distillation": {"enabled": True, "teacher": "base"}}
    with pytest.raises(ValueError, match="teacher_path"):
        Recipe.model_validate(recipe)
    recipe["distillation"] = {"enabled": True, "teacher": "model", "teacher_path": "base_model"}
    assert Recipe.model_validate(recipe).scaling.strategy == "full"


# ------------------------------------------------------------------------------------------
# registry and entry points
# ------------------------------------------------------------------------------------------


class _Good:
    name = "test_good"
    description = "a valid strategy"

    def plan(self, dims, options):
        raise NotImplementedError

    def prepare(self, model, options):
        return model


def test_register_strategy_checks_the_protocol():
    class NoPrepare:  # could be planned, but would train nothing: refused at registration
        name = "no_prepare"
        description = "x"

        def plan(self, dims, options): ...

    with pytest.raises(PluginError, match="missing prepare"):
        st.register_strategy(NoPrepare())
    assert "no_prepare" not in st.available_strategies()
    no_description = _Good()
    no_description.description = None
    with pytest.raises(PluginError, match="description"):
        st.register_strategy(no_description)
    bad_name = _Good()
    bad_name.name = "not an identifier"
    with pytest.raises(PluginError, match="identifier"):
        st.register_strategy(bad_name)
    try:
        good = st.register_strategy(_Good())
        assert isinstance(good, st.ScalerStrategy)
        assert st.get_strategy("test_good") is good
        with pytest.raises(PluginError, match="already registered"):
            st.register_strategy(_Good())
    finally:
        st.unregister_strategy("test_good")
    with pytest.raises(PluginError, match="available: .*block_expansion.*lora"):
        st.get_strategy("test_good")


def test_third_party_strategy_found_through_its_entry_point(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))  # the dist-info folder declares the entry points
    try:
        problems = st.load_plugins(reload=True)
        assert "demo_bias_only" in st.available_strategies()
        # the broken plugin is reported, not raised, and does not hide the good one
        assert len(problems) == 1 and "demo_broken" in problems[0]
        plugin = st.get_strategy("demo_bias_only")
        model = plugin.prepare(tiny_model(), {})
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight"}
        with pytest.raises(PluginError, match="demo_broken"):
            st.get_strategy("missing_one")
    finally:
        st.unregister_strategy("demo_bias_only")
        monkeypatch.undo()
        st.load_plugins(reload=True)
    assert "demo_bias_only" not in st.available_strategies()


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_an_export_that_does_not_reproduce_the_trained_model_is_refused(tmp_path, monkeypatch, save_dtype):
    """The reload check acts: a saved model that computes something else is never published."""
    import transformers

    from scaler_wizard.errors import ExportError

    real = transformers.AutoModelForCausalLM.from_pretrained

    def reload_wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))  # e.g. a head re-tied wrongly
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reload_wrong)
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="differs from the trained model"):
        export_merged(tiny_model(), _NoTokenizer(), out, ids(16)[0].tolist(), 16, save_dtype)
    assert not out.exists() and not (tmp_path / "model.partial").exists()
