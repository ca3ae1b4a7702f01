"""Speed, memory and MFU of our training step against a plain ``transformers.Trainer`` + PEFT run.

Three measurements, all on this machine, in this one script, baselines side by side:

1. **Tokens/s of a LoRA training step**: ``ScalingTrainer`` (chunked, task-balanced loss) vs a
   stock ``transformers.Trainer`` on the same PEFT LoRA model with the model's own loss; same
   model, data, sequence length, batch and step count.
   * fixed-length data: rows of exactly ``seq`` tokens for both;
   * variable-length data (documents of ``seq/8 .. seq`` tokens): the baseline pads each batch to
     its longest document (what ``DataCollatorWithPadding`` does for a stock user); ours packs the
     documents into ``seq``-token rows (``scaler_wizard.packing``). ``ScalingTrainer`` forwards
     only ``input_ids`` and ``attention_mask`` to the decoder, so the packed rows carry the
     block-diagonal 4-D mask (``MaskMode.BLOCK_4D``).
   Throughput counts *real* (non-padding) tokens per second over the timed steps (the first
   ``warmup`` steps are not timed); both trainers see the same documents in the same amount.
2. **Peak RSS of one LoRA step at long context with a large vocabulary** (2-layer, 256-wide
   Llama, vocabulary 128,256): the stock loss (``model(..., labels=...)``, which materialises the
   full logits) vs ``ScalingTrainer.compute_loss`` (the chunked loss), each in a fresh subprocess
   so neither inherits the other's allocator high-water mark. Ratio target <= 0.25.
3. **MFU** (PaLM's definition, Chowdhery et al. 2022, appendix B): achieved model FLOP/s over
   the peak FLOP/s, with model FLOPs per token = 6N + 12*L*H*Q*T (N = parameters doing matmuls,
   i.e. without the input-embedding lookup; L layers, H heads, Q head dim, T sequence length;
   recomputation not counted). The peak is this machine's dense fp32 matmul rate measured with
   torch in the same run, at the same thread count. For a LoRA step the frozen weights need no
   weight gradients, so the work really done is nearer 4N; ``mfu_lora_4n`` reports that variant.

    python bench/perf.py --quick   # smoke mode, ~1-2 minutes on 2 cores
    python bench/perf.py           # full mode (demo-size config at 512 tokens, 100M config, seq 4096 memory)

Prints one JSON line and writes bench/results/perf.json (perf_quick.json with --quick).
"""

from __future__ import annotations

import argparse
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
from types import SimpleNamespace

RESULTS = Path(__file__).resolve().parent / "results"
PAD = 0  # documents are drawn from token ids 1..V-1, so id 0 marks padding unambiguously

# the demo model of scripts/build_demo_model.py
DEMO = {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 4096}
# ~96M parameters
M100 = {"layers": 10, "hidden": 768, "heads": 12, "kv_heads": 12, "inter": 2048, "vocab": 16384}
LONG_VOCAB = {"layers": 2, "hidden": 256, "heads": 8, "kv_heads": 4, "inter": 768, "vocab": 128256}

MODES = {
    "quick": {"seq": 128, "batch": 2, "steps": 4, "warmup": 1, "mem_seq": 1024, "matmul_n": 1024,
              "matmul_reps": 4, "m100": False},
    "full": {"seq": 512, "batch": 4, "steps": 24, "warmup": 3, "mem_seq": 4096, "matmul_n": 2048,
             "matmul_reps": 10, "m100": True},
}


# ----------------------------------------------------------------------------- models and data


def build_lora_model(spec: dict, seq: int, seed: int = 0):
    """A randomly initialised Llama of the given shape wrapped in PEFT LoRA (r=8 on q/k/v/o)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(seq, 64), bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


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


# ----------------------------------------------------------------------------- 1. throughput


class StepTimer:
    """Trainer callback timing the steps after ``warmup``."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.warmup:
                    outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.t1 = time.perf_counter()

        self.warmup = warmup
        self.t0 = self.t1 = 0.0
        self.callback = _CB()


