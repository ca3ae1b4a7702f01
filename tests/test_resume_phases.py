"""Resume at every phase boundary (issue: a run killed after its last training step resumed into
an unscaled model and reported it as the result). For each phase a crash is injected at the
phase's own entry point, the run is resumed, and the resumed run must equal an uninterrupted
run of the same recipe: per-step losses, every final figure, the exported config and the
merged weights."""

from __future__ import annotations

import json

import pytest
from conftest import metric_by_step, write_recipe


class Crash(RuntimeError):
    pass


def _recipe(tmp_path, model_dir, name, **extra):
    return write_recipe(
        tmp_path / f"{name}.yaml", model_dir, tmp_path / "runs", run__run_id=name,
        context__schedule=[128, 256], training__steps_per_stage=[4, 4], training__snapshot_every=2,
        data__synthetic_passkey_share=0.25, context__gate_policy="continue", **extra,
    )


def _losses(run_dir):
    return metric_by_step(run_dir, "train/loss")


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    from scaler_wizard.pipeline import run

    tmp = tmp_path_factory.mktemp("phases-ref")
    model_dir = save_tiny_model(tmp / "tiny", "llama", tiny_tokenizer)
    result = run(_recipe(tmp, model_dir, "ref"), self_approve=True)
    return model_dir, result


def _crash_once(monkeypatch, target, name, *, call=1, after=False):
    """Make ``target.name`` raise Crash on its ``call``-th call (after running it when ``after``)."""
    original = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call and not after:
            raise Crash(f"injected crash entering {name}")
        out = original(*args, **kwargs)
        if calls["n"] == call and after:
            raise Crash(f"injected crash after {name}")
        return out

    monkeypatch.setattr(target, name, wrapper)


def _phase_patches():
    """phase -> (module or class holding the function, function name, call number, after)."""
    from scaler_wizard import models, pipeline, report, run_record
    from scaler_wizard.training import stage_loop

    return {
        # loading and base probes: nothing trained, no snapshot yet
        "base_probes": (pipeline, "probe_base", 1, True),
        # stage 1's probes, before its gate (after the last mid-stage snapshot)
        "stage_probes": (stage_loop.StageLoop, "_probe", 1, False),
        # stage 1's gate decided, its stage-complete snapshot committed, before stage 2
        "stage_complete_snapshot": (stage_loop.StageLoop, "_manual_gate", 1, False),
        # the last stage done and snapshotted: the final evaluation (the case)
        "final_evaluation": (pipeline, "final_probes", 1, False),
        # inside the export: the merged folder written, not yet published
        "export": (models, "publish_folder", 2, False),
        # the report
        "report": (report, "write_report", 1, False),
        # summary.json about to be written (patched by the test itself)
        "summary": (run_record, "write_json_atomic", 1, False),
    }


@pytest.mark.parametrize("phase", ["base_probes", "stage_probes", "stage_complete_snapshot", "final_evaluation",
                                   "export", "report", "summary"])
def test_resume_after_a_kill_at_each_phase_equals_the_uninterrupted_run(tmp_path, reference, monkeypatch, phase):
    from scaler_wizard.pipeline import run

    model_dir, ref = reference
    target, name, call, after = _phase_patches()[phase]
    if phase == "summary":  # only the summary write: status.json writes go through the same helper
        from scaler_wizard import run_record

        original = run_record.write_json_atomic

        def crash_summary(path, payload, **kw):
            if path.name == "summary.json":
                raise Crash("injected crash writing summary.json")
            return original(path, payload, **kw)

        monkeypatch.setattr(run_record, "write_json_atomic", crash_summary)
    else:
        _crash_once(monkeypatch, target, name, call=call, after=after)
    recipe = _recipe(tmp_path, model_dir, "crashy")
    with pytest.raises(Crash):
        run(recipe, self_approve=True)
    run_dir = tmp_path / "runs" / "crashy"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not (run_dir / "summary.json").exists()
    monkeypatch.undo()

    result = run(resume=run_dir, self_approve=True)
    assert _losses(run_dir) == _losses(ref.run_dir)
    assert result.summary["final"] == ref.summary["final"]
    assert result.summary["reached_length"] == ref.summary["reached_length"] == 256
    assert [o["decision"] for o in result.summary["stages"]] == [o["decision"] for o in ref.summary["stages"]]
    ref_config = json.loads((ref.run_dir / "model" / "config.json").read_text())
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["rope_parameters"] == ref_config["rope_parameters"]
    assert config["max_position_embeddings"] == ref_config["max_position_embeddings"] == 256
    a, b = _weights(run_dir), _weights(ref.run_dir)
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    assert not (run_dir / "model.partial").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
