"""Drop-in probes used by the tests: one that measures something, one that always fails."""

from scaler_wizard.evaluation.probes import ProbeResult


class MeanLogitProbe:
    name = "mean_logit"

    def __init__(self, tokens: int = 16):
        self.tokens = tokens

    def run(self, model, length, ctx):
        import torch

        ids = torch.tensor([ctx.heldout_stream[: min(self.tokens, length)]])
        with torch.no_grad():
            value = model(input_ids=ids).logits.float().mean().item()
        return ProbeResult(self.name, length, {"mean": value})


class ExplodingProbe:
    name = "exploding"

    def run(self, model, length, ctx):
        raise RuntimeError("boom")
