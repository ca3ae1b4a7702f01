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

The shipped model (issue 13, from scratch, the tokenizer and data split kept; ~40 min on 2 idle cores):

    python scripts/build_demo_model.py --tokenizer-from src/scaler_wizard/assets/demo_model \
        --out /tmp/demo_model --templates mixed --mix 4,4,2,2 --copy-curriculum 0.35 \
        --copy-warmup-steps 400 --full-length-share 0.3 --steps 2200 --eval-every 200 --threads 2

adds a fourth task, associative recall inside text (MQAR, Arora et al. 2023), and a copy warm-up:
the first 400 steps train only short random copies over the 64 most frequent tokens, where a
fresh model of this shape learns to copy within ~250 steps; the copy alphabet then grows whenever
the copy loss is well below its uniform level. Without the warm-up (copy rows over the whole
vocabulary mixed in from step 0, the previous build) the copy loss never left the uniform 8.3 nats
in 2,000 steps and the model's retrieval was a trick bound to the probe's wording and to short
distances; with it, retrieval is content-based and survives YaRN/NTK scaling zero-shot
(docs/retrieval_diagnosis.md, section 8).

Original usage:  python scripts/build_demo_model.py --steps 3000

Warm start (issue 13: a model that retrieves at every depth at its native length, with needle
formats of more than one template). The tokenizer and the data split are kept as they are:

    python scripts/build_demo_model.py --init-from src/scaler_wizard/assets/demo_model \
        --out /work/staging/demo_model --templates mixed --steps 900 --lr 5e-4 --warmup 30

``--templates mixed`` draws each passkey row's needle template from the probe's template and the
training templates of ``scaler_wizard.evaluation.passkey`` (never the held-out one), depths are
stratified (row i of a step falls in depth decile i mod 10, so every step covers all depths),
and half the passkey rows are full-length (256) while the rest draw a length in [min, 256].
Checkpoints are selected on the *worst* depth of the probe template (then the mean), and the
final figures are per depth on fresh keys for the probe template and the held-out template.
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

from scaler_wizard.evaluation.passkey import (
    HELDOUT_TEMPLATE,
    KEY_RANGE,
    PROBE_TEMPLATE,
    TRAIN_TEMPLATES,
    PasskeyBuilder,
    passkey_grid,
)

ASSETS = ROOT / "src" / "scaler_wizard" / "assets"
CORPUS = ROOT / "data" / "corpus" / "kjv.txt.gz"
CONTEXT = 256
VOCAB = 4096
EOS = "<|endoftext|>"


