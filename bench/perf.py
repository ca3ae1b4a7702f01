"""Speed, memory and MFU of our training step against stock baselines, run side by side.

Every comparison runs in this one script, on this machine, with the same model shape, data,
sequence length, batch and step count for both sides:

1. **Tokens/s of a LoRA training step**: ``ScalingTrainer`` (chunked, task-balanced loss, chunk
   size from :func:`scaler_wizard.losses.chunk_policy.positions_per_chunk`) vs a stock
   ``transformers.Trainer`` on the same PEFT LoRA model with the model's own loss.
   * fixed-length data: rows of exactly ``seq`` tokens for both;
   * variable-length data (documents of ``seq/8 .. seq`` tokens): the baseline pads each batch to
     its longest document (what ``DataCollatorWithPadding`` does for a stock user); ours packs the
     documents into ``seq``-token rows (``scaler_wizard.packing``, ``MaskMode.POSITION_IDS``: the
     rows carry restarting ``position_ids`` and no attention mask, which is what the pipeline's
     ``data.build_stage_rows`` produces; ``ScalingTrainer`` forwards them to the decoder).
   Throughput counts *real* (non-padding) tokens per second over the timed steps (the first
   ``warmup`` steps are not timed). In full mode each side runs ``repeats`` times, alternating
   baseline and ours, on the same batches in the same order, and every step counts at the
   fastest of its repeats (this machine is shared; each run's own figure is kept in the JSON).
2. **Peak RSS of one LoRA step at long context with a large vocabulary** (2-layer, 256-wide
   Llama, vocabulary 128,256): ``transformers.Trainer`` with the stock loss (full logits) vs
   ``ScalingTrainer`` (chunked loss), each in a fresh subprocess so neither inherits the other's
   allocator high-water mark. Target ratio <= 0.25.
3. **Distillation**: our ``base`` teacher (``BaseModelTeacher``: the student's own weights with
   the adapters disabled, no second copy) with the chunked generalised-JSD loss vs TRL's
   ``GKDTrainer`` with a separately built teacher (the same base weights, a second copy), both
   off-policy (``lmbda=0``: no generation; GKD then is supervised KD on the given sequences),
   JSD with beta 0.5, temperature 1, loss = KD only (our ``kd_weight=1``). Tokens/s on the demo
   model config; peak RSS of one step at the large vocabulary in fresh subprocesses (target
   ratio <= 0.6). Skipped with a note when ``trl`` is not installed (``pip install -e .[bench]``).
4. **MFU** (PaLM's definition, Chowdhery et al. 2022, appendix B): achieved model FLOP/s over
   the peak FLOP/s, with model FLOPs per token = 6N + 12*L*H*Q*T (N = parameters doing matmuls,
   i.e. without the input-embedding lookup; L layers, H heads, Q head dim, T sequence length;
   recomputation not counted). The peak is this machine's dense fp32 matmul rate measured with
   torch in the same run, at the same thread count. For a LoRA step the frozen weights need no
   weight gradients, so the work really done is nearer 4N; ``mfu_lora_4n`` reports that variant.

    python bench/perf.py --quick   # smoke mode, about a minute on 2 cores
    python bench/perf.py           # full mode (demo config at 512 tokens, ~100M config, seq 4096 memory)
    python bench/perf.py --sections throughput,distill   # a subset (results/perf_partial.json)

Prints one JSON line and writes bench/results/perf.json (perf_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PAD = 0  # documents are drawn from token ids 1..V-1, so id 0 marks padding unambiguously
DEMO_TOKENIZER = ROOT / "src" / "scaler_wizard" / "assets" / "demo_model"

# the demo model of scripts/build_demo_model.py
DEMO = {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 4096}
# ~96M parameters
M100 = {"layers": 10, "hidden": 768, "heads": 12, "kv_heads": 12, "inter": 2048, "vocab": 16384}
LONG_VOCAB = {"layers": 2, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 128256}

MODES = {
    # quick is a smoke run: the memory figures use a 32,768 vocabulary at short lengths
    "quick": {"seq": 128, "batch": 2, "steps": 3, "warmup": 1, "repeats": 1, "mem_vocab": 32768, "mem_seq": 1024,
              "distill_mem_seq": 128, "matmul_n": 1024, "matmul_reps": 4, "m100": None},
    # m100: the ~100M config's run, cut to 4 steps of one 512-token row to keep the full run in ~20 minutes
    "full": {"seq": 512, "batch": 4, "steps": 10, "warmup": 2, "repeats": 2, "mem_vocab": 128256, "mem_seq": 4096,
             "distill_mem_seq": 1024, "matmul_n": 2048, "matmul_reps": 10,
             "m100": {"seq": 512, "batch": 1, "steps": 4, "warmup": 1}},
}
SECTIONS = ("throughput", "memory", "distill", "mfu")
TARGETS = {"fixed_ratio": (">=", 1.0), "variable_ratio": (">=", 1.3), "memory_ratio": ("<=", 0.25),
           "distill_memory_ratio": ("<=", 0.6), "distill_tokens_ratio": (">=", 1.0)}
# the distillation objective of both sides (see the module docstring, point 3)
DISTILL = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0}


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


# ----------------------------------------------------------------------------- models and data


def llama_config(spec: dict, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(seq, 64), bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
    )


def build_base_model(spec: dict, seq: int, seed: int = 0):
    """A randomly initialised Llama of the given shape; the same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec, seq))


