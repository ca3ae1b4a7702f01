"""Shared fixtures: a tiny BPE tokenizer trained on the shipped held-out text and tiny random
causal LMs of several architectures saved as Hugging Face folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "src" / "scaler_wizard" / "assets" / "demo_data"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (DEMO_DATA / "heldout.jsonl").read_text().splitlines()[:20]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_tiny_config(arch: str, vocab_size: int, max_positions: int = 64):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[arch]
    if arch == "mistral":
        common["sliding_window"] = None
    return cls(**common)


def save_tiny_model(path: Path, arch: str, tokenizer, seed: int = 0, max_positions: int = 64) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_tiny_config(arch, len(tokenizer), max_positions)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    return save_tiny_model(tmp_path / "tiny-llama", "llama", tiny_tokenizer)


def write_recipe(path: Path, model_dir: Path, runs_dir: Path, **overrides) -> Path:
    import yaml

    recipe = {
        "run": {"name": "t", "output_dir": str(runs_dir), "seed": 7},
        "model": {"path": str(model_dir)},
        "data": {"train": [str(DEMO_DATA / "heldout.jsonl")], "eval_fraction": 0.2},
        "context": {"target_length": 256, "method": "yarn", "gate_policy": "continue"},
        "training": {"steps_per_stage": 6, "micro_batch_size": 2, "learning_rate": 0.01, "logging_steps": 1,
                     "warmup_steps": 0, "lr_scheduler": "constant"},
        # Tiny random models retrieve nothing: plumbing tests keep gates and the envelope's
        # evaluation rules out of the way (gate tests set their own thresholds).
        "evaluation": {"passkey": {"trials": 4, "depths": [0.0, 1.0], "min_accuracy": 0.0},
                       "perplexity": {"windows": 2, "max_ratio_to_base": 1000.0},
                       "short_context": {"max_regression_pct": 1000.0}},
        "safety": {"evaluation": {"perplexity_warn_ratio": None, "perplexity_stop_ratio": None,
                                  "short_context_warn_pct": None, "short_context_stop_pct": None}},
    }
    for dotted, value in overrides.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def metric_by_step(run_dir: Path, metric: str = "train/loss") -> dict[int, float]:
    """A metric per global step from a run's metrics.jsonl; a step logged twice (before and after
    a resume) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["metric"] == metric:
            out[e["step"]] = e["value"]
    return out


@pytest.fixture(autouse=True)
def _isolated_user_home(tmp_path_factory, monkeypatch):
    """The local approval key and trusted-approvers file live in a per-test-session folder,
    never in the real home."""
    monkeypatch.setenv("SCALER_WIZARD_HOME", str(tmp_path_factory.getbasetemp() / "sw-home"))
