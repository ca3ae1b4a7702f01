"""A third-party scaling strategy, as an outside package would ship it (test fixture).

Discovered through the ``scaler_wizard.strategies`` entry point declared in the
``sw_demo_strategy-0.1.dist-info`` folder beside it; nothing is installed.
"""

from scaler_wizard.scaling.memory import StrategyPlan


class BiasOnlyStrategy:
    """Train only the biases and norms (BitFit-like): the smallest possible plugin."""

    name = "demo_bias_only"
    description = "train norms only (test plugin)"

    def plan(self, dims, options):
        return StrategyPlan(strategy="lora", lora_rank=1, lora_targets=(), train_norms=True)

    def prepare(self, model, options):
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
        return model
