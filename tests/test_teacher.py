"""Teacher modes: the base teacher (adapters off + original RoPE, no second copy) reproduces a
separately loaded base model exactly; vocabulary checks of the `model` teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scaler_wizard.context.methods import apply_to_model
from scaler_wizard.distill.losses import DistillConfig, distillation_loss
from scaler_wizard.distill.teacher import BaseModelTeacher, ModelTeacher, build_teacher, check_vocabulary
from scaler_wizard.errors import ModelLoadError, PlanError

BASE_LEN = 64


def tiny_config(vocab=64):
    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=BASE_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.2,  # sharp attention: RoPE matters
    )


def token_list(vocab):
    return ["<bos>", "<eos>", "<unk>"] + [f"t{i}" for i in range(3, vocab)]


def save_tiny(folder, vocab=64, seed=0, token_names=None):
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(vocab)).save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = token_names or token_list(vocab)
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def scaled_student(base_folder):
    """PEFT-wrapped student, LoRA B non-zero, trained lm_head copy perturbed, RoPE scaled by YaRN x4."""
    student = AutoModelForCausalLM.from_pretrained(base_folder)
    original_config = copy.deepcopy(student.config)
    peft_model = get_peft_model(
        student, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    apply_to_model(peft_model, "yarn", BASE_LEN, 4 * BASE_LEN, original_config=original_config)
    assert peft_model.get_base_model().config.rope_parameters["rope_type"] == "yarn"
    return peft_model, original_config


def _batch(length=80, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (2, length), generator=g)
    attn = torch.ones(2, length, dtype=torch.long)
    attn[1, 50:] = 0  # right padding on the second row
    return {"input_ids": ids, "attention_mask": attn}


def test_base_teacher_equals_separately_loaded_base_model(base_folder, scaled_student):
    peft_model, original_config = scaled_student
    peft_model.train()
    inputs = _batch()
    reference = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        student_before = peft_model(**inputs).logits

    teacher = BaseModelTeacher(peft_model, original_config)
    batch = teacher(peft_model, inputs)
    tc = batch.signal.hidden.size(1)
    assert tc == BASE_LEN  # trusted prefix only: the original context
    teacher_logits = F.linear(batch.signal.hidden, batch.signal.weight)
    torch.testing.assert_close(teacher_logits, ref_logits[:, :tc], atol=1e-5, rtol=1e-5)
    assert batch.signal.hidden.requires_grad is False

    # the test can fail: the student itself and the adapters-off model with scaled RoPE both differ
    assert (student_before[:, :tc] - ref_logits[:, :tc]).abs().max() > 1e-2
    with torch.no_grad(), peft_model.disable_adapter():
        no_swap = peft_model(**inputs).logits
    assert (no_swap[:, :tc] - ref_logits[:, :tc]).abs().max() > 0.1  # measured: ~5, vs 0.0 with the swap

    # and the student is restored afterwards: scaled RoPE, adapters on, training mode
    assert peft_model.training
    assert peft_model.get_base_model().config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, student_before)

    # mask: position p counts when token p+1 is real
    assert batch.mask.shape == (2, tc)
    assert batch.mask[0].all() and batch.mask[1, :49].all() and not batch.mask[1, 49:].any()


def test_base_teacher_shares_weights_and_survives_a_new_stage(scaled_student):
    peft_model, original_config = scaled_student
    n_before = sum(p.numel() for p in peft_model.parameters())
    teacher = BaseModelTeacher(peft_model, original_config)
    assert sum(p.numel() for p in peft_model.parameters()) == n_before
    assert sum(b.numel() for m in teacher.positions.modules.values() for b in m.buffers()) < 1000  # freqs only
    first = teacher(peft_model, _batch()).signal.hidden
    # the next stage rebuilds the student's rotary modules; the teacher keeps working unchanged
    apply_to_model(peft_model, "yarn", BASE_LEN, 8 * BASE_LEN, original_config=original_config)
    torch.testing.assert_close(teacher(peft_model, _batch()).signal.hidden, first)
    apply_to_model(peft_model, "yarn", BASE_LEN, 4 * BASE_LEN, original_config=original_config)


def test_base_teacher_distillation_gradients_reach_adapters_only(scaled_student):
    peft_model, original_config = scaled_student
    teacher = BaseModelTeacher(peft_model, original_config)
    inputs = _batch(length=40)
    batch = teacher(peft_model, inputs)
    decoder = peft_model.get_base_model().model
    hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    head = peft_model.get_base_model().get_output_embeddings().modules_to_save["default"]
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = distillation_loss(hidden[:, :-1], head.weight, labels[:, 1:], batch, DistillConfig(chunk_size=16))
    out.loss.backward()
    assert out.kd.item() > 0
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(("lora_" in n) or ("modules_to_save" in n) for n in grads)
    peft_model.zero_grad(set_to_none=True)


def test_base_teacher_needs_adapters(base_folder):
    plain = AutoModelForCausalLM.from_pretrained(base_folder)
    with pytest.raises(PlanError, match="adapters"):
        build_teacher("base", plain, original_config=plain.config)


def test_base_teacher_refuses_learned_position_tables():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    peft_model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(PlanError, match="learned position table"):
        BaseModelTeacher(peft_model, copy.deepcopy(gpt2.config))


def test_model_teacher_vocabulary_mismatch_names_both_sizes(tmp_path, base_folder, scaled_student):
    peft_model, _ = scaled_student
    other = save_tiny(tmp_path / "big", vocab=80)
    with pytest.raises(ModelLoadError) as err:
        ModelTeacher.load(other, peft_model)
    assert "80" in str(err.value) and "64" in str(err.value)


def test_model_teacher_tokenizer_map_mismatch(tmp_path, base_folder):
    student = AutoModelForCausalLM.from_pretrained(base_folder)
    s_tok = PreTrainedTokenizerFast.from_pretrained(base_folder)
    shuffled = token_list(64)
    shuffled[10], shuffled[11] = shuffled[11], shuffled[10]
    folder = save_tiny(tmp_path / "shuffled", token_names=shuffled)
    with pytest.raises(ModelLoadError, match="2 token"):
        ModelTeacher.load(folder, student, student_tokenizer=s_tok)
    # same vocabulary: accepted, and it predicts what the loaded model predicts
    same = ModelTeacher.load(base_folder, student, student_tokenizer=s_tok)
    inputs = _batch()
    batch = same(student, inputs)
    with torch.no_grad():
        ref = student(**inputs).logits[:, :BASE_LEN]
    torch.testing.assert_close(F.linear(batch.signal.hidden, batch.signal.weight), ref, atol=1e-5, rtol=1e-5)


def test_check_vocabulary_direct(base_folder):
    a = AutoModelForCausalLM.from_pretrained(base_folder)
    b = LlamaForCausalLM(tiny_config(96))
    with pytest.raises(ModelLoadError, match="96 tokens, the student 64"):
        check_vocabulary(a, b, teacher_source="x")
