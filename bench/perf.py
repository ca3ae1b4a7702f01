"""Speed, memory and MFU of our training step against the strongest stock baselines, run side by
side through ``bench/harness.py``.

**Statistics** (every A/B figure): the sides run interleaved (A B, B A, ... the order shuffled
each round), one warm-up round discarded, ``--repeats`` (default 5) rounds kept; a figure is the
median ratio with its 95% bootstrap interval (rounds resampled together), and a target is
``met`` only when the whole interval clears it (``missed``: the whole interval on the wrong side;
``not resolved``: it straddles the target). Thread count and load average (``os.getloadavg``)
are recorded beside every section. Each run trains a fresh model for one pass over its data and
is timed from the start of its first step to the end of its last (the warm-up round absorbs the
process-level warm-up: allocator, kernel selection, page cache).

1. **Tokens/s of a LoRA training step** (demo model config, PEFT LoRA r=8 on q/k/v/o, fp32, sdpa).
   * fixed-length rows: stock ``transformers.Trainer`` (model's own loss) vs ``ScalingTrainer``
     (chunked, task-balanced loss; chunk from ``chunk_policy.positions_per_chunk``). Target >= 1.0.
   * variable-length documents (``seq/8 .. seq`` tokens, the same documents for every side, one
     pass over them), real (non-padding) tokens/s. Two stock baselines, the faster one is "the
     strongest":
       - ``stock_grouped``: ``Trainer`` with ``train_sampling_strategy="group_by_length"`` (the
         ``group_by_length=True`` of transformers < 5) and pad-to-longest batches
         (``DataCollatorWithPadding``'s behaviour);
       - ``stock_flattening``: ``DataCollatorWithFlattening`` (the batch's documents in one row,
         ``position_ids`` restarting per document). On CPU the only attention implementations
         that honour it are ``sdpa`` and ``eager``, through a dense block-diagonal mask that
         ``masking_utils`` derives from the position ids (``flash_attention_2`` is CUDA-only,
         ``flex_attention`` has no backward on CPU in torch 2.13). ``model.config.use_cache`` is
         set to False: with the default (True) transformers 5.24 builds a KV cache in the training
         forward, skips the packed-sequence detection and lets documents attend to each other.
     Ours: ``ScalingTrainer`` on rows packed by ``scaler_wizard.packing`` (restarting position
     ids), two attention paths, the faster one is "ours":
       - ``ours_sdpa_mask``: sdpa with the block-diagonal mask transformers builds (the pipeline's
         path today);
       - ``ours_document_attention``: ``packing.enable_document_attention``, causal sdpa on each
         document alone (no mask, ``sum(len**2)/2`` attention work instead of ``T**2``).
     Target: ours / strongest stock >= 1.3.
2. **Peak RSS of one LoRA step at long context with a large vocabulary** (2-layer, 256-wide
   Llama, vocabulary 128,256): ``Trainer`` with the stock loss (full logits) vs ``ScalingTrainer``
   (chunked loss), each in a fresh subprocess. ``peak_rss_mb`` is the training's peak (weights
   resident plus the step): the child resets the kernel's high-water mark after building the
   trainer (``/proc/self/clear_refs``), so the random initialisation's transient copies do not
   count; ``process_peak_rss_mb`` is the whole process's, and the parent samples the child's RSS
   with psutil every 50 ms as a check. Target ratio <= 0.25. No warm-up round: each sample is a
   fresh process.
3. **Distillation**: our ``base`` teacher (``BaseModelTeacher``: the student's own weights with
   the adapters disabled, no second copy) with the chunked generalised-JSD loss vs TRL's
   ``GKDTrainer`` with a separately built teacher (a second copy of the base weights), both
   off-policy (``lmbda=0``), JSD beta 0.5, temperature 1, loss = KD only, gradient checkpointing
   off on both sides (TRL's configs default it to on; earlier figures had GKD recomputing its
   activations while ours did not). Tokens/s on the demo
   config (target >= 1.0); peak RSS of one step at the large vocabulary (target <= 0.6). Skipped
   with a note when ``trl`` is not installed (``pip install -e .[bench]``).
4. **MFU** (PaLM, Chowdhery et al. 2022, appendix B): achieved model FLOP/s / peak FLOP/s.
   PaLM's model FLOPs per token are ``6N + 12*L*H*Q*T`` (N = parameters doing matmuls: the
   input-embedding lookup is not one, a tied output head is; L layers, H heads, Q head dim,
   T sequence length; attention counted over the full T; recomputation never counted). ``6N``
   is forward 2N + backward 4N, and the backward's 4N is 2N for the activation gradients plus
   2N for the weight gradients. **Convention here for a LoRA step** (``mfu``): frozen weights
   still need the activation-gradient half of the backward but no weight gradients, so the
   model FLOPs are ``4*N_frozen + 6*N_lora + 12*L*H*Q*T`` (the attention has no weights: all of
   its backward is activation gradients). ``mfu_palm_6n`` applies PaLM's formula unchanged (as
   if every weight were trained); for a LoRA step it counts work that is never done, so it is
   not bounded by 1 and is given for comparison only. **Peak**: the best measured dense fp32
   matmul rate at the same thread count, over several square and model-shaped sizes, best of
   a few repeats each (every size's figure is in the JSON), not a datasheet number.
   Reported for the demo config (from section 1's fixed-row runs of ours) and a ~100M config.
5. **Llama-3.2-1B-shaped memory** (opt-in section ``llama1b``, not in the default set): hidden
   2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary 128,256, tied
   embeddings, random weights, fp32 (what CPU users run; ``--llama1b-dtype bfloat16`` for the
   other), LoRA, batch 1, gradient checkpointing, ``--llama1b-seq`` tokens (default 4096):
   stock ``Trainer`` + PEFT vs ``ScalingTrainer``, ``--llama1b-steps`` steps each in a fresh
   subprocess, peak RSS as in point 2 (the training's, the whole process's, psutil sampling). Before running, the stock side's
   peak is estimated; when it would not fit the available memory the length is halved until it
   does, and the JSON says so. One run per side (peak RSS barely varies; minutes per step).

    python bench/perf.py --quick                 # smoke mode, every default section, ~2-3 minutes
    python bench/perf.py                         # full mode (~20 min on 2 cores at 1 thread; ~30 with trl)
    python bench/perf.py --sections throughput --seq 1024   # the variable-length figure at the demo target
    python bench/perf.py --sections throughput   # a subset (results/perf_partial.json)
    python bench/perf.py --sections llama1b      # the 1B-shaped memory comparison (results/perf_llama1b.json)

Prints one JSON line and writes bench/results/perf.json (perf_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PAD = 0  # documents are drawn from token ids 1..V-1, so id 0 marks padding unambiguously
DEMO_TOKENIZER = ROOT / "src" / "scaler_wizard" / "assets" / "demo_model"


def _load_harness():
    """bench/harness.py by path: this script takes its own folder off sys.path (see __main__)."""
    spec = importlib.util.spec_from_file_location("sw_bench_harness", Path(__file__).resolve().parent / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


H = _load_harness()

# the demo model of scripts/build_demo_model.py
DEMO = {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 4096}
# ~96M parameters
M100 = {"layers": 10, "hidden": 768, "heads": 12, "kv_heads": 12, "inter": 2048, "vocab": 16384}
LONG_VOCAB = {"layers": 2, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 128256}
# Llama-3.2-1B's shape (config.json of meta-llama/Llama-3.2-1B), random weights
LLAMA_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "inter": 8192, "vocab": 128256, "tied": True}
# the smoke-size stand-in for it (same code path, seconds)
LLAMA_1B_QUICK = {"layers": 2, "hidden": 256, "heads": 8, "kv_heads": 2, "inter": 1024, "vocab": 32768, "tied": True}

MODES = {
    # quick is a smoke run: 2 kept rounds (+1 warm-up) and tiny sizes; its ratios are noise
    "quick": {"seq": 128, "batch": 2, "fixed_steps": 2, "docs": 8, "repeats": 2, "warmup": 1,
              "mem_repeats": 1, "mem_vocab": 32768, "mem_seq": 1024, "distill_mem_seq": 128,
              "matmul_sizes": [256, 512], "matmul_reps": 3, "m100": None,
              "llama1b": {"spec": LLAMA_1B_QUICK, "seq": 512, "steps": 1}},
    # full: fixed rows 4 steps of 4 x 512 tokens; 64 documents of 64..512 tokens (16 stock batches);
    # memory at 4096 tokens; the ~100M config 4 steps of one 512-token row, 3 runs
    "full": {"seq": 512, "batch": 4, "fixed_steps": 4, "docs": 64, "repeats": 5, "warmup": 1,
             "mem_repeats": 5, "mem_vocab": 128256, "mem_seq": 4096, "distill_mem_seq": 1024,
             "matmul_sizes": [512, 1024, 2048, 3072], "matmul_reps": 4,
             "m100": {"seq": 512, "batch": 1, "steps": 4, "repeats": 3},
             "llama1b": {"spec": LLAMA_1B, "seq": 4096, "steps": 1}},
}
SECTIONS = ("throughput", "memory", "distill", "mfu")
OPT_IN_SECTIONS = ("llama1b",)
# name: (numerator side, denominator side, target, higher_is_better)
TARGETS = {"fixed_ratio": 1.0, "variable_ratio": 1.3, "memory_ratio": 0.25, "distill_memory_ratio": 0.6,
           "distill_tokens_ratio": 1.0}
# the distillation objective of both sides (see the module docstring, point 3)
DISTILL = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def load_gkd():
    """(GKDTrainer, GKDConfig): in ``trl.experimental.gkd`` since TRL moved GKD there, ``trl`` before."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDTrainer, GKDConfig


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- models and data