def split_corpus() -> tuple[list[str], list[str]]:
    """Chapters of the KJV; every 20th chapter is held out (deterministic)."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = f.read()
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
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


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

    def __init__(self, tokenizer, train_texts: list[str], seed: int, templates: str = "probe",
                 stratify_depth: bool = False, full_length_share: float = 0.0, probe_share: float | None = None):
        self.rng = random.Random(seed)
        self.eos = tokenizer.eos_token_id
        ids: list[int] = []
        for t in train_texts:
            ids.extend(tokenizer.encode(" " + t, add_special_tokens=False))
            ids.append(self.eos)
        self.stream = torch.tensor(ids, dtype=torch.long)
        chosen = {"probe": [PROBE_TEMPLATE], "mixed": [PROBE_TEMPLATE, *TRAIN_TEMPLATES], "train": list(TRAIN_TEMPLATES)}[templates]
        assert HELDOUT_TEMPLATE not in chosen
        self.builders = [PasskeyBuilder(tokenizer, self.eos, t) for t in chosen]
        self.passkey = self.builders[0]
        self.stratify_depth = stratify_depth
        self.full_length_share = full_length_share
        self.probe_share = probe_share
        self._pk_rows = 0
        # Copy alphabet ordered by frequency in the training stream (digits first): the copy task
        # starts on a small alphabet, where induction heads form within a few hundred steps on this
        # machine (a fresh model on the whole 4096-token vocabulary stayed at the uniform loss for
        # 400 steps; bench/results/issue13_s5/induction_exp.py), and the alphabet then grows.
        counts = torch.bincount(self.stream, minlength=VOCAB)
        counts[self.eos] = -1
        digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        order = [i for i in torch.argsort(counts, descending=True).tolist() if i not in digits and i != self.eos]
        self.copy_order = digits + order
        self.copy_alphabet_size = VOCAB - 1
        # Associative recall inside text (MQAR, Arora et al. 2023): "word: ddddd" pairs inserted in
        # KJV windows, the row ends with one of the words and a colon, the target is its five digits.
        vocab = tokenizer.get_vocab()
        self.recall_words = sorted(i for t, i in vocab.items() if t.startswith("\u0120") and t[1:].isalpha() and len(t) > 3)
        self.recall_digits = digits
        self.colon = tokenizer.encode(":", add_special_tokens=False)

    def lm_row(self):
        start = self.rng.randrange(0, len(self.stream) - CONTEXT - 1)
        row = self.stream[start : start + CONTEXT].clone()
        return row, row.clone()

    def passkey_row(self, max_len: int):
        if len(self.builders) == 1:
            builder = self.passkey
        elif self.probe_share is not None and self.builders[0].template is PROBE_TEMPLATE:
            # the probe's template with probability probe_share, else one of the training templates
            if self.rng.random() < self.probe_share:
                builder = self.builders[0]
            else:
                builder = self.builders[1 + self.rng.randrange(len(self.builders) - 1)]
        else:
            builder = self.builders[self.rng.randrange(len(self.builders))]
        lo = max(48, builder.min_length())
        if self.full_length_share and self.rng.random() < self.full_length_share:
            length = max_len
        else:
            length = self.rng.randint(lo, max(lo, max_len))
        if self.stratify_depth:
            depth = min(1.0, ((self._pk_rows % 10) + self.rng.random()) / 10)
        else:
            depth = self.rng.random()
        self._pk_rows += 1
        ex = builder.build(length, depth, self.rng.randint(*KEY_RANGE))
        ids = ex.input_ids
        labels = [-100] * len(ids)
        n_ans = len(ex.answer_ids)
        for i in range(len(ids) - n_ans, len(ids)):
            labels[i] = ids[i]
        # Second mention of the key inside the key sentence (a copy target), e.g. in
        # "The pass key is K. Remember it. K is the pass key."
        mentions = builder.key_mentions(ex)
        if len(mentions) > 1:
            n_digits = len(builder._enc(str(ex.key)))
            for j in range(mentions[1], mentions[1] + n_digits):
                labels[j] = ids[j]
        return self._pad(ids, labels)

    def copy_row(self, max_n: int = 60, length: int = CONTEXT):
        """A repeated random sequence (Olsson et al. 2022), loss on the second copy. One episode
        per row: packing several episodes over the same small alphabet made the earlier
        occurrences of a token ambiguous, and no copying formed in 300 steps."""
        alphabet = self.copy_order[: max(16, self.copy_alphabet_size)]
        n = self.rng.randint(8, max_n)
        seq = [self.rng.choice(alphabet) for _ in range(n)]
        ids = [self.eos] + seq + [self.eos] + seq
        labels = [-100] * (n + 2) + seq
        return self._pad(ids, labels, length)

    def copy_warmup_batch(self, rows: int = 32, length: int = 64):
        """Phase 0: many short copy rows (the setting in which a fresh model of this shape
        learned to copy within ~250 steps on this machine)."""
        rs = [self.copy_row(max_n=length // 2 - 2, length=length) for _ in range(rows)]
        return torch.stack([r[0] for r in rs]), torch.stack([r[1] for r in rs]), torch.full((rows,), 2)

    def recall_row(self):
        r = self.rng
        k = r.randint(1, 4)
        words = r.sample(self.recall_words, k)
        pairs = [(w, [r.choice(self.recall_digits) for _ in range(5)]) for w in words]
        q_w, q_d = pairs[r.randrange(k)]
        tail = [q_w, *self.colon]
        need = k * (1 + len(self.colon) + 5) + len(tail) + 5 + 1
        n_text = max(8, r.randint(CONTEXT // 4, CONTEXT) - need)
        start = r.randrange(0, len(self.stream) - n_text - 1)
        text = self.stream[start : start + n_text].tolist()
        cuts = sorted(r.randrange(0, n_text) for _ in pairs)
        ids, prev = [self.eos], 0
        for c, (w, d) in zip(cuts, pairs):
            ids += text[prev:c] + [w, *self.colon, *d]
            prev = c
        ids += text[prev:] + tail
        labels = [-100] * len(ids) + q_d
        return self._pad(ids + q_d, labels)

    def _pad(self, ids, labels, length: int = CONTEXT):
        ids = ids[:length] + [self.eos] * (length - len(ids))
        labels = labels[:length] + [-100] * (length - len(labels))
        return torch.tensor(ids), torch.tensor(labels)

    def batch(self, n_lm: int, n_pk: int, n_copy: int, max_pk_len: int, n_recall: int = 0):
        rows = [self.lm_row() for _ in range(n_lm)]
        rows += [self.passkey_row(max_pk_len) for _ in range(n_pk)]
        rows += [self.copy_row() for _ in range(n_copy)]
        rows += [self.recall_row() for _ in range(n_recall)]
        ids = torch.stack([r[0] for r in rows])
        labels = torch.stack([r[1] for r in rows])
        kinds = [0] * n_lm + [1] * n_pk + [2] * n_copy + [3] * n_recall
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
    for k, name in enumerate(("lm", "passkey", "copy", "recall")):
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
def passkey_by_depth(model, tokenizer, length: int, template=PROBE_TEMPLATE, depths: int = 10,
                     keys: int = 10, seed: int = 2024) -> list[float]:
    """Exact-match retrieval per depth (``depths`` evenly spaced in [0, 1]) over ``keys`` keys."""
    builder = PasskeyBuilder(tokenizer, tokenizer.eos_token_id, template)
    ds = [i / (depths - 1) for i in range(depths)]
    grid = passkey_grid(builder, [length], ds, keys, seed)
    hits = {d: 0 for d in ds}
    for _, d, ex in grid:
        ids = torch.tensor([ex.input_ids])
        pred = model(input_ids=ids).logits[0, len(ex.prompt_ids) - 1 : -1].argmax(-1).tolist()
        hits[d] += pred == ex.answer_ids
    return [hits[d] / keys for d in ds]


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
    ap.add_argument("--init-from", type=Path, default=None,
                    help="warm start from this model folder (weights and tokenizer; the tokenizer is kept)")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="from-scratch weights with this model folder's tokenizer (the demo data split is not rewritten)")
    ap.add_argument("--templates", choices=["probe", "mixed"], default=None,
                    help="needle templates of the passkey rows (default: probe; mixed with --init-from)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--mix", default=None, help="rows per step as LM,PASSKEY,COPY (default from --batch)")
    ap.add_argument("--full-length-share", type=float, default=None,
                    help="share of passkey rows at the full 256 tokens (default 0; 0.5 with --init-from)")
    ap.add_argument("--probe-share", type=float, default=None,
                    help="with --templates mixed: share of passkey rows in the probe's template (default: uniform over templates)")
    ap.add_argument("--copy-curriculum", type=float, default=0.0,
                    help="adaptive copy alphabet: start at the 64 most frequent tokens (digits first) and grow it by 25%% "
                         "whenever the copy loss is below this fraction of ln(alphabet size) (0: whole vocabulary from the start)")
    ap.add_argument("--copy-warmup-steps", type=int, default=0,
                    help="first steps with copy rows only (induction heads form before the other tasks start)")
    ap.add_argument("--curriculum", type=float, default=None,
                    help="share of steps over which the passkey haystack grows from 64 to 256 (0.4; 0 with --init-from)")
    args = ap.parse_args()
    if args.card_only:
        write_model_card(args.out, json.loads((args.out / "build_log.json").read_text()))
        return

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    warm = args.init_from is not None
    templates = args.templates or ("mixed" if warm else "probe")
    full_share = args.full_length_share if args.full_length_share is not None else (0.5 if warm else 0.0)
    curriculum = args.curriculum if args.curriculum is not None else (0.0 if warm else 0.4)
    train, heldout = split_corpus()
    if warm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # The tokenizer and the shipped data split stay exactly as they are.
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    elif args.tokenizer_from is not None:
        from transformers import AutoTokenizer

        # From scratch with the shipped tokenizer and data split (the shipped demo data stays untouched).
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
        model = build_model(args.seed)
    else:
        write_jsonl(ASSETS / "demo_data" / "train.jsonl", train)
        write_jsonl(ASSETS / "demo_data" / "heldout.jsonl", heldout)
        tokenizer = train_tokenizer(train)
        model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params} train_chapters={len(train)} heldout_chapters={len(heldout)} init_from={args.init_from} "
          f"templates={templates} full_length_share={full_share} curriculum={curriculum}", flush=True)

    mix = Mixture(tokenizer, train, args.seed, templates=templates, stratify_depth=warm or templates != "probe",
                  full_length_share=full_share, probe_share=args.probe_share)
    n_recall = 0
    if args.mix:
        counts = [int(x) for x in args.mix.split(",")]
        n_lm, n_pk, n_copy = counts[:3]
        n_recall = counts[3] if len(counts) > 3 else 0
        args.batch = sum(counts)
    else:
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
    warmup = args.warmup

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
    copy_ema = None
    if args.copy_curriculum > 0:
        mix.copy_alphabet_size = 64
    for step in range(args.steps):
        if args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60:
            stopped_early_at = step
            print(f"time limit reached at step {step}", flush=True)
            break
        max_pk = CONTEXT if curriculum <= 0 else int(64 + (CONTEXT - 64) * min(1.0, step / (curriculum * args.steps)))
        # Adaptive alphabet: grow by 25% only once the copy loss is well below the uniform loss of
        # the current alphabet (the circuit works there); a fixed schedule outran the circuit's
        # formation (the loss tracked ln|alphabet| for 250 steps).
        if (args.copy_curriculum > 0 and step % 10 == 0 and copy_ema is not None
                and copy_ema < args.copy_curriculum * math.log(mix.copy_alphabet_size)
                and mix.copy_alphabet_size < VOCAB - 1):
            mix.copy_alphabet_size = min(VOCAB - 1, int(mix.copy_alphabet_size * 1.25))
        if step < args.copy_warmup_steps:
            # Phase 0: copy rows only, so that induction heads form while attention is plastic.
            ids, labels, kinds = mix.copy_warmup_batch()
        else:
            ids, labels, kinds = mix.batch(n_lm, n_pk, n_copy, max_pk, n_recall)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, parts = mixture_loss(model, ids, labels, kinds)
        if "copy" in parts:
            copy_ema = parts["copy"] if copy_ema is None else 0.9 * copy_ema + 0.1 * parts["copy"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {parts} max_pk={max_pk} alphabet={mix.copy_alphabet_size} t={time.time()-t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            if warm or templates != "probe":
                # selection: worst depth of the probe template (10 depths x 10 keys), then the mean
                per_depth = passkey_by_depth(model, tokenizer, CONTEXT, PROBE_TEMPLATE, 10, 10, seed=99)
                acc = sum(per_depth) / len(per_depth)
                score = min(per_depth) + acc / 100
            else:
                acc = passkey_accuracy(model, tokenizer, CONTEXT, 50, seed=99)
                per_depth, score = None, acc
            ppl = heldout_perplexity(model, tokenizer, heldout, windows=32)
            model.train()
            entry = {"step": step + 1, "passkey@256": acc, "heldout_ppl@256": ppl, "elapsed_s": time.time() - t0, **parts}
            if per_depth is not None:
                entry["passkey@256_by_depth"] = per_depth
                # reported, never selected on: the template no training row uses
                held = passkey_by_depth(model, tokenizer, CONTEXT, HELDOUT_TEMPLATE, 10, 5, seed=99)
                entry["passkey@256_heldout"] = sum(held) / len(held)
            if n_copy:
                entry["copy_alphabet"] = mix.copy_alphabet_size
            log.append(entry)
            print("EVAL", json.dumps(entry), flush=True)
            if score >= best[0]:
                best = (score, step + 1)
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
        "max_minutes": args.max_minutes,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "wall_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "init_from": str(args.init_from) if warm else None,
        "templates": templates,
        "mix": [n_lm, n_pk, n_copy],
        "warmup": warmup,
        "full_length_share": full_share,
        "curriculum": curriculum,
        "probe_share": args.probe_share,
        "threads": args.threads,
        "command": "python scripts/build_demo_model.py " + " ".join(sys.argv[1:]),
    }
    final["mix"] = [n_lm, n_pk, n_copy, n_recall]
    final["copy_curriculum"] = args.copy_curriculum
    final["copy_warmup_steps"] = args.copy_warmup_steps
    final["copy_alphabet_final"] = mix.copy_alphabet_size
    if warm or templates != "probe":
        for name, tpl in (("probe", PROBE_TEMPLATE), ("heldout", HELDOUT_TEMPLATE)):
            by_depth = passkey_by_depth(kept, tokenizer, CONTEXT, tpl, 10, 20, seed=2024)
            final[f"passkey@256_{name}_by_depth"] = by_depth
            final[f"passkey@256_{name}"] = sum(by_depth) / len(by_depth)
    if warm:
        prev_log = args.init_from / "build_log.json"
        if prev_log.exists():
            pf = json.loads(prev_log.read_text()).get("final") or {}
            final["previous_build"] = (
                f"init_from={pf.get('init_from')} steps={pf.get('steps')} lr={pf.get('lr')} batch={pf.get('batch')} "
                f"templates={pf.get('templates', 'probe')} kept_step={pf.get('kept_step')} seed={pf.get('seed')}"
            )
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
        f"| {e['step']} | {e['passkey@256']:.2f} | "
        + (f"{min(e['passkey@256_by_depth']):.2f} | {e['passkey@256_heldout']:.2f} | " if "passkey@256_heldout" in e else "– | – | ")
        + f"{e['heldout_ppl@256']:.1f} |"
        for e in log["evals"]
    )
    card = f"""# Scaler Wizard demo model

