"""Evaluation probes: perplexity (with bits per byte), passkey retrieval grid, short-context
regression. Every probe follows one protocol and returns a :class:`ProbeResult`; a probe that
raises is reported as an error result and never crashes the run.

Bits per byte (nats of the predicted tokens / (ln 2 x UTF-8 bytes of the same text)) is the
tokenizer-independent figure the spec's open question on normalising metrics asks for; every
perplexity is also reported relative to the base model on the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .passkey import PasskeyBuilder, passkey_grid


@dataclass
class ProbeResult:
    probe: str
    length: int
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ProbeContext:
    """What a probe may use: the tokenizer, held-out token stream and texts, and the base figures."""

    tokenizer: Any
    heldout_stream: list[int]
    base_length: int
    baseline: dict[str, float] = field(default_factory=dict)  # e.g. {"perplexity@256": 12.3}
    batch_size: int = 4


@runtime_checkable
class Probe(Protocol):
    name: str

    def run(self, model: Any, length: int, ctx: ProbeContext) -> ProbeResult: ...


def _device(model: Any):
    return next(model.parameters()).device


class PerplexityProbe:
    """Perplexity over non-overlapping held-out windows of ``length`` tokens."""

    name = "perplexity"

    def __init__(self, windows: int = 16):
        self.windows = windows

    def run(self, model, length, ctx):
        import torch

        stream = ctx.heldout_stream
        n = min(self.windows, (len(stream) - 1) // length)
        if n < 1:
            return ProbeResult(self.name, length, error=f"held-out data has fewer than {length} tokens")
        nll, tokens, n_bytes = 0.0, 0, 0
        device = _device(model)
        with torch.no_grad():
            for start in range(0, n, ctx.batch_size):
                rows = [stream[w * length : (w + 1) * length] for w in range(start, min(n, start + ctx.batch_size))]
                ids = torch.tensor(rows, device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
                )
                nll += ce.item()
                tokens += ids[:, 1:].numel()
                n_bytes += sum(len(ctx.tokenizer.decode(r[1:]).encode("utf-8")) for r in rows)
        ppl = math.exp(nll / tokens)
        metrics = {"perplexity": ppl, "bits_per_byte": nll / (math.log(2) * max(1, n_bytes)), "windows": n}
        base = ctx.baseline.get(f"perplexity@{length}")
        if base:
            metrics["perplexity_change_pct"] = 100.0 * (ppl / base - 1)
        return ProbeResult(self.name, length, metrics)


class PasskeyProbe:
    """Passkey retrieval on a depths grid (protocol in ``evaluation/passkey.py``), exact match."""

    name = "passkey"

    def __init__(self, trials: int = 50, depths: list[float] | None = None, seed: int = 4242):
        self.trials = trials
        self.depths = depths or [0.0, 0.25, 0.5, 0.75, 1.0]
        self.seed = seed

    def run(self, model, length, ctx):
        import torch

        builder = PasskeyBuilder(ctx.tokenizer, ctx.tokenizer.bos_token_id)
        per_cell = max(1, math.ceil(self.trials / len(self.depths)))
        grid = passkey_grid(builder, [length], self.depths, per_cell, self.seed + length)
        pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        device = _device(model)
        hits_by_depth: dict[float, list[int]] = {d: [] for d in self.depths}
        with torch.no_grad():
            for start in range(0, len(grid), ctx.batch_size):
                batch = grid[start : start + ctx.batch_size]
                width = max(len(ex) for _, _, ex in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (_, _, ex) in enumerate(batch):
                    ids[i, : len(ex)] = torch.tensor(ex.input_ids)
                    mask[i, : len(ex)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for i, (_, depth, ex) in enumerate(batch):
                    p = len(ex.prompt_ids)
                    pred = logits[i, p - 1 : p - 1 + len(ex.answer_ids)].argmax(-1).tolist()
                    hits_by_depth[depth].append(int(pred == ex.answer_ids))
        all_hits = [h for hs in hits_by_depth.values() for h in hs]
        metrics = {"accuracy": sum(all_hits) / len(all_hits), "trials": len(all_hits)}
        by_depth = {f"{d:.2f}": sum(h) / len(h) for d, h in hits_by_depth.items()}
        return ProbeResult(self.name, length, metrics, {"accuracy_by_depth": by_depth})


class ShortContextProbe:
    """Perplexity at the base context compared with the base model (regression in %)."""

    name = "short_context"

    def __init__(self, windows: int = 16):
        self._ppl = PerplexityProbe(windows)

    def run(self, model, length, ctx):
        res = self._ppl.run(model, ctx.base_length, ctx)
        if res.error:
            return ProbeResult(self.name, ctx.base_length, error=res.error)
        metrics = dict(res.metrics)
        base = ctx.baseline.get(f"perplexity@{ctx.base_length}")
        metrics["regression_pct"] = 100.0 * (metrics["perplexity"] / base - 1) if base else float("nan")
        return ProbeResult(self.name, ctx.base_length, metrics)


BUILTIN_PROBES: dict[str, type] = {
    "perplexity": PerplexityProbe,
    "passkey": PasskeyProbe,
    "short_context": ShortContextProbe,
}


def run_probe(probe: Probe, model: Any, length: int, ctx: ProbeContext) -> ProbeResult:
    """Run one probe; any exception becomes an error result (the run goes on)."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return probe.run(model, length, ctx)
    except Exception as exc:  # noqa: BLE001 - a probe may fail in any way
        return ProbeResult(getattr(probe, "name", type(probe).__name__), length, error=f"{type(exc).__name__}: {exc}")
    finally:
        if was_training:
            model.train()