def llama_config(spec: dict, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(seq, 64), bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
        tie_word_embeddings=spec.get("tied", False),
        # no KV cache in a training forward (see the module docstring, point 1: stock_flattening)
        use_cache=False,
    )


def build_base_model(spec: dict, seq: int, seed: int = 0, dtype=None):
    """A randomly initialised Llama of the given shape; the same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(spec, seq))
    return model if dtype is None else model.to(dtype)


def build_lora_model(spec: dict, seq: int, seed: int = 0, dtype=None):
    """The base model of ``seed`` wrapped in PEFT LoRA (r=8 on q/k/v/o)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(build_base_model(spec, seq, seed, dtype), lora)


def fixed_rows(n: int, seq: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(seq)] for _ in range(n)]


def variable_docs(n: int, seq: int, vocab: int, seed: int) -> list[list[int]]:
    """Documents of uniformly random length in [seq/8, seq]."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(max(2, seq // 8), seq))] for _ in range(n)]


class CountingCollator:
    """Wraps a collator and records the real (non-padding) tokens of every batch, in order."""

    def __init__(self, collate):
        self.collate = collate
        self.real_tokens: list[int] = []

    def __call__(self, items):
        batch = self.collate(items)
        self.real_tokens.append(int((batch["input_ids"] != PAD).sum()))
        return batch


def stock_padding_collate(docs_batch):
    """What a stock user gets from ``DataCollatorWithPadding`` + labels: pad to the longest."""
    import torch

    ids = [d["input_ids"] for d in docs_batch]
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), PAD, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    for k, x in enumerate(ids):
        input_ids[k, : len(x)] = torch.tensor(x)
        attention[k, : len(x)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def flattening_collate():
    """transformers' padding-free collator: the batch in one row, position ids restarting per
    document, label -100 at each document's first token."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)