def build_lora_model(spec: dict, seq: int, seed: int = 0):
    """The base model of ``seed`` wrapped in PEFT LoRA (r=8 on q/k/v/o)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(build_base_model(spec, seq, seed), lora)


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
    """Trainer callback timing the steps after ``warmup``: ``t0`` (start of the first timed step),
    ``t1`` (end of the last step) and every step's end, so each step's wall time (data loading
    included) is the gap between consecutive ends."""

    def __init__(self, warmup: int):
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

    def step_seconds(self) -> list[float]:
        """Wall time of each timed step (index ``warmup`` onwards)."""
        return [end - (self.ends[i - 1] if i > self.warmup else self.t0)
                for i, end in enumerate(self.ends) if i >= self.warmup]


def _training_args(kind: str, workdir: Path, run: dict):
    common = {
        "output_dir": str(workdir / kind), "max_steps": run["steps"], "per_device_train_batch_size": run["batch"],
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "save_strategy": "no", "report_to": [],
        "disable_tqdm": True, "logging_steps": 10_000, "remove_unused_columns": False, "dataloader_num_workers": 0,
        "use_cpu": True, "seed": 0, "data_seed": 0,
    }
    if kind == "gkd":
        GKDConfig = load_gkd()[1]
        # lmbda=0: never generate (off-policy), seq_kd off: KD on the given sequences, like ours
        return GKDConfig(**common, lmbda=0.0, seq_kd=False, beta=DISTILL["beta"],
                         temperature=DISTILL["temperature"], bf16=False)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def make_trainer(kind: str, spec: dict, dataset, collate, run: dict, workdir: Path, callbacks=()):
    """A trainer of ``kind`` on a fresh LoRA model of ``spec``:

    ``baseline``   stock ``transformers.Trainer``, the model's own loss (full logits);
    ``ours``       ``ScalingTrainer``, chunked CE with the chunk size of ``chunk_policy``;
    ``ours_distill`` ``ScalingTrainer`` + ``BaseModelTeacher`` (adapters disabled), chunked JSD;
    ``gkd``        TRL's ``GKDTrainer`` with a separately built teacher (a second copy of the base).

    Returns ``(trainer, info)``; ``info`` names the chunk size our side picked.
    """
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from scaler_wizard.training.stage_trainer import ScalingTrainer

    model = build_lora_model(spec, run["seq"])
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
    """Train ``run['steps']`` steps with a trainer of ``kind``; tokens/s over the steps after warmup."""
    counter = CountingCollator(collate)
    timer = StepTimer(run["warmup"])
    trainer, info = make_trainer(kind, spec, dataset, counter, run, workdir, callbacks=[timer.callback])
    trainer.train()
    timed = counter.real_tokens[run["warmup"] : run["steps"]]
    steps_s = timer.step_seconds()
    seconds = timer.t1 - timer.t0
    return {"tokens_per_s": sum(timed) / seconds, "timed_steps": len(timed), "timed_s": round(seconds, 3),
            "real_tokens_per_step": sum(timed) / max(1, len(timed)), "step_tokens": timed,
            "step_s": [round(x, 4) for x in steps_s], **info}


def side_by_side(pairs: list[tuple[str, object, object]], spec: dict, run: dict, repeats: int, workdir: Path) -> dict:
    """Alternate the sides ``repeats`` times (A B A B ...). Each run sees the same batches in the
    same order (fixed seeds), so for every step the fastest of its repeats counts: a step slowed
    by another job on this shared machine is replaced by the same step run undisturbed. Every
    run's own tokens/s is kept (``per_run_tokens_per_s``)."""
    runs: dict[str, list[dict]] = {kind: [] for kind, _, _ in pairs}
    for r in range(repeats):
        for kind, dataset, collate in pairs:
            runs[kind].append(timed_train(kind, spec, dataset, collate, run, workdir / f"r{r}"))
    out = {}
    for kind, results in runs.items():
        tokens = results[0]["step_tokens"]
        if any(res["step_tokens"] != tokens for res in results):
            raise RuntimeError(f"'{kind}' saw different batches in its repeats; the per-step minimum needs equal ones")
        best_s = [min(res["step_s"][i] for res in results) for i in range(len(tokens))]
        out[kind] = dict(results[0], tokens_per_s=sum(tokens) / sum(best_s), timed_s=round(sum(best_s), 3),
                         step_s=[round(x, 4) for x in best_s],
                         per_run_tokens_per_s=[round(res["tokens_per_s"], 1) for res in results])
    return out


