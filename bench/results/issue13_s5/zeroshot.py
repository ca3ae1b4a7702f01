"""Zero-shot position-method check of a model folder: passkey per depth (probe / held-out
templates) at 256/512/1024 and perplexity, for none / yarn bf4 / yarn bf32 / ntk / linear.
usage: zeroshot.py MODEL_DIR KEYS METHOD[,METHOD...]"""
import sys, json, copy
import torch
sys.path.insert(0, "/work/main/src"); sys.path.insert(0, "/work/main/bench")
torch.set_num_threads(1)
import quality_lab as Q
from scaler_wizard.context.methods import apply_to_model
from transformers import AutoModelForCausalLM, AutoTokenizer
src, keys, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
tok = AutoTokenizer.from_pretrained(src)
held = Q.token_stream(tok, Q.load_texts("heldout"), limit=70_000)
P = {"none": (None, {}), "yarn": ("yarn", {"beta_fast": 4.0, "beta_slow": 1.0}), "yarn32": ("yarn", {"beta_fast": 32.0, "beta_slow": 1.0}),
     "ntk": ("ntk", {}), "linear": ("linear", {}), "dynamic": ("dynamic", {})}
for m in methods:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    orig = type(model.config).from_dict(model.config.to_dict())
    meth, params = P[m]
    if meth:
        apply_to_model(model, meth, 256, 1024, params, original_config=orig)
    r = Q.evaluate(model, tok, held, (256, 512, 1024), keys)
    print(m, json.dumps({k: v for k, v in r.items() if not k.endswith("by_depth")}), flush=True)
    for L in (256, 512, 1024):
        print("   ", L, "probe", r[f"pk@{L}_probe_by_depth"], "held", r[f"pk@{L}_heldout_by_depth"], flush=True)