def tensor_collate(items):
    import torch

    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def chunk_for(batch: int, seq: int, vocab: int, loss: str = "ce") -> int:
    """Our loss's ``chunk_size`` (sequence positions per chunk) for a batch of ``batch x seq`` rows:
    the targets are the ``seq - 1`` shifted positions."""
    from scaler_wizard.losses.chunk_policy import positions_per_chunk

    return positions_per_chunk(batch, max(1, seq - 1), vocab, loss=loss)


# ----------------------------------------------------------------------------- training runs


class StepTimer:
    """Trainer callback timing the steps from index ``warmup`` on: ``t0`` (start of the first
    timed step), ``t1`` (end of the last step) and every step's end."""

    def __init__(self, warmup: int = 0):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.warmup:
                    outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.t1 = time.perf_counter()
                outer.ends.append(outer.t1)

        self.warmup = warmup
        self.t0 = self.t1 = 0.0
        self.ends: list[float] = []
        self.callback = _CB()


def _training_args(kind: str, workdir: Path, run: dict):
    common = {
        "output_dir": str(workdir / kind), "max_steps": run["steps"], "per_device_train_batch_size": run["batch"],
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "save_strategy": "no", "report_to": [],
        "disable_tqdm": True, "logging_steps": 10_000, "remove_unused_columns": False, "dataloader_num_workers": 0,
        "use_cpu": True, "seed": 0, "data_seed": 0,
        "train_sampling_strategy": run.get("sampling", "random"),
    }
    # Set explicitly on every side: TRL's configs (GKDConfig) default gradient checkpointing to True,
    # the stock Trainer and ours to False; both sides of a comparison must match.
    from transformers import TrainingArguments

    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    common[ckpt] = bool(run.get("grad_ckpt"))
    if run.get("grad_ckpt"):
        common[f"{ckpt}_kwargs"] = {"use_reentrant": False}
    if kind == "gkd":
        GKDConfig = load_gkd()[1]
        # lmbda=0: never generate (off-policy), seq_kd off: KD on the given sequences, like ours
        return GKDConfig(**common, lmbda=0.0, seq_kd=False, beta=DISTILL["beta"],
                         temperature=DISTILL["temperature"], bf16=False)
    return TrainingArguments(**common)