A tiny Llama-architecture causal language model embedded in the package so that `make demo`
can show a real context extension (256 -> 1024 tokens) on one CPU. It is a teaching model: it
knows the style of the King James Bible and one trick, passkey retrieval; it is not useful for
anything else.

## How it was made

`{final.get('command') or f"python scripts/build_demo_model.py --steps {final['steps']} --batch {final['batch']}"}` (seed {final['seed']},
{final['torch']}, {final.get('threads', 2)} CPU threads{'; a warm start, see below' if final.get('init_from') else ''}). Deterministic for a given torch build and thread count.

* **Data**: the King James Version (public domain; `data/corpus/SOURCES.md`), split by chapter:
  every 20th chapter (offset 7) is held out (`assets/demo_data/heldout.jsonl`), the rest trains
  (`assets/demo_data/train.jsonl`).
* **Tokenizer**: byte-level BPE, 4096 tokens, digits split one by one, trained with `tokenizers`
  on the training chapters plus the passkey protocol's sentences.
* **Model**: Llama, 6 layers, hidden 256, 8 heads (4 KV heads), MLP 768, RoPE theta 10000,
  tied embeddings, {final['params']:,} parameters, trained at a 256-token context; weights stored
  as fp16 safetensors.
* **Training**: AdamW (lr {final['lr']}, betas 0.9/0.95, weight decay 0.1, warmup {final.get('warmup', 100)}, cosine to 10%),
  {final['batch']} rows of 256 tokens per step{_mix_text(final)}.
  The loss is the sum of each task's mean token loss, so that no task's few target tokens drown (or are drowned by) the others. The
  checkpoint kept is the evaluation with the best *worst-depth* passkey accuracy on the probe's
  template (step {final['kept_step']}){'; the build stopped early at step ' + str(final['stopped_early_at']) + ' (time limit)' if final.get('stopped_early_at') else ''}.

