"""Build the embedded demo model: corpus split, BPE tokenizer, tiny Llama, pretraining.

Seeded and deterministic on CPU (same torch build, same thread count). It writes

    src/scaler_wizard/assets/demo_data/{train,heldout}.jsonl   KJV chapters, one "text" per line
    src/scaler_wizard/assets/demo_model/                        config, safetensors (fp16), tokenizer,
                                                                MODEL_CARD.md, build_log.json

The corpus is the King James Version (public domain), shipped gzipped in data/corpus/.

Passkey retrieval does not come for free in a tiny model (see shared REFERENCES: a plain 50/50
mix of text and passkey examples stayed at 0%). The mixture below therefore trains three things
in every batch, each with its own mean loss so that none drowns the others:

  * language modelling on 256-token KJV windows (all tokens);
  * passkey examples in the fixed protocol of ``scaler_wizard.evaluation.passkey`` with the
    haystack growing from 64 to 256 tokens over the first 40% of steps (curriculum: short
    distances first), loss on the key's second mention and on the answer;
  * a random-token repeat task (Olsson et al. 2022: induction heads form on repeated random
    sequences), loss on the second copy, which teaches the copy circuit directly.

Usage:  python scripts/build_demo_model.py --steps 3000
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from scaler_wizard.evaluation.passkey import KEY_RANGE, PasskeyBuilder, passkey_grid  # noqa: E402

ASSETS = ROOT / "src" / "scaler_wizard" / "assets"
CORPUS = ROOT / "data" / "corpus" / "kjv.txt.gz"
CONTEXT = 256
VOCAB = 4096
EOS = "<|endoftext|>"


def split_corpus() -> tuple[list[str], list[str]]:
    """Chapters of the KJV; every 20th chapter is held out (deterministic)."""
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
    chapters, cur = [], []
    for line in text.splitlines():
        if line.startswith("## "):
            if cur:
                chapters.append(" ".join(cur))
            cur = []
        else:
            cur.append(line.strip())
    if cur:
        chapters.append(" ".join(cur))
    train = [c for i, c in enumerate(chapters) if i % 20 != 7]
    heldout = [c for i, c in enumerate(chapters) if i % 20 == 7]
    return train, heldout


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split one by one so that a passkey is always five tokens of the same kind.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    from scaler_wizard.evaluation.passkey import FILLER_SENTENCES, KEY_SENTENCE, QUESTION

    protocol = [" ".join(FILLER_SENTENCES), KEY_SENTENCE.format(key=12345), QUESTION] * 50
    tok.train_from_iterator(texts + protocol, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=CONTEXT
    )


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


class Mixture:
    """Produces (input_ids, labels_lm, labels_passkey, labels_copy) batches of CONTEXT tokens."""

    def __init__(self, tokenizer, train_texts: list[str], seed: int):
        self.rng = random.Random(seed)
        self.eos = tokenizer.eos_token_id
        ids: list[int] = []
        for t in train_texts:
            ids.extend(tokenizer.encode(" " + t, add_special_tokens=False))
            ids.append(self.eos)
        self.stream = torch.tensor(ids, dtype=torch.long)
        self.passkey = PasskeyBuilder(tokenizer, self.eos)

    def lm_row(self):
        start = self.rng.randrange(0, len(self.stream) - CONTEXT - 1)
        row = self.stream[start : start + CONTEXT].clone()
        return row, row.clone()

    def passkey_row(self, max_len: int):
        length = self.rng.randint(48, max_len)
        ex = self.passkey.build(length, self.rng.random(), self.rng.randint(*KEY_RANGE))
        ids = ex.input_ids
        labels = [-100] * len(ids)
        n_ans = len(ex.answer_ids)
        for i in range(len(ids) - n_ans, len(ids)):
            labels[i] = ids[i]
        # Second mention of the key inside "The pass key is K. Remember it. K is the pass key."
        s, e = ex.key_token_span
        key_tokens = ex.answer_ids[1:] if len(ex.answer_ids) > 1 else ex.answer_ids
        span = ids[s:e]
        first = _find(span, key_tokens, 0)
        second = _find(span, key_tokens, first + 1) if first >= 0 else -1
        if second >= 0:
            for j in range(second, second + len(key_tokens)):
                labels[s + j] = ids[s + j]
        return self._pad(ids, labels)

    def copy_row(self):
        n = self.rng.randint(8, 120)
        seq = [self.rng.randrange(1, VOCAB) for _ in range(n)]
        ids = [self.eos] + seq + [self.eos] + seq
        labels = [-100] * (n + 2) + seq
        return self._pad(ids, labels)

    def _pad(self, ids, labels):
        ids = ids[:CONTEXT] + [self.eos] * (CONTEXT - len(ids))
        labels = labels[:CONTEXT] + [-100] * (CONTEXT - len(labels))
        return torch.tensor(ids), torch.tensor(labels)

    def batch(self, n_lm: int, n_pk: int, n_copy: int, max_pk_len: int):
        rows = [self.lm_row() for _ in range(n_lm)]
        rows += [self.passkey_row(max_pk_len) for _ in range(n_pk)]
        rows += [self.copy_row() for _ in range(n_copy)]
        ids = torch.stack([r[0] for r in rows])
        labels = torch.stack([r[1] for r in rows])
        kinds = [0] * n_lm + [1] * n_pk + [2] * n_copy
        return ids, labels, torch.tensor(kinds)


def _find(hay: list[int], needle: list[int], start: int) -> int:
    for i in range(start, len(hay) - len(needle) + 1):
        if hay[i : i + len(needle)] == needle:
            return i
    return -1


def mixture_loss(model, ids, labels, kinds):
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(tgt.shape)
    mask = (tgt != -100).float()
    parts = {}
    for k, name in enumerate(("lm", "passkey", "copy")):
        sel = (kinds == k).float()[:, None] * mask
        if sel.sum() > 0:
            parts[name] = (ce * sel).sum() / sel.sum()
    return sum(parts.values()), {k: v.item() for k, v in parts.items()}


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int, seed: int) -> float:
    builder = PasskeyBuilder(tokenizer, tokenizer.eos_token_id)
    depths = [i / 9 for i in range(10)]
    grid = passkey_grid(builder, [length], depths, max(1, trials // len(depths)), seed)
    hits = 0
    for _, _, ex in grid:
        ids = torch.tensor([ex.input_ids])
        pred = model(input_ids=ids).logits[0, len(ex.prompt_ids) - 1 : -1].argmax(-1).tolist()
        hits += pred == ex.answer_ids
    return hits / len(grid)


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], windows: int = 64) -> float:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(" " + t, add_special_tokens=False))
        if len(ids) > windows * CONTEXT + 1:
            break
    nll, n = 0.0, 0
    for w in range(windows):
        chunk = torch.tensor([ids[w * CONTEXT : (w + 1) * CONTEXT]])
        out = model(input_ids=chunk, labels=chunk)
        nll += out.loss.item() * (CONTEXT - 1)
        n += CONTEXT - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=12, help="rows per step (5 LM, 5 passkey, 2 copy at 12)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (recorded in the log)")
    ap.add_argument("--out", type=Path, default=ASSETS / "demo_model")
    ap.add_argument("--card-only", action="store_true", help="rewrite MODEL_CARD.md from build_log.json")
    args = ap.parse_args()
    if args.card_only:
        write_model_card(args.out, json.loads((args.out / "build_log.json").read_text()))
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    train, heldout = split_corpus()
    write_jsonl(ASSETS / "demo_data" / "train.jsonl", train)
    write_jsonl(ASSETS / "demo_data" / "heldout.jsonl", heldout)
    tokenizer = train_tokenizer(train)
    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params} train_chapters={len(train)} heldout_chapters={len(heldout)}", flush=True)

    mix = Mixture(tokenizer, train, args.seed)
    n_pk = args.batch * 5 // 12
    n_copy = max(1, args.batch * 2 // 12)
    n_lm = args.batch - n_pk - n_copy
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log = []
    best = (-1.0, None)
    tmp_dir = args.out.parent / (args.out.name + ".partial")
    model.train()
    stopped_early_at = None
    for step in range(args.steps):
        if args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60:
            stopped_early_at = step
            print(f"time limit reached at step {step}", flush=True)
            break
        max_pk = int(64 + (CONTEXT - 64) * min(1.0, step / (0.4 * args.steps)))
        ids, labels, kinds = mix.batch(n_lm, n_pk, n_copy, max_pk)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, parts = mixture_loss(model, ids, labels, kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {parts} max_pk={max_pk} t={time.time()-t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = passkey_accuracy(model, tokenizer, CONTEXT, 50, seed=99)
            ppl = heldout_perplexity(model, tokenizer, heldout, windows=32)
            model.train()
            entry = {"step": step + 1, "passkey@256": acc, "heldout_ppl@256": ppl, "elapsed_s": time.time() - t0, **parts}
            log.append(entry)
            print("EVAL", json.dumps(entry), flush=True)
            if acc >= best[0]:
                best = (acc, step + 1)
                save(model, tokenizer, tmp_dir, log)

    # Final figures of the kept checkpoint on fresh seeds (not the ones used for selection).
    from transformers import AutoModelForCausalLM

    kept = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32).eval()
    final = {
        "kept_step": best[1],
        "passkey@256": passkey_accuracy(kept, tokenizer, CONTEXT, 200, seed=2024),
        "heldout_ppl@256": heldout_perplexity(kept, tokenizer, heldout, windows=128),
        "params": n_params,
        "steps": args.steps,
        "stopped_early_at": stopped_early_at,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "wall_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    print("FINAL", json.dumps(final), flush=True)
    save(kept, tokenizer, tmp_dir, log, final)
    if args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    tmp_dir.rename(args.out)
    write_model_card(args.out, json.loads((args.out / "build_log.json").read_text()))


def write_model_card(out: Path, log: dict) -> None:
    final = log["final"]
    evals = "\n".join(
        f"| {e['step']} | {e['passkey@256']:.2f} | {e['heldout_ppl@256']:.1f} |" for e in log["evals"]
    )
    card = f"""# Scaler Wizard demo model