def make_trainer(kind: str, spec: dict, dataset, collate, run: dict, workdir: Path, callbacks=()):
    """A trainer of ``kind`` on a fresh LoRA model of ``spec``:

    ``baseline``   stock ``transformers.Trainer``, the model's own loss (full logits);
    ``ours``       ``ScalingTrainer``, chunked CE with the chunk size of ``chunk_policy``;
    ``ours_distill`` ``ScalingTrainer`` + ``BaseModelTeacher`` (adapters disabled), chunked JSD;
    ``gkd``        TRL's ``GKDTrainer`` with a separately built teacher (a second copy of the base).

    ``run["attention"] == "document"`` switches the model to ``packing.enable_document_attention``;
    ``run["dtype"]`` (a torch dtype) casts the model. Returns ``(trainer, info)``; ``info`` names
    the chunk size our side picked.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from scaler_wizard.training.stage_trainer import ScalingTrainer

    model = build_lora_model(spec, run["seq"], dtype=run.get("dtype"))
    if run.get("attention") == "document":
        from scaler_wizard.packing import enable_document_attention

        enable_document_attention(model)
    args = _training_args(kind, workdir, run)
    common = {"model": model, "args": args, "train_dataset": dataset, "data_collator": collate,
              "callbacks": list(callbacks)}
    info: dict = {}
    if kind == "baseline":
        trainer = Trainer(**common)
    elif kind == "ours":
        chunk = chunk_for(run["batch"], run["seq"], spec["vocab"])
        info = {"loss_chunk_size": chunk, "chunks_per_batch": -(-(run["seq"] - 1) // chunk)}
        trainer = ScalingTrainer(**common, loss_chunk_size=chunk)
    elif kind == "ours_distill":
        from scaler_wizard.distill.losses import DistillConfig
        from scaler_wizard.distill.teacher import BaseModelTeacher

        chunk = chunk_for(run["batch"], run["seq"], spec["vocab"], loss=DISTILL["divergence"])
        info = {"distill_chunk_size": chunk, "chunks_per_batch": -(-(run["seq"] - 1) // chunk)}
        teacher = BaseModelTeacher(model, copy.deepcopy(model.get_base_model().config))
        distill = DistillConfig(kd_weight=1.0, chunk_size=chunk, **DISTILL)
        trainer = ScalingTrainer(**common, teacher=teacher, distill=distill, loss_chunk_size=chunk)
    elif kind == "gkd":
        from transformers import PreTrainedTokenizerFast

        GKDTrainer = load_gkd()[0]
        teacher = build_base_model(spec, run["seq"])  # the same seed: the student's base weights, a 2nd copy
        teacher.requires_grad_(False)
        # GKD reads only the pad id from the tokenizer when it never generates
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(DEMO_TOKENIZER))
        trainer = GKDTrainer(**common, teacher_model=teacher, processing_class=tokenizer)
    else:
        raise ValueError(f"unknown trainer kind {kind!r}")
    trainer.remove_callback(PrinterCallback)
    return trainer, info


def timed_train(kind: str, spec: dict, dataset, collate, run: dict, workdir: Path) -> dict:
    """Train ``run['steps']`` steps with a trainer of ``kind`` on a fresh model; real tokens/s from
    the start of the first step to the end of the last."""
    counter = CountingCollator(collate)
    timer = StepTimer(0)
    trainer, info = make_trainer(kind, spec, dataset, counter, run, workdir, callbacks=[timer.callback])
    trainer.train()
    tokens = counter.real_tokens[: run["steps"]]
    seconds = timer.t1 - timer.t0
    return {"tokens_per_s": sum(tokens) / seconds, "steps": len(tokens), "seconds": round(seconds, 3),
            "real_tokens": sum(tokens), "loss": float(trainer.state.log_history[-1].get("train_loss", math.nan))
            if trainer.state.log_history else math.nan, **info}


def interleaved_sides(sides: dict[str, dict], spec: dict, repeats: int, warmup: int, workdir: Path) -> dict:
    """Run every side through ``harness.interleaved`` (warm-up rounds discarded). ``sides`` maps a
    name to ``{"kind", "dataset", "collate", "run"}``. Returns per side the kept runs' tokens/s,
    their median, and the facts of one run (steps, real tokens, chunk size)."""
    records: dict[str, list[dict]] = {name: [] for name in sides}
    counter = iter(range(10**9))

    def runner(name: str):
        side = sides[name]

        def call() -> float:
            res = timed_train(side["kind"], spec, side["dataset"], side["collate"], side["run"],
                              workdir / f"{name}-{next(counter)}")
            records[name].append(res)
            return res["tokens_per_s"]

        return call

    t0 = time.perf_counter()
    load_before = load_now()
    samples = H.interleaved({name: runner(name) for name in sides}, repeats=repeats, warmup=warmup)
    out: dict = {"repeats": repeats, "warmup_rounds": warmup, "load_before": load_before, "load_after": load_now(),
                 "wall_s": round(time.perf_counter() - t0, 1)}
    for name, values in samples.items():
        kept = records[name][warmup:]
        first = kept[0]
        out[name] = {"tokens_per_s_median": round(statistics.median(values), 2),
                     "tokens_per_s": [round(v, 2) for v in values],
                     "steps": first["steps"], "real_tokens": first["real_tokens"],
                     "seconds": [r["seconds"] for r in kept],
                     **{k: v for k, v in first.items() if k in ("loss_chunk_size", "chunks_per_batch",
                                                              "distill_chunk_size")},
                     "attention": sides[name]["run"].get("attention", "sdpa"),
                     "sampling": sides[name]["run"].get("sampling", "random")}
        if any(r["real_tokens"] != first["real_tokens"] for r in kept):
            raise RuntimeError(f"side {name!r} trained on different tokens in its repeats")
    out["_samples"] = samples
    return out


def compare(part: dict, numerator: str, denominator: str, target: float | None, higher_is_better: bool = True,
            key: str = "_samples") -> dict:
    summary = H.ratio_summary(part[key][numerator], part[key][denominator], target=target,
                              higher_is_better=higher_is_better)
    return {"of": numerator, "over": denominator, **summary, "shown": H.fmt(summary)}


# ----------------------------------------------------------------------------- 1. throughput


def bench_throughput(mode: dict, spec: dict, workdir: Path) -> dict:
    from scaler_wizard.packing import MaskMode, pack_documents, padding_waste

    seq, batch = mode["seq"], mode["batch"]
    out: dict = {"model": spec, "seq": seq, "batch": batch, "threads": _threads()}

    # fixed-length rows: the same rows, the same order, for both sides
    rows = fixed_rows(batch * mode["fixed_steps"], seq, spec["vocab"], seed=1)
    fixed_ds = [{"input_ids": r, "labels": r} for r in rows]
    run = {"seq": seq, "batch": batch, "steps": mode["fixed_steps"]}
    sides = {"baseline": {"kind": "baseline", "dataset": fixed_ds, "collate": tensor_collate, "run": run},
             "ours": {"kind": "ours", "dataset": fixed_ds, "collate": tensor_collate, "run": run}}
    part = interleaved_sides(sides, spec, mode["repeats"], mode["warmup"], workdir / "fixed")
    part["ratio"] = compare(part, "ours", "baseline", TARGETS["fixed_ratio"])
    out["fixed"] = part

    # variable-length documents: every side makes one pass over the same documents
    docs = variable_docs(mode["docs"], seq, spec["vocab"], seed=2)
    lengths = [len(d) for d in docs]
    waste = padding_waste(lengths, seq, batch)
    packed = pack_documents(docs, seq, pad_id=PAD, mask_mode=MaskMode.POSITION_IDS)
    doc_ds = [{"input_ids": d} for d in docs]
    stock_steps, our_steps = -(-len(docs) // batch), -(-len(packed) // batch)
    stock = {"seq": seq, "batch": batch, "steps": stock_steps}
    ours = {"seq": seq, "batch": batch, "steps": our_steps}
    sides = {
        "stock_grouped": {"kind": "baseline", "dataset": doc_ds, "collate": stock_padding_collate,
                          "run": dict(stock, sampling="group_by_length")},
        "stock_flattening": {"kind": "baseline", "dataset": doc_ds, "collate": flattening_collate(), "run": stock},
        "ours_sdpa_mask": {"kind": "ours", "dataset": packed, "collate": tensor_collate, "run": ours},
        "ours_document_attention": {"kind": "ours", "dataset": packed, "collate": tensor_collate,
                                    "run": dict(ours, attention="document")},
    }
    part = interleaved_sides(sides, spec, mode["repeats"], mode["warmup"], workdir / "variable")
    med = {name: part[name]["tokens_per_s_median"] for name in sides}
    strongest = max(("stock_grouped", "stock_flattening"), key=med.get)
    best_ours = max(("ours_sdpa_mask", "ours_document_attention"), key=med.get)
    part.update({
        "documents": len(docs), "document_tokens": sum(lengths), "packed_rows": len(packed),
        "padding_waste": waste.as_dict(),
        "strongest_stock": strongest, "ours": best_ours,
        "ratio": compare(part, best_ours, strongest, TARGETS["variable_ratio"]),
        "ratio_vs_other_stock": compare(part, best_ours, ({"stock_grouped", "stock_flattening"} - {strongest}).pop(),
                                        None),
        "document_attention_vs_sdpa_mask": compare(part, "ours_document_attention", "ours_sdpa_mask", None),
        "flattening_vs_grouped": compare(part, "stock_flattening", "stock_grouped", None),
    })
    if any(part[name]["real_tokens"] != sum(lengths) for name in sides if name.startswith("stock")):
        raise RuntimeError("a stock side did not see every document exactly once")
    out["variable"] = part
    return out


# ----------------------------------------------------------------------------- 2./3./5. memory children


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(kind: str, seq: int, spec: dict, steps: int = 1, dtype: str = "float32", grad_ckpt: bool = False) -> None:
    """``steps`` LoRA training steps (forward, backward, AdamW) through a real trainer of ``kind``
    in this fresh process; prints a JSON line with the peak RSS."""
    import torch
    from datasets import Dataset

    run = {"seq": seq, "batch": 1, "steps": steps, "grad_ckpt": grad_ckpt,
           "dtype": None if dtype == "float32" else getattr(torch, dtype)}
    rows = fixed_rows(steps, seq, spec["vocab"], seed=0)
    items = []
    for row in rows:
        item = {"input_ids": row, "labels": row}
        if kind in ("gkd", "ours_distill"):
            item["attention_mask"] = [1] * seq  # GKD's compute_loss reads it
        items.append(item)
    timer = StepTimer(0)
    with tempfile.TemporaryDirectory(prefix="sw-perf-mem-") as tmp:
        trainer, info = make_trainer(kind, spec, Dataset.from_list(items), tensor_collate, run, Path(tmp),
                                     callbacks=[timer.callback])
        gc.collect()
        setup_mb = _rss_mb()
        setup_peak_mb = _maxrss_mb()
        # Reset the kernel's high-water mark (Linux: "5" > clear_refs resets VmHWM and ru_maxrss) so
        # the peak below is the training's -- weights resident plus the steps -- and not the random
        # initialisation's transient copies, which a model loaded from disk would not have.
        reset = _reset_peak_rss()
        out = trainer.train()
    peak_mb = _maxrss_mb()
    step_s = (timer.t1 - timer.t0) / steps
    print(json.dumps({"kind": kind, "seq": seq, "steps": steps, "dtype": dtype, "gradient_checkpointing": grad_ckpt,
                      **info, "setup_rss_mb": round(setup_mb, 1), "setup_peak_rss_mb": round(setup_peak_mb, 1),
                      "peak_rss_mb": round(peak_mb, 1), "peak_is_training_only": reset,
                      "process_peak_rss_mb": round(max(peak_mb, setup_peak_mb), 1),
                      "step_s": round(step_s, 2), "tokens_per_s": round(seq / step_s, 1),
                      "loss_value": float(out.training_loss)}))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_child(kind: str, seq: int, spec: dict, *, steps: int = 1, dtype: str = "float32", grad_ckpt: bool = False,
              timeout: float = 1800) -> dict:
    """One memory child; the parent also samples its RSS with psutil (every 50 ms) as a check on
    the child's own ``ru_maxrss``."""
    import psutil
    import torch

    cmd = [sys.executable, __file__, "--memory-child", kind, "--mem-seq", str(seq), "--mem-spec", json.dumps(spec),
           "--mem-steps", str(steps), "--mem-dtype", dtype, "--threads", str(torch.get_num_threads())]
    if grad_ckpt:
        cmd.append("--mem-grad-ckpt")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        sampled = 0
        t0 = time.monotonic()
        try:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    sampled = max(sampled, ps.memory_info().rss)
                except psutil.Error:
                    pass
                if time.monotonic() - t0 > timeout:
                    proc.kill()
                    raise RuntimeError(f"memory child '{kind}' ran past {timeout} s")
                time.sleep(0.05)
        except psutil.NoSuchProcess:
            pass
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise ChildFailed(kind, proc.returncode, stderr[-3000:])
    res = json.loads(stdout.strip().splitlines()[-1])
    res["sampled_peak_rss_mb"] = round(sampled / 2**20, 1)
    return res