def timed_train(kind: str, spec: dict, dataset, collate, mode: dict, workdir: Path) -> dict:
    """Train ``mode['steps']`` steps with the stock Trainer (``kind='baseline'``) or ours."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from scaler_wizard.training.stage_trainer import ScalingTrainer

    model = build_lora_model(spec, mode["seq"])
    counter = CountingCollator(collate)
    timer = StepTimer(mode["warmup"])
    args = TrainingArguments(
        output_dir=str(workdir / kind), max_steps=mode["steps"], per_device_train_batch_size=mode["batch"],
        learning_rate=1e-4, lr_scheduler_type="constant", save_strategy="no", report_to=[], disable_tqdm=True,
        logging_steps=10_000, remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True, seed=0,
        data_seed=0,
    )
    common = {"model": model, "args": args, "train_dataset": dataset, "data_collator": counter,
              "callbacks": [timer.callback]}
    trainer = Trainer(**common) if kind == "baseline" else ScalingTrainer(**common, loss_chunk_size=min(512, mode["seq"]))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    timed = counter.real_tokens[mode["warmup"] : mode["steps"]]
    seconds = timer.t1 - timer.t0
    return {"tokens_per_s": sum(timed) / seconds, "timed_steps": len(timed), "timed_s": round(seconds, 3),
            "real_tokens_per_step": sum(timed) / max(1, len(timed))}


def bench_throughput(mode: dict, spec: dict, workdir: Path) -> dict:
    from scaler_wizard.packing import MaskMode, pack_documents, padding_waste

    seq, batch, steps = mode["seq"], mode["batch"], mode["steps"]
    out: dict = {"model": spec, "seq": seq, "batch": batch, "steps": steps, "warmup": mode["warmup"]}

    rows = fixed_rows(batch * steps, seq, spec["vocab"], seed=1)
    fixed_ds = [{"input_ids": r, "labels": r} for r in rows]
    base = timed_train("baseline", spec, fixed_ds, tensor_collate, mode, workdir)
    ours = timed_train("ours", spec, fixed_ds, tensor_collate, mode, workdir)
    out["fixed"] = {"baseline": base, "ours": ours, "ratio": ours["tokens_per_s"] / base["tokens_per_s"]}

    # Enough documents that neither trainer runs out within `steps` batches of `batch` rows.
    docs = variable_docs(batch * steps * 2, seq, spec["vocab"], seed=2)
    waste = padding_waste([len(d) for d in docs], seq, batch)
    packed = pack_documents(docs, seq, pad_id=PAD, mask_mode=MaskMode.BLOCK_4D)
    base = timed_train("baseline", spec, [{"input_ids": d} for d in docs], stock_padding_collate, mode, workdir)
    ours = timed_train("ours", spec, packed, tensor_collate, mode, workdir)
    out["variable"] = {"baseline": base, "ours": ours, "ratio": ours["tokens_per_s"] / base["tokens_per_s"],
                       "padding_waste": waste.as_dict()}
    return out


# ----------------------------------------------------------------------------- 2. memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(loss: str, seq: int, chunk: int) -> None:
    """One LoRA step (forward, backward, AdamW) in this fresh process; prints a JSON line."""
    import torch

    from scaler_wizard.training.stage_trainer import ScalingTrainer

    model = build_lora_model(LONG_VOCAB, seq)
    model.train()
    ids = torch.randint(1, LONG_VOCAB["vocab"], (1, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids.clone()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    setup_mb = _rss_mb()
    t0 = time.perf_counter()
    if loss == "stock":
        value = model(**inputs, use_cache=False).loss  # what transformers.Trainer.compute_loss does
    else:
        # the real ScalingTrainer.compute_loss, on a stand-in for the Trainer's state it reads
        value = ScalingTrainer.compute_loss(SimpleNamespace(teacher=None, loss_chunk_size=chunk), model, inputs)
    value.backward()
    optimizer.step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"loss": loss, "seq": seq, "chunk": chunk, "setup_rss_mb": round(setup_mb, 1),
                      "peak_rss_mb": round(peak_mb, 1), "step_s": round(time.perf_counter() - t0, 2),
                      "loss_value": float(value)}))


def bench_memory(mode: dict) -> dict:
    seq = mode["mem_seq"]
    chunk = min(512, seq // 8)
    out: dict = {"model": LONG_VOCAB, "seq": seq, "chunk": chunk}
    for loss in ("stock", "chunked"):
        cmd = [sys.executable, __file__, "--memory-child", loss, "--mem-seq", str(seq), "--mem-chunk", str(chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child '{loss}' failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out[loss] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_peak_rss"] = out["chunked"]["peak_rss_mb"] / out["stock"]["peak_rss_mb"]
    out["ratio_step_increment"] = ((out["chunked"]["peak_rss_mb"] - out["chunked"]["setup_rss_mb"])
                                   / (out["stock"]["peak_rss_mb"] - out["stock"]["setup_rss_mb"]))
    out["target_ratio"] = 0.25
    out["losses_agree"] = abs(out["stock"]["loss_value"] - out["chunked"]["loss_value"]) < 1e-3
    return out


# ----------------------------------------------------------------------------- 3. MFU


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


def bench_mfu(mode: dict, demo_tokens_per_s: float, workdir: Path) -> dict:
    peak = matmul_peak_flops(mode["matmul_n"], mode["matmul_reps"])
    out = {"matmul_peak_gflops": peak / 1e9, "matmul_n": mode["matmul_n"],
           "demo": mfu_entry(DEMO, mode["seq"], demo_tokens_per_s, peak)}
    if mode["m100"]:
        m100_mode = dict(mode, batch=2, steps=6, warmup=1)
        rows = fixed_rows(m100_mode["batch"] * m100_mode["steps"], mode["seq"], M100["vocab"], seed=3)
        run = timed_train("ours", M100, [{"input_ids": r, "labels": r} for r in rows], tensor_collate, m100_mode,
                          workdir / "m100")
        out["m100"] = mfu_entry(M100, mode["seq"], run["tokens_per_s"], peak)
    return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, a minute or two")
    ap.add_argument("--memory-child", choices=["stock", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--mem-seq", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--mem-chunk", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    if args.memory_child:
        memory_child(args.memory_child, args.mem_seq, args.mem_chunk)
        return

    name = "quick" if args.quick else "full"
    mode = MODES[name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-perf-") as tmp:
        work = Path(tmp)
        throughput = bench_throughput(mode, DEMO, work)
        mfu = bench_mfu(mode, throughput["fixed"]["ours"]["tokens_per_s"], work)
    memory = bench_memory(mode)
    result = {
        "bench": "perf", "mode": name, "command": "python bench/perf.py" + (" --quick" if args.quick else ""),
        "machine": machine(), "throughput": throughput, "memory": memory, "mfu": mfu,
        "targets": {"fixed_ratio": ">= 1.0", "variable_ratio": ">= 1.3", "memory_ratio": "<= 0.25"},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("perf_quick.json" if args.quick else "perf.json")).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
