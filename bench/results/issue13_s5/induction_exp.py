"""How fast does a fresh 6x256 demo-shaped Llama learn to copy (induction) on CPU?
usage: induction_exp.py STEPS LR VOCAB_SUBSET N_COPY N_LM THREADS"""
import sys, time, random, math
import torch
sys.path.insert(0, "/work/main/src"); sys.path.insert(0, "/work/main/scripts")
import build_demo_model as B
from transformers import AutoTokenizer
steps, lr, V, n_copy, n_lm, th = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(th)
tok = AutoTokenizer.from_pretrained("/work/main/src/scaler_wizard/assets/demo_model")
model = B.build_model(1234)
rng = random.Random(0)
EOS = tok.eos_token_id
L = int(__import__("os").environ.get("ROWLEN", 128))
if n_lm:
    train, _ = B.split_corpus()
    stream = []
    for t in train[:300]:
        stream += tok.encode(" " + t, add_special_tokens=False) + [EOS]
    stream = torch.tensor(stream)
alphabet = list(range(1, 4096)); rng.shuffle(alphabet); alphabet = alphabet[:V]
def copy_row():
    n = rng.randint(8, L // 2 - 2)
    seq = [rng.choice(alphabet) for _ in range(n)]
    ids = [EOS] + seq + [EOS] + seq
    lab = [-100] * (n + 2) + seq
    ids += [EOS] * (L - len(ids)); lab += [-100] * (L - len(lab))
    return ids, lab
opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
t0 = time.time()
for step in range(steps):
    for g in opt.param_groups: g["lr"] = lr * min(1, (step + 1) / 30)
    rows = [copy_row() for _ in range(n_copy)]
    ids = torch.tensor([r[0] for r in rows]); lab = torch.tensor([r[1] for r in rows])
    logits = model(input_ids=ids).logits[:, :-1]
    loss_c = torch.nn.functional.cross_entropy(logits.reshape(-1, 4096), lab[:, 1:].reshape(-1), ignore_index=-100)
    loss = loss_c
    if n_lm:
        starts = [rng.randrange(0, len(stream) - L - 1) for _ in range(n_lm)]
        x = torch.stack([stream[s:s + L] for s in starts])
        loss_lm = model(input_ids=x, labels=x).loss
        loss = loss + loss_lm
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 20 == 0:
        with torch.no_grad():
            acc = ((logits.argmax(-1) == lab[:, 1:]) & (lab[:, 1:] != -100)).sum().item() / (lab[:, 1:] != -100).sum().item()
        print(f"step {step} copy {loss_c.item():.3f} acc {acc:.2f} lm {loss_lm.item() if n_lm else 0:.3f} t {time.time()-t0:.0f}", flush=True)