class ChildFailed(RuntimeError):
    def __init__(self, kind: str, code: int, stderr: str):
        super().__init__(f"memory child '{kind}' failed (exit {code}): {stderr}")
        self.code = code


def interleaved_children(kinds: tuple[str, str], seq: int, spec: dict, repeats: int) -> dict:
    """Peak RSS of each kind, ``repeats`` fresh processes each, interleaved (no warm-up round:
    a fresh process has nothing to warm)."""
    records: dict[str, list[dict]] = {k: [] for k in kinds}

    def runner(kind):
        def call():
            res = run_child(kind, seq, spec)
            records[kind].append(res)
            return res["peak_rss_mb"]
        return call

    load_before = load_now()
    samples = H.interleaved({k: runner(k) for k in kinds}, repeats=repeats, warmup=0)
    out: dict = {"model": spec, "seq": seq, "repeats": repeats, "load_before": load_before, "load_after": load_now()}
    for kind in kinds:
        runs = records[kind]
        out[kind] = dict(runs[0], peak_rss_mb=statistics.median(samples[kind]), peak_rss_mb_runs=samples[kind],
                         sampled_peak_rss_mb=statistics.median(r["sampled_peak_rss_mb"] for r in runs),
                         setup_rss_mb=statistics.median(r["setup_rss_mb"] for r in runs),
                         tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs))
    out["_samples"] = samples
    return out