# ----------------------------------------------------------------------------- 1. throughput


def bench_throughput(mode: dict, spec: dict, workdir: Path) -> dict:
    from scaler_wizard.packing import MaskMode, pack_documents, padding_waste

    run = {k: mode[k] for k in ("seq", "batch", "steps", "warmup")}
    seq, batch, steps = run["seq"], run["batch"], run["steps"]
    out: dict = {"model": spec, **run, "repeats": mode["repeats"]}

    rows = fixed_rows(batch * steps, seq, spec["vocab"], seed=1)
    fixed_ds = [{"input_ids": r, "labels": r} for r in rows]
    res = side_by_side([("baseline", fixed_ds, tensor_collate), ("ours", fixed_ds, tensor_collate)], spec, run,
                       mode["repeats"], workdir / "fixed")
    out["fixed"] = {**res, "ratio": res["ours"]["tokens_per_s"] / res["baseline"]["tokens_per_s"]}

    # Enough documents that neither trainer runs out within `steps` batches of `batch` rows.
    docs = variable_docs(batch * steps * 2, seq, spec["vocab"], seed=2)
    waste = padding_waste([len(d) for d in docs], seq, batch)
    packed = pack_documents(docs, seq, pad_id=PAD, mask_mode=MaskMode.POSITION_IDS)
    res = side_by_side([("baseline", [{"input_ids": d} for d in docs], stock_padding_collate),
                        ("ours", packed, tensor_collate)], spec, run, mode["repeats"], workdir / "variable")
    out["variable"] = {**res, "ratio": res["ours"]["tokens_per_s"] / res["baseline"]["tokens_per_s"],
                       "padding_waste": waste.as_dict()}
    return out


