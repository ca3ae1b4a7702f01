"""lm-evaluation-harness tasks as stage probes (``evaluation.lm_eval``): RULER's niah_single_1,
generated offline from the run's tokenizer, gating a stage of a tiny run of the embedded demo
model through ``pipeline.run``; the figures' names, the gate, and the preflight checks."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe

from scaler_wizard.evaluation.lm_eval_probe import LM_EVAL_PROBE, lm_eval_gate, task_figures
from scaler_wizard.evaluation.probes import ProbeResult
from scaler_wizard.recipe import LmEvalSection, resolve_path

DEMO = resolve_path("builtin:demo")
NIAH = "niah_single_1"


def _lm_eval_recipe(tmp_path, name, **lm_eval):
    """The demo model (native 256) to 512 in one stage of one step; the built-in probes kept
    small and out of the gate's way, lm-eval's NIAH at 256 and 512 on 2 examples each."""
    block = {"tasks": [NIAH], "limit": 2, "lengths": [256, 512], **lm_eval}
    return write_recipe(tmp_path / f"{name}.yaml", DEMO, tmp_path / "runs", run__run_id=name,
                        context__target_length=512, context__method_params={"beta_fast": 4, "beta_slow": 1},
                        training__steps_per_stage=1, training__micro_batch_size=1, training__snapshot_every=0,
                        evaluation={"passkey": {"enabled": False}, "short_context": {"enabled": False},
                                    "perplexity": {"windows": 1, "max_ratio_to_base": 1000.0},
                                    "lm_eval": block},
                        output__merge=False)


def test_niah_gates_a_stage_of_a_run(tmp_path):
    """A min score no model can meet (> 1) fails the stage's gate: the run completes with the
    verdict gates_failed (the CLI's exit 5); the figures are in metrics.jsonl, the stage's probes
    in summary.json and the stage-complete snapshot's metrics."""
    pytest.importorskip("lm_eval")
    from scaler_wizard.pipeline import run

    result = run(_lm_eval_recipe(tmp_path, "niah", min_scores={f"{NIAH}/score": 1.01}), self_approve=True)
    s, d = result.summary, result.run_dir
    events = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    figures = {e["metric"]: e["value"] for e in events if e["metric"].startswith("lm_eval/")}
    print("lm-eval figures of the demo model:", figures)
    assert set(figures) == {f"lm_eval/{NIAH}/score@256", f"lm_eval/{NIAH}/score@512"}
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    assert all(e["stage"] == 1 for e in events if e["metric"].startswith("lm_eval/"))

    (stage,) = s["stages"]
    lm = [p for p in stage["probes"] if p["probe"] == LM_EVAL_PROBE]
    assert [p["length"] for p in lm] == [256, 512] and all(p["error"] is None for p in lm)
    assert all(p["details"]["samples"][NIAH] == 2 for p in lm)
    assert not stage["gate_passed"] and stage["decision"] == "continue"
    assert [c.split(" = ")[0] for c in stage["failed_checks"]] == [f"lm_eval {NIAH}/score @256",
                                                                   f"lm_eval {NIAH}/score @512"]
    assert s["verdict"] == "gates_failed"
    assert any("needs >= 1.01" in r for r in s["verdict_reasons"])
    assert json.loads((d / "status.json").read_text())["state"] == "completed_gates_failed"


def test_the_probe_restores_train_mode_and_random_state_and_never_downloads(tmp_path):
    pytest.importorskip("lm_eval")
    import random

    import torch

    from scaler_wizard.evaluation.lm_eval_probe import LmEvalNetworkError, LmEvalProbe
    from scaler_wizard.models import load_causal_lm

    model, tokenizer = load_causal_lm(DEMO, dtype="float32", attn_implementation="sdpa")
    model.train()
    torch.manual_seed(3)
    random.seed(3)
    before = torch.get_rng_state(), random.getstate()
    probe = LmEvalProbe(LmEvalSection(tasks=[NIAH], limit=1, lengths=[256, 1024]), tokenizer)
    (result,) = probe.run(model, 512)  # 1024 is beyond the stage: not evaluated
    assert result.error is None and result.length == 256 and set(result.metrics) == {f"{NIAH}/score"}
    assert model.training
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    # the essay haystack comes from the Hub: offline, a typed input error naming the task
    essays = LmEvalProbe(LmEvalSection(tasks=["niah_single_2"], limit=1), tokenizer)
    with pytest.raises(LmEvalNetworkError, match="'niah_single_2' needs network"):
        essays.run(model, 256)
    assert model.training


def test_figures_from_lm_eval_results():
    results = {
        NIAH: {"alias": NIAH, "sample_len": 2, "4096,none": -1, "512,none": 0.5, "512_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1, "acc,none": 1},
        "ruler_fwe": {"512,none": -1},  # no sample fitted at this length: no figure
    }
    assert task_figures(results, 512) == {f"{NIAH}/score": 0.5, "gsm8k/exact_match:strict-match": 0.25,
                                          "gsm8k/acc": 1.0}


def test_the_gate_checks_every_length_and_never_passes_a_missing_figure():
    spec = LmEvalSection(tasks=[NIAH], min_scores={f"{NIAH}/score": 0.5})
    results = [ProbeResult(LM_EVAL_PROBE, 256, {f"{NIAH}/score": 0.5}),
               ProbeResult(LM_EVAL_PROBE, 512, {f"{NIAH}/score": 0.25}),
               ProbeResult(LM_EVAL_PROBE, 1024, {"other/acc": 1.0}),
               ProbeResult(LM_EVAL_PROBE, 2048, error="RuntimeError: boom"),
               ProbeResult("passkey", 512, {"accuracy": 0.0})]
    failed = lm_eval_gate(results, spec)
    assert failed == [f"lm_eval {NIAH}/score @512 = 0.250 (needs >= 0.5)",
                      f"lm_eval {NIAH}/score @1024: not measured (the tasks reported: other/acc)",
                      "lm_eval @2048: probe error (RuntimeError: boom)"]
    assert lm_eval_gate(results, None) == [] and lm_eval_gate(results, LmEvalSection(tasks=[NIAH])) == []


def test_recipe_refuses_a_gate_key_without_task_and_metric(tmp_path):
    from scaler_wizard.errors import RecipeError
    from scaler_wizard.recipe import load_recipe

    path = _lm_eval_recipe(tmp_path, "bad", min_scores={"score": 0.5})
    with pytest.raises(RecipeError, match=r"evaluation\.lm_eval\.min_scores.*<task>/<metric>"):
        load_recipe(path)


def test_preflight_names_unknown_and_network_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    from scaler_wizard.errors import RecipeError
    from scaler_wizard.preflight import check_inputs
    from scaler_wizard.recipe import load_recipe

    recipe, recipe_dir = load_recipe(_lm_eval_recipe(tmp_path, "tasks", tasks=[NIAH, "niah_singel_1",
                                                                               "ruler_qa_squad"],
                                                     lengths=[256, 4096]))
    with pytest.raises(RecipeError) as info:
        check_inputs(recipe, recipe_dir, source="r.yaml", read_data=False)
    problems = dict(info.value.problems)
    assert "unknown lm-eval task 'niah_singel_1'" in problems["evaluation.lm_eval.tasks[1]"]
    assert "did you mean" in problems["evaluation.lm_eval.tasks[1]"] and NIAH in problems["evaluation.lm_eval.tasks[1]"]
    assert "needs network" in problems["evaluation.lm_eval.tasks[2]"]
    assert "beyond context.target_length" in problems["evaluation.lm_eval.lengths[1]"]
    assert "evaluation.lm_eval.tasks[0]" not in problems


def test_preflight_without_lm_eval_says_what_to_install(tmp_path, monkeypatch):
    from scaler_wizard.errors import RecipeError
    from scaler_wizard.evaluation import lm_eval_probe
    from scaler_wizard.preflight import check_inputs
    from scaler_wizard.recipe import load_recipe

    monkeypatch.setattr(lm_eval_probe, "lm_eval_available", lambda: False)
    recipe, recipe_dir = load_recipe(_lm_eval_recipe(tmp_path, "missing"))
    with pytest.raises(RecipeError, match=r"evaluation\.lm_eval: .*pip install 'scaler-wizard\[lm-eval\]'"):
        check_inputs(recipe, recipe_dir, source="r.yaml", read_data=False)