def bench_memory(mode: dict) -> dict:
    spec = dict(LONG_VOCAB, vocab=mode["mem_vocab"])
    out = interleaved_children(("baseline", "ours"), mode["mem_seq"], spec, mode["mem_repeats"])
    out["ratio"] = compare(out, "ours", "baseline", TARGETS["memory_ratio"], higher_is_better=False)
    out["losses_agree"] = abs(out["baseline"]["loss_value"] - out["ours"]["loss_value"]) < 1e-3
    return out


def bench_distill(mode: dict, workdir: Path) -> dict:
    if not trl_available():
        return {"skipped": "trl is not installed: the GKD comparison needs it (pip install -e '.[bench]')"}
    import trl

    try:
        load_gkd()
    except ImportError as exc:
        return {"skipped": f"trl {trl.__version__} has no GKDTrainer ({exc}); install trl>=1.0,<2"}
    from datasets import Dataset

    out: dict = {"trl": trl.__version__, "objective": dict(DISTILL, kd_weight=1.0, lmbda=0.0),
                 "teachers": {"ours_distill": "base: the student with adapters disabled (no second copy)",
                              "gkd": "a separately built LlamaForCausalLM with the student's base weights"}}
    # tokens/s on the demo config, fixed-length rows (GKD's compute_loss needs an attention mask)
    run = {"seq": mode["seq"], "batch": mode["batch"], "steps": mode["fixed_steps"]}
    rows = fixed_rows(run["batch"] * run["steps"], run["seq"], DEMO["vocab"], seed=4)
    ds = Dataset.from_list([{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in rows])
    sides = {k: {"kind": k, "dataset": ds, "collate": tensor_collate, "run": run} for k in ("gkd", "ours_distill")}
    tp = interleaved_sides(sides, DEMO, mode["repeats"], mode["warmup"], workdir / "distill")
    tp["ratio"] = compare(tp, "ours_distill", "gkd", TARGETS["distill_tokens_ratio"])
    out["throughput"] = {"model": DEMO, **run, **tp}
    # peak memory of one step at the large vocabulary
    spec = dict(LONG_VOCAB, vocab=mode["mem_vocab"])
    mem = interleaved_children(("gkd", "ours_distill"), mode["distill_mem_seq"], spec, mode["mem_repeats"])
    mem["ratio"] = compare(mem, "ours_distill", "gkd", TARGETS["distill_memory_ratio"], higher_is_better=False)
    out["memory"] = mem
    return out


# ----------------------------------------------------------------------------- 4. MFU


def matmul_peak(sizes: list[int], reps: int, shapes: list[tuple[int, int, int]] = ()) -> dict:
    """Best dense fp32 matmul rate (FLOP/s) at the current thread count: square ``n x n x n``
    products for each of ``sizes`` plus the given ``(m, k, n)`` shapes, best of ``reps`` each
    after one untimed call. The peak is the best of all."""
    import torch

    table = {}
    for m, k, n in [(s, s, s) for s in sizes] + list(shapes):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up (allocations, kernel selection)
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
        table[f"{m}x{k}x{n}"] = round(best / 1e9, 2)
    peak = max(table.values())
    return {"peak_gflops": peak, "best_shape": max(table, key=table.get), "gflops_by_shape": table, "reps": reps,
            "dtype": "float32", "threads": _threads()}


def model_flops_per_token(model, seq: int) -> dict:
    """Model FLOPs per trained token of a LoRA model (see the module docstring, point 4)."""
    base = model.get_base_model()
    cfg = base.config
    embed = base.get_input_embeddings().weight
    tied = embed is base.get_output_embeddings().weight
    lora = sum(p.numel() for name, p in base.named_parameters() if "lora_" in name)
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    n_matmul = n if tied else n - embed.numel()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq
    return {"params": n, "matmul_params": n_matmul, "lora_params": lora, "attention_flops": attention,
            "flops_lora": 4 * n_matmul + 6 * lora + attention, "flops_palm_6n": 6 * n_matmul + attention}


def mfu_entry(spec: dict, seq: int, tokens_per_s: list[float], peak_flops: float) -> dict:
    f = model_flops_per_token(build_lora_model(spec, seq), seq)
    mfu = [t * f["flops_lora"] / peak_flops for t in tokens_per_s]
    palm = [t * f["flops_palm_6n"] / peak_flops for t in tokens_per_s]
    med = statistics.median(tokens_per_s)
    return {"model": spec, "seq": seq, **f, "tokens_per_s_runs": [round(t, 2) for t in tokens_per_s],
            "tokens_per_s_median": round(med, 2), "achieved_gflops": round(med * f["flops_lora"] / 1e9, 2),
            "mfu": round(statistics.median(mfu), 4), "mfu_range": [round(min(mfu), 4), round(max(mfu), 4)],
            "mfu_palm_6n": round(statistics.median(palm), 4)}


def bench_mfu(mode: dict, demo_samples: list[float] | None, workdir: Path) -> dict:
    # model-shaped products: the demo's and the ~100M config's MLP up-projections at their token counts
    shapes = [(mode["batch"] * mode["seq"], DEMO["hidden"], DEMO["inter"])]
    if mode["m100"]:
        shapes.append((mode["m100"]["batch"] * mode["m100"]["seq"], M100["hidden"], M100["inter"]))
    peak = matmul_peak(mode["matmul_sizes"], mode["matmul_reps"], shapes)
    out: dict = {"convention": "mfu = tokens/s x (4*N_frozen + 6*N_lora + 12*L*H*Q*T) / measured peak; "
                               "mfu_palm_6n = tokens/s x (6*N + 12*L*H*Q*T) / measured peak (reference only)",
                 "peak": peak, "load_before": load_now()}
    if demo_samples is None:  # --sections without throughput: time the demo config here
        run = {"seq": mode["seq"], "batch": mode["batch"], "steps": mode["fixed_steps"]}
        rows = fixed_rows(run["batch"] * run["steps"], run["seq"], DEMO["vocab"], seed=1)
        side = {"ours": {"kind": "ours", "dataset": [{"input_ids": r, "labels": r} for r in rows],
                         "collate": tensor_collate, "run": run}}
        demo_samples = interleaved_sides(side, DEMO, mode["repeats"], mode["warmup"], workdir / "demo")["_samples"]["ours"]
    out["demo"] = mfu_entry(DEMO, mode["seq"], demo_samples, peak["peak_gflops"] * 1e9)
    if mode["m100"]:
        m = mode["m100"]
        run = {"seq": m["seq"], "batch": m["batch"], "steps": m["steps"]}
        rows = fixed_rows(run["batch"] * run["steps"], run["seq"], M100["vocab"], seed=3)
        side = {"ours": {"kind": "ours", "dataset": [{"input_ids": r, "labels": r} for r in rows],
                         "collate": tensor_collate, "run": run}}
        res = interleaved_sides(side, M100, m["repeats"], 1, workdir / "m100")
        out["m100"] = dict(mfu_entry(M100, m["seq"], res["_samples"]["ours"], peak["peak_gflops"] * 1e9),
                           run={k: v for k, v in res["ours"].items()}, repeats=m["repeats"])
    out["load_after"] = load_now()
    return out


# ----------------------------------------------------------------------------- 5. Llama-3.2-1B-shaped memory


def estimate_peak_gb(spec: dict, seq: int, kind: str, dtype_bytes: int) -> float:
    """A rough upper estimate of one LoRA step's peak RSS with gradient checkpointing, batch 1:
    weights, the layer-boundary checkpoints, one layer's recomputed activations, and the loss:
    stock keeps ~4 fp32 ``seq x vocab`` tensors (logits, log-softmax, their gradients), ours a
    chunk. Plus ~1 GB of interpreter, torch and transformers."""
    h, inter, layers, vocab = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    kv = h * spec["kv_heads"] // spec["heads"]
    params = vocab * h * (1 if spec.get("tied") else 2) + layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h)
    act = layers * seq * h * dtype_bytes + seq * (6 * inter + 10 * h) * dtype_bytes
    loss = 4 * seq * vocab * 4 if kind == "baseline" else 4 * min(seq, 2048) * vocab * 4 / 8
    return (params * dtype_bytes + act + loss) / 2**30 + 1.0


