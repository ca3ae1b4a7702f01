"""Associative recall inside text (MQAR-like, Arora et al. 2023 'Zoology'): teach content-based
retrieval that is not bound to one wording. Warm start from the shipped demo model."""
import sys, time, random, math, os
import torch
sys.path.insert(0, "/work/main/src"); sys.path.insert(0, "/work/main/scripts")
from transformers import AutoModelForCausalLM, AutoTokenizer
import build_demo_model as B
from scaler_wizard.evaluation.passkey import PROBE_TEMPLATE, HELDOUT_TEMPLATE

torch.set_num_threads(2)
AR_LEN = int(os.environ.get("AR_LEN", 256))
steps = int(sys.argv[1]); lr = float(sys.argv[2]); n_ar = int(sys.argv[3]); out_dir = sys.argv[4]
src = os.environ.get("SRC", "/work/main/src/scaler_wizard/assets/demo_model")
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
train, heldout = B.split_corpus()
mix = B.Mixture(tok, train, 7, templates="mixed", stratify_depth=True, full_length_share=0.5)
rng = random.Random(0)
EOS = tok.eos_token_id
# marker words: frequent whole-word tokens (leading-space tokens made of letters)
vocab = tok.get_vocab()
words = sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
colon = tok.encode(":", add_special_tokens=False)
print("marker words", len(words), "digit ids", digits, flush=True)

def ar_row(r, L=256):
    """KJV text with k (word: digits) pairs inserted at random places, ending with a query."""
    k = r.randint(1, 4)
    pairs = []
    used = set()
    for _ in range(k):
        w = r.choice(words)
        while w in used:
            w = r.choice(words)
        used.add(w)
        pairs.append((w, [r.choice(digits) for _ in range(5)]))
    qi = r.randrange(k)
    q_w, q_d = pairs[qi]
    tail = [q_w] + colon
    need = sum(1 + len(colon) + 5 for _ in pairs) + len(tail) + 5 + 1
    n_text = max(8, r.randint(L // 4, L) - need)
    start = r.randrange(0, len(mix.stream) - n_text - 1)
    text = mix.stream[start:start + n_text].tolist()
    cuts = sorted(r.randrange(0, n_text) for _ in pairs)
    ids, prev = [EOS], 0
    for c, (w, d) in zip(cuts, pairs):
        ids += text[prev:c] + [w] + colon + d
        prev = c
    ids += text[prev:] + tail
    labels = [-100] * len(ids) + q_d
    ids = ids + q_d
    return ids[:L], labels[:L]

def ar_batch(n, r, L=256):
    rows = [ar_row(r, L) for _ in range(n)]
    M = max(len(a) for a, _ in rows)
    return (torch.tensor([a + [EOS] * (M - len(a)) for a, _ in rows]),
            torch.tensor([b + [-100] * (M - len(b)) for _, b in rows]))

@torch.no_grad()
def ar_acc(model, n=60, L=256):
    r = random.Random(321)
    ids, lab = ar_batch(n, r, L)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    t = lab[:, 1:]; m = t != -100
    ok = ((pred == t) | ~m).all(-1)
    return ((pred == t) & m).sum().item() / m.sum().item(), ok.float().mean().item()

opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
t0 = time.time()
model.eval(); print("init ar_acc", ar_acc(model), flush=True); model.train()
best = -1
for step in range(steps):
    for pg in opt.param_groups: pg["lr"] = lr * min(1, (step + 1) / 20)
    ids, lab = ar_batch(n_ar, rng, AR_LEN)
    lg = model(input_ids=ids).logits[:, :-1].float(); t = lab[:, 1:]
    la = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1), ignore_index=-100)
    lmi, lml, kinds = mix.batch(2, 2, 0, 256)
    l2, parts = B.mixture_loss(model, lmi, lml, kinds)
    loss = la + l2
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 10 == 0:
        print(f"step {step} ar {la.item():.3f} {parts} t={time.time()-t0:.0f}", flush=True)
    if (step + 1) % 100 == 0:
        model.eval()
        pk = B.passkey_by_depth(model, tok, 256, PROBE_TEMPLATE, 10, 5, seed=5)
        ho = B.passkey_by_depth(model, tok, 256, HELDOUT_TEMPLATE, 10, 5, seed=5)
        a = ar_acc(model)
        ppl = B.heldout_perplexity(model, tok, heldout, windows=8)
        print("EVAL", step + 1, "ar_tok/exact", [round(x, 3) for x in a], "pk", round(sum(pk)/10, 2), pk, "heldout", round(sum(ho)/10, 2), "ppl", round(ppl, 1), f"t={time.time()-t0:.0f}", flush=True)
        score = min(pk) + sum(pk) / 10 + sum(ho) / 10
        if score > best:
            best = score
            B.save(model, tok, __import__("pathlib").Path(out_dir), [])
        model.train()
