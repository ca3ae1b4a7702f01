"""Quick experiment: can the demo model learn an induction/copy mechanism fast?"""
import sys, time, random, math, json
import torch
sys.path.insert(0, "/work/main/src"); sys.path.insert(0, "/work/main/scripts")
from transformers import AutoModelForCausalLM, AutoTokenizer
import build_demo_model as B
from scaler_wizard.evaluation.passkey import PROBE_TEMPLATE, HELDOUT_TEMPLATE, TRAIN_TEMPLATES

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
steps = int(sys.argv[1]); lr = float(sys.argv[2]); ncopy = int(sys.argv[3])
src = "/work/main/src/scaler_wizard/assets/demo_model"
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
train, heldout = B.split_corpus()
mix = B.Mixture(tok, train, 7, templates="mixed", stratify_depth=True, full_length_share=0.5)
rng = random.Random(0)
EOS = tok.eos_token_id
import os
ALO, AHI = int(os.environ.get("ALO", 1)), int(os.environ.get("AHI", 4096))
NLM = int(os.environ.get("NLM", 4)); NPK = int(os.environ.get("NPK", 2))

def copy_batch(n_rows, lo, hi, rng):
    rows = []
    for _ in range(n_rows):
        n = rng.randint(lo, hi)
        seq = rng.sample(range(ALO, AHI), n)
        ids = [EOS] + seq + [EOS] + seq
        lab = [-100] * (n + 2) + seq
        rows.append((ids, lab))
    L = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [EOS] * (L - len(r[0])) for r in rows])
    lab = torch.tensor([r[1] + [-100] * (L - len(r[1])) for r in rows])
    return ids, lab

@torch.no_grad()
def copy_acc(model, n=64, lo=8, hi=40):
    r = random.Random(123)
    ids, lab = copy_batch(n, lo, hi, r)  # same alphabet as training
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    t = lab[:, 1:]; m = t != -100
    return ((pred == t) & m).sum().item() / m.sum().item()

opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
t0 = time.time()
model.eval(); print("init copy_acc", copy_acc(model), flush=True); model.train()
for step in range(steps):
    g = lr * min(1, (step + 1) / 20)
    for pg in opt.param_groups: pg["lr"] = g
    ids, lab = copy_batch(ncopy, 4, 40, rng)
    out = model(input_ids=ids)
    lg = out.logits[:, :-1].float(); t = lab[:, 1:]
    lc = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1), ignore_index=-100)
    if NLM + NPK:
        lmi, lml, kinds = mix.batch(NLM, NPK, 0, 256)
        l2, parts = B.mixture_loss(model, lmi, lml, kinds)
    else:
        l2, parts = 0, {}
    loss = lc + (l2 if NLM + NPK else 0)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 25 == 0:
        print(f"step {step} copy {lc.item():.3f} {parts} t={time.time()-t0:.0f}", flush=True)
    if (step + 1) % 100 == 0:
        model.eval()
        pk = B.passkey_by_depth(model, tok, 256, PROBE_TEMPLATE, 10, 5, seed=5)
        ho = B.passkey_by_depth(model, tok, 256, HELDOUT_TEMPLATE, 10, 5, seed=5)
        print("EVAL", step + 1, "copy_acc", round(copy_acc(model), 3), "pk", round(sum(pk)/10, 2), min(pk), "heldout", round(sum(ho)/10, 2), "ppl", round(B.heldout_perplexity(model, tok, heldout, windows=8), 1), f"t={time.time()-t0:.0f}", flush=True)
        model.train()