# ----------------------------------------------------------------------------- 2./3. memory children


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(kind: str, seq: int, vocab: int) -> None:
    """One LoRA training step (forward, backward, AdamW) through a real trainer of ``kind`` at the
    large vocabulary, in this fresh process; prints a JSON line with the peak RSS."""
    from datasets import Dataset

    spec = dict(LONG_VOCAB, vocab=vocab)
    run = {"seq": seq, "batch": 1, "steps": 1, "warmup": 0}
    row = fixed_rows(1, seq, vocab, seed=0)[0]
    item = {"input_ids": row, "labels": row}
    if kind in ("gkd", "ours_distill"):
        item["attention_mask"] = [1] * seq  # GKD's compute_loss reads it
    timer = StepTimer(0)
    with tempfile.TemporaryDirectory(prefix="sw-perf-mem-") as tmp:
        trainer, info = make_trainer(kind, spec, Dataset.from_list([item]), tensor_collate, run, Path(tmp),
                                     callbacks=[timer.callback])
        setup_mb = _rss_mb()
        out = trainer.train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    step_s = timer.t1 - timer.t0
    print(json.dumps({"kind": kind, "seq": seq, **info, "setup_rss_mb": round(setup_mb, 1),
                      "peak_rss_mb": round(peak_mb, 1), "step_s": round(step_s, 2),
                      "tokens_per_s": round(seq / step_s, 1), "loss_value": float(out.training_loss)}))


def run_children(kinds: tuple[str, ...], seq: int, vocab: int) -> dict:
    import torch

    out = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--memory-child", kind, "--mem-seq", str(seq), "--mem-vocab", str(vocab),
               "--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child '{kind}' failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _ratios(out: dict, ours: str, theirs: str) -> dict:
    a, b = out[ours], out[theirs]
    return {"ratio_peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
            "ratio_step_increment": (a["peak_rss_mb"] - a["setup_rss_mb"]) / (b["peak_rss_mb"] - b["setup_rss_mb"])}


