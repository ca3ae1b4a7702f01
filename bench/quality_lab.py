"""Quality lab: small standalone loops that diagnose why retrieval does not transfer 256 -> 1024
on the embedded demo model, and measure named extension configurations (issue 13).

Plain PyTorch + transformers + PEFT; the position encoding is set with
``scaler_wizard.context.methods.apply_to_model``. Every configuration is trained from the same
base weights and evaluated on the same grid:

* passkey per depth (10 depths x 10 keys, exact match of the teacher-forced greedy answer) at
  256, 512 and 1024 tokens, on the probe's template (``PROBE_TEMPLATE``) and on the held-out
  template (``HELDOUT_TEMPLATE``), neither of which is ever used in training rows: training
  retrieval rows use ``TRAIN_TEMPLATES`` only;
* held-out perplexity at 256 and 1024 tokens (KJV held-out chapters).

The training loss is the sum of per-task means (LM, retrieval, copy), each weighted by the
configuration's ``weights``: five answer tokens cannot outweigh the LM loss silently. Every
``log_every`` steps the loop prints the per-task losses and the retrieval rows' answer-token
accuracy.

Usage:
    OMP_NUM_THREADS=1 python bench/quality_lab.py --configs base_noft yarn_noft --threads 1
    python bench/quality_lab.py --list
Results are appended as JSON lines to --out (default bench/results/quality_lab.jsonl) and the
table of this invocation is printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from scaler_wizard.context.methods import apply_to_model  # noqa: E402
from scaler_wizard.evaluation.passkey import (  # noqa: E402
    HELDOUT_TEMPLATE,
    KEY_RANGE,
    PROBE_TEMPLATE,
    MixedTemplateBuilder,
    PasskeyBuilder,
    passkey_grid,
)

ASSETS = ROOT / "src" / "scaler_wizard" / "assets"
BASE = 256
DEPTHS = [i / 9 for i in range(10)]


@dataclass
class Config:
    name: str
    note: str = ""
    method: str | None = "yarn"  # None: no position change at all (diagnosis at the base length)
    method_params: dict = field(default_factory=lambda: {"beta_fast": 4.0, "beta_slow": 1.0})
    target: int = 1024
    steps: int = 0
    lr: float = 2e-4
    warmup: int = 10
    trainable: str = "lora"  # lora | lora+norm+emb | full | lora+norm
    lora_r: int = 16
    row_len: int = 1024  # tokens per training row
    pose: bool = False  # PoSE: rows of BASE tokens whose position ids skip up to `target`
    mix: tuple[int, int, int] = (2, 1, 1)  # rows per step: LM, retrieval, copy
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    second_mention: bool = True  # loss on the key's second mention in retrieval rows
    max_minutes: float = 5.0
    eval_lengths: tuple[int, ...] = (256, 512, 1024)
    # "train": TRAIN_TEMPLATES only (the clean setting). "probe_DIAGNOSTIC": retrieval rows in the
    # probe's own template -- contaminated, only to ask whether the *positional* part can be learned
    # when the template is one the base already retrieves with; never a recipe.
    train_templates: str = "train"


CONFIGS: dict[str, Config] = {}


def _reg(c: Config) -> None:
    CONFIGS[c.name] = c


# --- no training: what the position encoding alone does ------------------------------------
_reg(Config("base_noft", "unscaled base, extrapolating", method="none", method_params={}, steps=0))
_reg(Config("yarn_noft", "YaRN x4 beta_fast 4 beta_slow 1 (demo), no training", steps=0))
_reg(Config("yarn32_noft", "YaRN x4 beta_fast 32 beta_slow 1 (transformers default)", steps=0,
            method_params={"beta_fast": 32.0, "beta_slow": 1.0}))
_reg(Config("linear_noft", "position interpolation x4, no training", method="linear", method_params={}, steps=0))
_reg(Config("ntk_noft", "static NTK x4, no training", method="ntk", method_params={}, steps=0))
# --- diagnosis at the base length: no position change ---------------------------------------
_reg(Config("diag256_pk_lr1e-3", "256 tokens, no scaling, retrieval rows only, LoRA lr 1e-3 (the demo's lr)",
            method=None, steps=80, lr=1e-3, row_len=256, mix=(0, 4, 0), max_minutes=3, eval_lengths=(256,)))
_reg(Config("diag256_pk_lr2e-4", "256 tokens, no scaling, retrieval rows only, LoRA lr 2e-4",
            method=None, steps=80, lr=2e-4, row_len=256, mix=(0, 4, 0), max_minutes=3, eval_lengths=(256,)))
_reg(Config("diag256_mix_lr2e-4", "256 tokens, no scaling, LM+retrieval+copy, LoRA lr 2e-4",
            method=None, steps=80, lr=2e-4, row_len=256, mix=(4, 4, 2), max_minutes=3, eval_lengths=(256,)))
# --- extension 256 -> 1024 ----------------------------------------------------------------------
# Budget: about 5 minutes of training on this CPU. Rows of 1024 tokens cost ~4x a 256-token row,
# so PoSE rows (256 tokens whose position ids skip up to 1024) buy ~4x more steps.
_reg(Config("demo_like", "the demo: YaRN x4 bf4, LoRA all-linear lr 1e-3, 1024 rows, LM+retrieval (no copy)",
            steps=110, lr=1e-3, mix=(1, 1, 0), second_mention=False))
_reg(Config("yarn_lne_1024", "YaRN x4 bf4, LoRA + norms + embeddings lr 2e-4, 1024 rows LM+retrieval",
            steps=60, lr=2e-4, mix=(1, 1, 0), trainable="lora+norm+emb"))
_reg(Config("pose_lora", "YaRN x4 bf4, LoRA only lr 2e-4, PoSE 256-token rows (1 LM + 3 retrieval)",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0)))
_reg(Config("pose_lne", "YaRN x4 bf4, LoRA + norms + embeddings lr 2e-4, PoSE 256-token rows",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm+emb"))
_reg(Config("pose_lnorm", "YaRN x4 bf4, LoRA + norms (embedding frozen) lr 2e-4, PoSE 256-token rows",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm"))
_reg(Config("pose_lne_lr5e-4", "as pose_lne with lr 5e-4",
            steps=120, lr=5e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm+emb"))
_reg(Config("pose_full", "YaRN x4 bf4, full fine-tuning lr 1e-4, PoSE 256-token rows",
            steps=120, lr=1e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="full"))
_reg(Config("pose_lne_probeDIAG", "pose_lne but retrieval rows in the PROBE template (contaminated diagnostic)",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm+emb",
            train_templates="probe_DIAGNOSTIC"))
_reg(Config("pose_full_probeDIAG", "pose_full but retrieval rows in the PROBE template (contaminated diagnostic)",
            steps=120, lr=1e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="full",
            train_templates="probe_DIAGNOSTIC"))
_reg(Config("pose_lne_bf32", "pose_lne with YaRN beta_fast 32 (more dimensions interpolated)",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm+emb",
            method_params={"beta_fast": 32.0, "beta_slow": 1.0}))
_reg(Config("pose_lne_linear", "pose_lne with linear interpolation x4",
            steps=120, lr=2e-4, row_len=BASE, pose=True, mix=(1, 3, 0), trainable="lora+norm+emb",
            method="linear", method_params={}))


# ------------------------------------------------------------------------------------------------
def load_texts(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (ASSETS / "demo_data" / f"{name}.jsonl").read_text().splitlines()]


def token_stream(tokenizer, texts: list[str], limit: int | None = None) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(" " + t, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
        if limit and len(ids) > limit:
            break
    return ids


class Rows:
    """Training rows: LM windows, retrieval rows (training templates only, depth-stratified),
    random-token copy rows. Each row is (ids, labels, position_ids)."""

    def __init__(self, tokenizer, cfg: Config, seed: int):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.eos = tokenizer.eos_token_id
        self.vocab = len(tokenizer)
        self.stream = token_stream(tokenizer, load_texts("train"), limit=400_000)
        if cfg.train_templates == "train":
            self.mixed = MixedTemplateBuilder(tokenizer, self.eos)  # never the probe / held-out template
        else:
            self.mixed = MixedTemplateBuilder(tokenizer, self.eos, [PROBE_TEMPLATE], allow_evaluation_templates=True)
        self.n_pk = 0

    def positions(self, n: int, boundary: int | None = None) -> list[int]:
        """PoSE (Zhu et al. 2023): two chunks; the second one's position ids jump by a skip so
        that relative distances up to the target length occur inside a BASE-token row."""
        if not self.cfg.pose:
            return list(range(n))
        if boundary is None:
            boundary = self.rng.randint(1, n - 1)
        skip = self.rng.randint(0, self.cfg.target - n)
        return list(range(boundary)) + list(range(boundary + skip, n + skip))

    def lm(self):
        n = self.cfg.row_len
        s = self.rng.randrange(0, len(self.stream) - n - 1)
        ids = self.stream[s : s + n]
        return ids, list(ids), self.positions(n)

    def retrieval(self):
        n = self.cfg.row_len
        depth = min(1.0, ((self.n_pk % 10) + self.rng.random()) / 10)  # stratified
        self.n_pk += 1
        builder = self.mixed.builder(rng=self.rng)
        length = n if self.rng.random() < 0.5 else self.rng.randint(builder.min_length(), n)
        ex = builder.build(length, depth, self.rng.randint(*KEY_RANGE))
        ids = ex.input_ids
        labels = [-100] * len(ids)
        for i in range(len(ex.prompt_ids), len(ids)):
            labels[i] = ids[i]
        if self.cfg.second_mention:
            m = builder.key_mentions(ex)
            if len(m) > 1:
                for j in range(m[1], m[1] + len(ex.answer_ids) - 1):
                    labels[j] = ids[j]
        # PoSE: the skip falls between the key sentence and the question, so the key-to-question
        # distance is stretched (the skip is what teaches long distances)
        boundary = self.rng.randint(ex.key_token_span[1], len(ex.prompt_ids) - 1) if self.cfg.pose else None
        pos = self.positions(len(ids), boundary)
        return self._pad(ids, labels, pos)

    def copy(self):
        n = self.cfg.row_len
        m = self.rng.randint(8, min(n // 2 - 2, 400))
        seq = [self.rng.randrange(1, self.vocab) for _ in range(m)]
        ids = [self.eos] + seq + [self.eos] + seq
        labels = [-100] * (m + 2) + seq
        return self._pad(ids, labels, self.positions(len(ids), m + 1))

    def _pad(self, ids, labels, pos):
        n = self.cfg.row_len
        k = n - len(ids)
        last = pos[-1]
        return ids + [self.eos] * k, labels + [-100] * k, pos + list(range(last + 1, last + 1 + k))

    def batch(self):
        n_lm, n_pk, n_cp = self.cfg.mix
        rows = [self.lm() for _ in range(n_lm)] + [self.retrieval() for _ in range(n_pk)] + [self.copy() for _ in range(n_cp)]
        kinds = [0] * n_lm + [1] * n_pk + [2] * n_cp
        t = lambda i: torch.tensor([r[i] for r in rows])
        return t(0), t(1), t(2), torch.tensor(kinds)


def task_losses(model, ids, labels, pos, kinds, weights):
    logits = model(input_ids=ids, position_ids=pos).logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(tgt.shape)
    mask = tgt != -100
    parts, total = {}, 0.0
    for k, name in enumerate(("lm", "retrieval", "copy")):
        sel = (kinds == k)[:, None] & mask
        if sel.any():
            parts[name] = (ce * sel).sum() / sel.sum()
            total = total + weights[k] * parts[name]
    stats = {f"loss/{k}": round(v.item(), 4) for k, v in parts.items()}
    # the retrieval rows' answer tokens: the last labelled run of each retrieval row
    pk = (kinds == 1).nonzero().flatten().tolist()
    if pk:
        acc, exact, ans_loss = [], [], []
        for r in pk:
            where = mask[r].nonzero().flatten()
            end = int(where[-1]) + 1
            start = end - 6  # " " + 5 digits
            pred = logits[r, start:end].argmax(-1)
            ok = pred == tgt[r, start:end]
            acc.append(ok.float().mean().item())
            exact.append(float(ok.all()))
            ans_loss.append(ce[r, start:end].mean().item())
        stats["answer/loss"] = round(sum(ans_loss) / len(ans_loss), 4)
        stats["answer/token_acc"] = round(sum(acc) / len(acc), 4)
        stats["answer/exact"] = round(sum(exact) / len(exact), 4)
    return total, stats


def make_trainable(model, cfg: Config):
    if cfg.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear", lora_dropout=0.0)
    )
    if "norm" in cfg.trainable or "emb" in cfg.trainable:
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if ("norm" in cfg.trainable and "norm" in name) or ("emb" in cfg.trainable and "embed_tokens" in name):
                p.requires_grad_(True)  # LongLoRA: norms and the (tied) embedding beside LoRA
    return model


@torch.no_grad()
def passkey_by_depth(model, tokenizer, length: int, template, keys: int = 10, seed: int = 2024) -> list[float]:
    builder = PasskeyBuilder(tokenizer, tokenizer.eos_token_id, template)
    grid = passkey_grid(builder, [length], DEPTHS, keys, seed)
    hits = [0] * len(DEPTHS)
    for d_i, d in enumerate(DEPTHS):
        exs = [ex for _, dd, ex in grid if dd == d]
        n = max(len(e) for e in exs)
        ids = torch.tensor([e.input_ids + [tokenizer.eos_token_id] * (n - len(e)) for e in exs])
        # right padding: causal, earlier positions unaffected; the LM head only where it is read
        hidden = model.model(input_ids=ids).last_hidden_state
        for r, e in enumerate(exs):
            p = len(e.prompt_ids)
            logits = model.lm_head(hidden[r, p - 1 : p - 1 + len(e.answer_ids)])
            hits[d_i] += logits.argmax(-1).tolist() == e.answer_ids
    return [h / keys for h in hits]


@torch.no_grad()
def perplexity(model, stream: list[int], length: int, windows: int) -> float:
    nll, n = 0.0, 0
    for w in range(windows):
        chunk = torch.tensor([stream[w * length : (w + 1) * length]])
        if chunk.size(1) < length:
            break
        out = model(input_ids=chunk, labels=chunk)
        nll += out.loss.item() * (length - 1)
        n += length - 1
    return math.exp(nll / n)


def evaluate(model, tokenizer, heldout_stream, lengths=(256, 512, 1024), keys=10) -> dict:
    """Passkey per depth at each length on both evaluation templates, held-out perplexity."""
    model.eval()
    res: dict = {}
    for L in lengths:
        for tname, tpl in (("probe", PROBE_TEMPLATE), ("heldout", HELDOUT_TEMPLATE)):
            by = passkey_by_depth(model, tokenizer, L, tpl, keys)
            res[f"pk@{L}_{tname}"] = round(sum(by) / len(by), 3)
            res[f"pk@{L}_{tname}_min_depth"] = min(by)
            res[f"pk@{L}_{tname}_by_depth"] = by
    res["ppl@256"] = round(perplexity(model, heldout_stream, 256, 64), 3)
    if max(lengths) >= 1024:
        res["ppl@1024"] = round(perplexity(model, heldout_stream, 1024, 16), 3)
    return res


def run(cfg: Config, model_dir: Path, seed: int, log) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    original = type(model.config).from_dict(model.config.to_dict())
    target = cfg.target if cfg.method is not None else BASE
    if cfg.method is not None:
        apply_to_model(model, cfg.method, BASE, cfg.target, cfg.method_params, original_config=original)
    heldout = token_stream(tokenizer, load_texts("heldout"), limit=70_000)
    t0 = time.time()
    trace = []
    steps_done = 0
    if cfg.steps:
        model = make_trainable(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        rows = Rows(tokenizer, replace(cfg, target=target), seed)
        model.train()
        for step in range(cfg.steps):
            if time.time() - t0 > cfg.max_minutes * 60:
                break
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            ids, labels, pos, kinds = rows.batch()
            loss, stats = task_losses(model, ids, labels, pos, kinds, cfg.weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps_done = step + 1
            if step % 10 == 0 or step + 1 == cfg.steps:
                entry = {"step": step, "loss": round(loss.item(), 4), **stats, "t": round(time.time() - t0, 1)}
                trace.append(entry)
                log(f"[{cfg.name}] " + json.dumps(entry))
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        n_train = 0
    train_min = (time.time() - t0) / 60
    res = evaluate(model, tokenizer, heldout, cfg.eval_lengths)
    return {"config": cfg.name, "note": cfg.note, "train_min": round(train_min, 2), "steps_done": steps_done,
            "trainable_params": n_train, "eval_min": round((time.time() - t0) / 60 - train_min, 2), **res,
            "trace": trace, "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("name", "note")},
            "model": str(model_dir), "seed": seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=["base_noft", "yarn_noft"])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--model", type=Path, default=ASSETS / "demo_model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="override every config's steps")
    ap.add_argument("--max-minutes", type=float, default=None, help="override the training time cap")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_lab.jsonl")
    args = ap.parse_args()
    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name:22s} {c.note}")
        return
    torch.set_num_threads(args.threads)
    table = []
    for name in args.configs:
        cfg = CONFIGS[name]
        if args.steps is not None and cfg.steps:
            cfg = replace(cfg, steps=args.steps)
        if args.max_minutes is not None:
            cfg = replace(cfg, max_minutes=args.max_minutes)
        res = run(cfg, args.model, args.seed, lambda s: print(s, flush=True))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
        short = {k: v for k, v in res.items() if k not in ("trace", "cfg") and not k.endswith("_by_depth")}
        print("RESULT " + json.dumps(short), flush=True)
        table.append(short)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
