"""GGUF in (issue 15, item 4): a tiny Llama written as GGUF the way llama.cpp's converter
writes it (q/k rows permuted, BPE tokenizer in the metadata) loads back through
``scaler_wizard.gguf`` with the original's logits, as a plain model that saves to a standard HF
folder; what transformers cannot load is a ModelLoadError with a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scaler_wizard.errors import ModelLoadError

gguf = pytest.importorskip("gguf", reason="the gguf package (GGUF support's optional dependency) is not installed")

from scaler_wizard.gguf import GGUFInfo, check_gguf, find_gguf, inspect_gguf, load_gguf_model


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer, *, quant: str | None = None, arch: str = "llama") -> Path:
    """Write ``model`` (a transformers Llama) and ``tokenizer`` (byte-level BPE) as GGUF."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)

    def put(name: str, t: torch.Tensor, quantize: bool = True) -> None:
        arr = t.detach().float().numpy()
        if quant and quantize and arr.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_llama(tiny_tokenizer):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_find_gguf(tmp_path):
    assert find_gguf(tmp_path) is None  # empty folder
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    assert find_gguf(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    (tmp_path / "b.GGUF").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        find_gguf(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "c.gguf").write_bytes(b"x")
    assert find_gguf(hf) is None  # a Hugging Face folder stays one
    assert find_gguf(hf / "config.json") is None
    split = tmp_path / "split"
    split.mkdir()
    (split / "m-00001-of-00002.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="split"):
        find_gguf(split / "m-00001-of-00002.gguf")


def test_f32_gguf_loads_with_the_original_logits_and_saves_a_plain_folder(tmp_path, hf_llama, tiny_tokenizer):
    folder = tmp_path / "gguf"
    folder.mkdir()
    write_llama_gguf(folder / "tiny.gguf", hf_llama, tiny_tokenizer)
    info = inspect_gguf(find_gguf(folder))
    assert info.architecture == "llama" and info.tensor_types == {"F32": 9 * 2 + 3}
    model, tok = load_gguf_model(folder, "float32")
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ids = torch.tensor([tiny_tokenizer.encode("The sky is blue. The grass is green.")])
    assert tok.encode("The sky is blue. The grass is green.") == ids[0].tolist()
    torch.testing.assert_close(_logits(model, ids), _logits(hf_llama, ids), rtol=1e-5, atol=1e-5)
    out = tmp_path / "plain"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(again, ids), _logits(hf_llama, ids), rtol=1e-5, atol=1e-5)


def test_quantized_gguf_dequantizes_to_the_requested_dtype(tmp_path, hf_llama, tiny_tokenizer):
    file = write_llama_gguf(tmp_path / "tiny-q8.gguf", hf_llama, tiny_tokenizer, quant="Q8_0")
    assert inspect_gguf(file).tensor_types["Q8_0"] == 7 * 2 + 2
    model, _ = load_gguf_model(file, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tiny_tokenizer.encode("Here we go. There and back again.")])
    got, want = _logits(model, ids).float(), _logits(hf_llama, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # 8-bit weights, bf16 compute
    model.save_pretrained(tmp_path / "out")  # plain folder, no refusal


def test_unsupported_architecture_and_types_are_clear_errors(tmp_path, hf_llama, tiny_tokenizer):
    bad = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(bad), "rwkv7")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'rwkv7'") as info:
        load_gguf_model(bad)
    assert info.value.hint
    with pytest.raises(ModelLoadError, match="Q8_K"):
        check_gguf(GGUFInfo(bad, "llama", None, {"F32": 3, "Q8_K": 2}))
    with pytest.raises(ModelLoadError, match="not a decoder-only"):
        check_gguf(GGUFInfo(bad, "t5", None, {"F32": 3}))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_gguf_model(junk)
    with pytest.raises(ModelLoadError, match="neither"):
        load_gguf_model(tmp_path / "missing")