{_warm_section(final)}{_depth_section(final)}## Measured (fresh seeds, not the ones used to pick the checkpoint)

| figure | value |
|---|---:|
| held-out perplexity at 256 tokens (128 windows) | {final['heldout_ppl@256']:.2f} |
| passkey retrieval at 256 tokens (200 trials, 10 depths, exact match) | {final['passkey@256']:.1%} |
| build wall time | {final['wall_s'] / 60:.0f} min |

## Evaluations during the build (10 depths x 10 keys of the probe template, or 50 trials; held-out template 10 x 5; 32 windows)

| step | passkey@256 | worst depth | held-out template | held-out ppl@256 |
|---:|---:|---:|---:|---:|
{evals}
"""
    (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def _mix_text(final: dict) -> str:
    mix = final.get("mix") or []
    if len(mix) < 4 or not mix[3]:
        return (" mixing three tasks with equal weight: language modelling on KJV windows; passkey examples in "
                "the fixed protocol of `scaler_wizard/evaluation/passkey.py` (loss on the key's second mention "
                "and on the answer); and a random-token repeat task (Olsson et al. 2022, induction heads)")
    n_lm, n_pk, n_copy, n_recall = mix
    warm = final.get("copy_warmup_steps") or 0
    return f""" ({n_lm} language modelling, {n_pk} passkey, {n_copy} copy, {n_recall} recall):

  1. *copy warm-up* ({warm} steps): only short repeated random sequences (32 rows of 64 tokens, loss
     on the second copy, alphabet = the 64 most frequent tokens, digits first). A fresh model of this
     shape learns to copy there within ~250 steps; on the whole 4,096-token vocabulary, or mixed
     with the other tasks from step 0, the copy loss stayed at the uniform level (the previous build
     never left it in 2,000 steps) and its retrieval stayed a template-bound trick;
  2. then four tasks in every batch: language modelling on KJV windows; passkey rows in the probe's
     template and the five training templates of `scaler_wizard/evaluation/passkey.py` (never the
     held-out one), depths stratified, haystacks growing from 64 to 256 tokens, loss on the key's
     second mention and the answer; copy rows (the alphabet grows by 25% whenever the copy loss is
     below {final.get('copy_curriculum')} x ln(alphabet); it ended at {final.get('copy_alphabet_final')} tokens);
     and associative recall inside KJV text (MQAR, Arora et al. 2023: `word: ddddd` pairs at random
     places, the row ends with one of the words and a colon, loss on its five digits)"""


def _depth_section(final: dict) -> str:
    if final.get("init_from") or not final.get("passkey@256_probe_by_depth"):
        return ""  # the warm-start section carries the same table
    depths = [f"{i / 9:.2f}" for i in range(10)]
    rows = []
    for name in ("probe", "heldout"):
        by = final[f"passkey@256_{name}_by_depth"]
        rows.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in by) + f" | {sum(by) / len(by):.2f} |")
    return f"""## Passkey at 256 tokens per depth