def bench_memory(mode: dict) -> dict:
    seq, spec = mode["mem_seq"], dict(LONG_VOCAB, vocab=mode["mem_vocab"])
    out: dict = {"model": spec, "seq": seq, **run_children(("baseline", "ours"), seq, spec["vocab"])}
    out.update(_ratios(out, "ours", "baseline"))
    out["target_ratio"] = TARGETS["memory_ratio"][1]
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
    run = {k: mode[k] for k in ("seq", "batch", "steps", "warmup")}
    rows = fixed_rows(run["batch"] * run["steps"], run["seq"], DEMO["vocab"], seed=4)
    ds = Dataset.from_list([{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in rows])
    res = side_by_side([("gkd", ds, tensor_collate), ("ours_distill", ds, tensor_collate)], DEMO, run,
                       mode["repeats"], workdir / "distill")
    out["throughput"] = {"model": DEMO, **run, **res,
                         "ratio": res["ours_distill"]["tokens_per_s"] / res["gkd"]["tokens_per_s"]}
    # peak memory of one step at the large vocabulary
    seq, spec = mode["distill_mem_seq"], dict(LONG_VOCAB, vocab=mode["mem_vocab"])
    mem: dict = {"model": spec, "seq": seq, **run_children(("gkd", "ours_distill"), seq, spec["vocab"])}
    mem.update(_ratios(mem, "ours_distill", "gkd"))
    mem["ratio_tokens_per_s"] = mem["ours_distill"]["tokens_per_s"] / mem["gkd"]["tokens_per_s"]
    mem["target_ratio"] = TARGETS["distill_memory_ratio"][1]
    out["memory"] = mem
    return out


# ----------------------------------------------------------------------------- 4. MFU


def matmul_peak_flops(n: int, reps: int) -> float:
    """Best dense fp32 matmul rate (FLOP/s) of an n x n x n product at the current thread count."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up (allocations, kernel selection)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def model_flops_per_token(model, seq: int) -> dict:
    """6N + 12*L*H*Q*T (PaLM appendix B); N excludes the input-embedding lookup and the LoRA adapters."""
    base = model.get_base_model()
    cfg = base.config
    embed = base.get_input_embeddings().weight
    tied = embed is base.get_output_embeddings().weight
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    n_matmul = n if tied else n - embed.numel()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq
    return {"params": n, "matmul_params": n_matmul, "flops_6n": 6 * n_matmul + attention,
            "flops_4n": 4 * n_matmul + attention}


def mfu_entry(spec: dict, seq: int, tokens_per_s: float, peak: float) -> dict:
    model = build_lora_model(spec, seq)
    f = model_flops_per_token(model, seq)
    return {"model": spec, "seq": seq, "params": f["params"], "tokens_per_s": tokens_per_s,
            "model_flops_per_token": f["flops_6n"], "achieved_tflops": tokens_per_s * f["flops_6n"] / 1e12,
            "mfu": tokens_per_s * f["flops_6n"] / peak, "mfu_lora_4n": tokens_per_s * f["flops_4n"] / peak}


def bench_mfu(mode: dict, demo_tokens_per_s: float | None, workdir: Path) -> dict:
    peak = matmul_peak_flops(mode["matmul_n"], mode["matmul_reps"])
    out: dict = {"matmul_peak_gflops": peak / 1e9, "matmul_n": mode["matmul_n"]}
    if demo_tokens_per_s is None:  # --sections without throughput: time the demo config here
        run = {k: mode[k] for k in ("seq", "batch", "steps", "warmup")}
        rows = fixed_rows(run["batch"] * run["steps"], run["seq"], DEMO["vocab"], seed=1)
        demo_tokens_per_s = timed_train("ours", DEMO, [{"input_ids": r, "labels": r} for r in rows],
                                        tensor_collate, run, workdir / "demo")["tokens_per_s"]
    out["demo"] = mfu_entry(DEMO, mode["seq"], demo_tokens_per_s, peak)
    if mode["m100"]:
        run = mode["m100"]
        rows = fixed_rows(run["batch"] * run["steps"], run["seq"], M100["vocab"], seed=3)
        res = timed_train("ours", M100, [{"input_ids": r, "labels": r} for r in rows], tensor_collate, run,
                          workdir / "m100")
        out["m100"] = dict(mfu_entry(M100, run["seq"], res["tokens_per_s"], peak), run=res)
    return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "nice": os.nice(0)}


def verdicts(result: dict) -> dict:
    """Each headline figure with its target and whether it is met."""
    values = {}
    if "throughput" in result:
        values["fixed_ratio"] = result["throughput"]["fixed"]["ratio"]
        values["variable_ratio"] = result["throughput"]["variable"]["ratio"]
    if "memory" in result:
        values["memory_ratio"] = result["memory"]["ratio_peak_rss"]
    if "distill" in result and "skipped" not in result["distill"]:
        values["distill_memory_ratio"] = result["distill"]["memory"]["ratio_peak_rss"]
        values["distill_tokens_ratio"] = result["distill"]["throughput"]["ratio"]
    out = {}
    for name, value in values.items():
        op, target = TARGETS[name]
        out[name] = {"value": round(value, 3), "target": f"{op} {target}",
                     "met": value >= target if op == ">=" else value <= target}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, about a minute")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (writes results/perf_partial*.json)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every measurement (default 1: steadier beside other jobs on a shared "
                    "machine; the matmul peak of the MFU is measured at the same count)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)")
    ap.add_argument("--memory-child", choices=["baseline", "ours", "gkd", "ours_distill"], help=argparse.SUPPRESS)
    ap.add_argument("--mem-seq", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--mem-vocab", type=int, default=LONG_VOCAB["vocab"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.memory_child:
        memory_child(args.memory_child, args.mem_seq, args.mem_vocab)
        return
    chosen = {s.strip() for s in args.sections.split(",") if s.strip()}
    sections = [s for s in SECTIONS if s in chosen]  # always in the order of SECTIONS
    unknown = sorted(chosen - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    name = "quick" if args.quick else "full"
    mode = MODES[name]
    command = "python bench/perf.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if set(sections) != set(SECTIONS):
        command += f" --sections {','.join(sections)}"
    result: dict = {"bench": "perf", "mode": name, "command": command, "machine": machine(),
                    "load_average_before": list(os.getloadavg()), "trl_installed": trl_available()}
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
                demo = result["throughput"]["fixed"]["ours"]["tokens_per_s"] if "throughput" in result else None
                result["mfu"] = bench_mfu(mode, demo, work)
            section_s[section] = round(time.perf_counter() - t_section, 1)
    result["load_average_after"] = list(os.getloadavg())
    result["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    result["verdicts"] = verdicts(result)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.results_dir.mkdir(parents=True, exist_ok=True)
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