A tiny Llama-architecture causal language model embedded in the package so that `make demo`
can show a real context extension (256 -> 1024 tokens) on one CPU. It is a teaching model: it
knows the style of the King James Bible and one trick, passkey retrieval; it is not useful for
anything else.

## How it was made

`python scripts/build_demo_model.py --steps {final['steps']} --batch {final['batch']}` (seed {final['seed']},
{final['torch']}, 2 CPU threads). Deterministic for a given torch build and thread count.

* **Data**: the King James Version (public domain; `data/corpus/SOURCES.md`), split by chapter:
  every 20th chapter (offset 7) is held out (`assets/demo_data/heldout.jsonl`), the rest trains
  (`assets/demo_data/train.jsonl`).
* **Tokenizer**: byte-level BPE, 4096 tokens, digits split one by one, trained with `tokenizers`
  on the training chapters plus the passkey protocol's sentences.
* **Model**: Llama, 6 layers, hidden 256, 8 heads (4 KV heads), MLP 768, RoPE theta 10000,
  tied embeddings, {final['params']:,} parameters, trained at a 256-token context; weights stored
  as fp16 safetensors.
* **Training**: AdamW (lr {final['lr']}, betas 0.9/0.95, weight decay 0.1, warmup 100, cosine to 10%),
  {final['batch']} rows of 256 tokens per step mixing three tasks with equal weight: language modelling
  on KJV windows; passkey examples in the fixed protocol of
  `scaler_wizard/evaluation/passkey.py` (haystack growing from 64 to 256 tokens over the first
  40% of steps, loss on the key's second mention and on the answer); and a random-token repeat
  task (Olsson et al. 2022, induction heads). The checkpoint kept is the evaluation with the best
  passkey accuracy (step {final['kept_step']}){'; the build stopped early at step ' + str(final['stopped_early_at']) + ' (time limit)' if final.get('stopped_early_at') else ''}.

## Measured (fresh seeds, not the ones used to pick the checkpoint)

| figure | value |
|---|---:|
| held-out perplexity at 256 tokens (128 windows) | {final['heldout_ppl@256']:.2f} |
| passkey retrieval at 256 tokens (200 trials, 10 depths, exact match) | {final['passkey@256']:.1%} |
| build wall time | {final['wall_s'] / 60:.0f} min |

## Evaluations during the build (50 trials, 32 windows)

| step | passkey@256 | held-out ppl@256 |
|---:|---:|---:|
{evals}
"""
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def save(model, tokenizer, out: Path, log: list, final: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # fp16 on disk halves the asset; training continues in fp32 on the untouched parameters.
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=half)
    tokenizer.save_pretrained(out)
    (out / "build_log.json").write_text(json.dumps({"evals": log, "final": final}, indent=2))


if __name__ == "__main__":
    main()
