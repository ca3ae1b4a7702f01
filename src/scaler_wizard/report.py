"""The run report: report/report.html with PNG plots (perplexity and bits per byte against
context length for the base and the scaled model, passkey accuracy by depth and length) and
the gate decisions per stage."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def _plain_numbers(ax: Any) -> None:
    """Tick labels as plain numbers (256, 512, 60) rather than powers (2^8, 6x10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())


def verdict_html(summary: dict[str, Any]) -> str:
    """The report's first line: passed, or gates failed with the reasons, in red."""
    if summary.get("verdict") == "passed":
        return (f'<p class="verdict pass">PASSED: every gate passed; the model reached '
                f'{summary.get("reached_length")} tokens.</p>')
    reasons = "; ".join(summary.get("verdict_reasons") or []) or "see the stages below"
    return (f'<p class="verdict fail">GATES FAILED: the run ended at {summary.get("reached_length")} of '
            f'{summary.get("target_length")} tokens ({html.escape(reasons)}).</p>')


def _plots(out: Path, summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    base, final = summary["base"], summary["final"]
    for metric, label in (("perplexity", "perplexity"), ("bits_per_byte", "bits per byte")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for figures, name in ((base, "base (unscaled)"), (final, "scaled")):
            pts = sorted((int(k.split("@")[1]), v) for k, v in figures.items() if k.startswith(metric + "@") and v)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_numbers(ax)
        ceiling = (summary.get("thresholds") or {}).get("perplexity_max")
        if metric == "perplexity" and ceiling:
            ax.axhline(ceiling, color="#b00020", linestyle="--", label="gate: max perplexity")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fname = f"{metric}_vs_length.png"
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    passkey = [(f, n) for f, n in ((base, "base (unscaled)"), (final, "scaled"))
               if any(k.startswith("passkey@") for k in f)]
    if passkey:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for figures, name in passkey:
            pts = sorted((int(k.split("@")[1]), v) for k, v in figures.items() if k.startswith("passkey@"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        floor = (summary.get("thresholds") or {}).get("passkey_min_accuracy")
        if floor is not None:
            ax.axhline(floor, color="#b00020", linestyle="--", label="gate: min accuracy")
        ax.set_xscale("log", base=2)
        _plain_numbers(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "passkey_vs_length.png", dpi=110)
        plt.close(fig)
        names.append("passkey_vs_length.png")
    grid = summary.get("passkey_by_depth") or {}
    if grid:
        lengths = sorted(grid, key=int)
        depths = sorted({d for v in grid.values() if v for d in v}, key=float)
        data = [[(grid[L] or {}).get(d, float("nan")) for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title("passkey accuracy (scaled model)")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(out / "passkey_heatmap.png", dpi=110)
        plt.close(fig)
        names.append("passkey_heatmap.png")
    return names


def write_report(run_dir: Path, summary: dict[str, Any], base_results: list, final_results: list) -> Path:
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    images = _plots(out, summary)
    rows = "".join(
        f"<tr><td>{s['index']}</td><td>{s['length']}</td><td>{s['steps_trained']}</td>"
        f"<td>{html.escape(s['decision'])}</td><td>{html.escape('; '.join(s['failed_checks']) or 'all checks passed')}</td></tr>"
        for s in summary["stages"]
    )
    head = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{'' if v is None else (f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
        for k, v in summary["headline"].items()
    )
    imgs = "".join(f'<img src="{html.escape(n)}" alt="{html.escape(n)}">' for n in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Scaler Wizard report {html.escape(summary['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}img{{margin:8px;max-width:48%}}.verdict{{font-size:1.3em;font-weight:bold;padding:8px}}.pass{{color:#176b1f;background:#e6f4e6}}.fail{{color:#fff;background:#b00020}}</style></head>
<body><h1>Run {html.escape(summary['run_id'])}</h1>
{verdict_html(summary)}
<p>{html.escape(str(summary['model']))}: {summary['base_length']} &rarr; {summary['target_length']} tokens with
<b>{html.escape(summary['method'])}</b>; reached {summary['reached_length']}.</p>
<h2>Headline</h2><table>{head}</table>
<h2>Stages and gates</h2><table><tr><th>stage</th><th>length</th><th>steps</th><th>decision</th><th>checks</th></tr>{rows}</table>
<h2>Plots</h2>{imgs}</body></html>"""
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