def bench_llama1b(mode: dict, seq: int | None, steps: int | None, dtype: str) -> dict:
    import psutil

    cfg = mode["llama1b"]
    spec, seq, steps = cfg["spec"], seq or cfg["seq"], steps or cfg["steps"]
    dtype_bytes = 2 if dtype in ("bfloat16", "float16") else 4
    available = psutil.virtual_memory().available / 2**30
    out: dict = {"model": spec, "requested_seq": seq, "dtype": dtype, "batch": 1, "steps": steps,
                 "gradient_checkpointing": True, "lora": {"r": 8, "targets": LORA_TARGETS},
                 "available_gb_before": round(available, 2), "load_before": load_now(), "attempts": []}
    while True:
        est = {k: round(estimate_peak_gb(spec, seq, k, dtype_bytes), 2) for k in ("baseline", "ours")}
        if est["baseline"] <= 0.9 * available or seq <= 512:
            break
        out["attempts"].append({"seq": seq, "estimated_gb": est, "skipped": "stock estimate above 90% of available"})
        seq //= 2
    while True:
        try:
            res = {k: run_child(k, seq, spec, steps=steps, dtype=dtype, grad_ckpt=True, timeout=4 * 3600)
                   for k in ("baseline", "ours")}
            break
        except ChildFailed as exc:  # killed for memory (SIGKILL from the OOM killer, or a MemoryError)
            out["attempts"].append({"seq": seq, "estimated_gb": est, "failed": str(exc)[:500]})
            if seq <= 512:
                raise
            seq //= 2
            est = {k: round(estimate_peak_gb(spec, seq, k, dtype_bytes), 2) for k in ("baseline", "ours")}
    out.update({"seq": seq, "estimated_gb": est, **res, "load_after": load_now()})
    if seq != out["requested_seq"]:
        out["note"] = f"ran at {seq} tokens: {out['requested_seq']} did not fit this machine with the stock trainer"
    out["ratio_peak_rss"] = round(res["ours"]["peak_rss_mb"] / res["baseline"]["peak_rss_mb"], 4)
    out["ratio_sampled_peak_rss"] = round(res["ours"]["sampled_peak_rss_mb"] / res["baseline"]["sampled_peak_rss_mb"], 4)
    return out


