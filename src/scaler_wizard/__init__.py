"""Scaler Wizard: grow an open causal language model's capacity and context window without
losing what it knew. The orchestration path is :func:`scaler_wizard.pipeline.run`."""

__version__ = "0.1.0"

__all__ = ["__version__"]