20 fresh keys per depth; the held-out template (`HELDOUT_TEMPLATE`) is never used by any training row:

| template | {' | '.join(depths)} | mean |
|---|{'---:|' * 11}
{chr(10).join(rows)}

"""


def _warm_section(final: dict) -> str:
    if not final.get("init_from"):
        return ""
    depths = [f"{i / 9:.2f}" for i in range(10)]
    rows = []
    for name in ("probe", "heldout"):
        by = final.get(f"passkey@256_{name}_by_depth")
        if by:
            rows.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in by) + f" | {sum(by) / len(by):.2f} |")
    prev = final.get("previous_build")
    chain = ""
    if prev:
        chain = (f"\nThis build warm-started from weights that were themselves built by: "
                 f"`{prev}`.\n")
    return f"""## Warm start (issue 13)

Warm-started from `{final['init_from']}` with the tokenizer and the data split unchanged:
`python scripts/build_demo_model.py --init-from {final['init_from']} --templates {final['templates']} --mix {','.join(map(str, final['mix']))} --steps {final['steps']} --lr {final['lr']} --warmup {final['warmup']} --threads {final['threads']}{' --probe-share ' + str(final['probe_share']) if final.get('probe_share') is not None else ''}{' --max-minutes ' + str(final['max_minutes']) if final.get('max_minutes') else ''}`.
Passkey rows draw their needle template from the probe's template and the training templates
(`TRAIN_TEMPLATES` in `scaler_wizard/evaluation/passkey.py`), never the held-out one; depths are
stratified (every step covers all ten depth deciles) and {final['full_length_share']:.0%} of the passkey
rows are full-length. The checkpoint kept is the one with the best worst-depth probe accuracy.
{chain}
Passkey at 256 tokens per depth (20 fresh keys per depth; the held-out template is never trained on):

| template | {' | '.join(depths)} | mean |
|---|{'---:|' * 11}
{chr(10).join(rows)}

"""


def save(model, tokenizer, out: Path, log: list, final: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # fp16 on disk halves the asset; training continues in fp32 on the untouched parameters.
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=half)
    tokenizer.save_pretrained(out)
    (out / "build_log.json").write_text(json.dumps({"evals": log, "final": final}, indent=2))


if __name__ == "__main__":
    main()