# ----------------------------------------------------------------------------- main


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def machine() -> dict:
    import torch

    return {**H.machine_state(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "nice": os.nice(0)}


def verdicts(result: dict) -> dict:
    """Each headline figure: median ratio, 95% interval, target and verdict (harness.verdict)."""
    found = {}
    if "throughput" in result:
        found["fixed_ratio"] = result["throughput"]["fixed"]["ratio"]
        found["variable_ratio"] = result["throughput"]["variable"]["ratio"]
    if "memory" in result:
        found["memory_ratio"] = result["memory"]["ratio"]
    if "distill" in result and "skipped" not in result["distill"]:
        found["distill_memory_ratio"] = result["distill"]["memory"]["ratio"]
        found["distill_tokens_ratio"] = result["distill"]["throughput"]["ratio"]
    return {name: {k: r[k] for k in ("of", "over", "ratio", "ci95", "repeats", "target", "verdict", "shown")}
            for name, r in found.items()}


def _strip_samples(obj):
    if isinstance(obj, dict):
        return {k: _strip_samples(v) for k, v in obj.items() if k != "_samples"}
    if isinstance(obj, list):
        return [_strip_samples(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, 2 kept rounds")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS + OPT_IN_SECTIONS)} "
                         "(llama1b only when named; a subset writes results/perf_partial*.json)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every measurement (default 1: steadier beside other jobs on a shared "
                    "machine; the matmul peak of the MFU is measured at the same count)")
    ap.add_argument("--repeats", type=int, default=None, help="kept interleaved rounds per A/B (full default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="discarded warm-up rounds per A/B (default 1)")
    ap.add_argument("--seq", type=int, default=None, help="row length of the throughput/distill runs (full 512)")
    ap.add_argument("--batch", type=int, default=None, help="rows (stock: documents) per step (full 4)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per fixed-row run (full default 4)")
    ap.add_argument("--docs", type=int, default=None,
                    help="variable-length documents per run, one pass (full default 64 = 16 stock batches)")
    ap.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per side for peak RSS (full 5)")
    ap.add_argument("--m100-repeats", type=int, default=None, help="kept runs of the ~100M config's MFU (full 3)")
    ap.add_argument("--llama1b-seq", type=int, default=None, help="tokens of the 1B-shaped step (default 4096)")
    ap.add_argument("--llama1b-steps", type=int, default=None, help="steps per side of the 1B-shaped run (default 1)")
    ap.add_argument("--llama1b-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    ap.add_argument("--memory-child", choices=["baseline", "ours", "gkd", "ours_distill"], help=argparse.SUPPRESS)
    ap.add_argument("--mem-seq", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--mem-spec", default=json.dumps(LONG_VOCAB), help=argparse.SUPPRESS)
    ap.add_argument("--mem-steps", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--mem-dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--mem-grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.memory_child:
        memory_child(args.memory_child, args.mem_seq, json.loads(args.mem_spec), args.mem_steps, args.mem_dtype,
                     args.mem_grad_ckpt)
        return
    chosen = {s.strip() for s in args.sections.split(",") if s.strip()}
    sections = [s for s in SECTIONS + OPT_IN_SECTIONS if s in chosen]  # always in this order
    unknown = sorted(chosen - set(SECTIONS + OPT_IN_SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS + OPT_IN_SECTIONS)}")

    name = "quick" if args.quick else "full"
    mode = copy.deepcopy(MODES[name])
    for flag, key in (("repeats", "repeats"), ("warmup", "warmup"), ("steps", "fixed_steps"), ("docs", "docs"),
                      ("memory_repeats", "mem_repeats"), ("seq", "seq"), ("batch", "batch")):
        if getattr(args, flag) is not None:
            mode[key] = getattr(args, flag)
    if args.m100_repeats is not None and mode["m100"]:
        mode["m100"]["repeats"] = args.m100_repeats
    command = "python " + " ".join(["bench/perf.py"] + [a for a in sys.argv[1:] if a])
    result: dict = {"bench": "perf", "mode": name, "command": command, "machine": machine(),
                    "load_average_before": load_now(), "trl_installed": trl_available(),
                    "statistics": "harness.py: interleaved rounds (order shuffled per round), warm-up round(s) "
                                  "discarded, median ratio with a paired 95% bootstrap interval; met = the whole "
                                  "interval clears the target",
                    "settings": {k: v for k, v in mode.items() if k != "llama1b"}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-perf-") as tmp:
        work = Path(tmp)
        section_s = result["section_s"] = {}
        for section in sections:
            t_section = time.perf_counter()
            if section == "throughput":
                result["throughput"] = bench_throughput(mode, DEMO, work)
            elif section == "memory":
                result["memory"] = bench_memory(mode)
            elif section == "distill":
                result["distill"] = bench_distill(mode, work)
            elif section == "mfu":
                demo = result["throughput"]["fixed"]["_samples"]["ours"] if "throughput" in result else None
                result["mfu"] = bench_mfu(mode, demo, work)
            elif section == "llama1b":
                result["llama1b"] = bench_llama1b(mode, args.llama1b_seq, args.llama1b_steps, args.llama1b_dtype)
            section_s[section] = round(time.perf_counter() - t_section, 1)
    result["load_average_after"] = load_now()
    result["targets"] = dict(TARGETS)
    result["verdicts"] = verdicts(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result = _strip_samples(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if sections == ["llama1b"]:
        stem = "perf_llama1b"
    else:
        stem = "perf" if set(sections) == set(SECTIONS) else "perf_partial"
    (args.results_dir / (stem + ("_quick" if args.quick else "") + ".json")).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    # Python puts this script's folder first on sys.path; a bench script named like a package
    # (bench/multiprocess.py vs the `multiprocess` package that `datasets` imports) would shadow it.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(ROOT / "src"))
    main()
