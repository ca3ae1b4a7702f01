import pytest

from scaler_wizard.context.schedule import build_stages, plan_lengths
from scaler_wizard.errors import PlanError


def test_default_doubling():
    assert plan_lengths(256, 1024) == [512, 1024]
    assert plan_lengths(4096, 32768) == [8192, 16384, 32768]
    assert plan_lengths(256, 700) == [512, 700]


@pytest.mark.parametrize("base,target", [(256, 256), (512, 256)])
def test_target_not_above_base(base, target):
    with pytest.raises(PlanError, match="larger than the base"):
        plan_lengths(base, target)


@pytest.mark.parametrize(
    "schedule,msg",
    [([1024, 512], "not longer"), ([512, 768], "must equal"), ([256, 1024], "must exceed the base"),
     ([512, 2048, 1024], "not longer"), ([], "empty")],
)
def test_explicit_schedule_validated(schedule, msg):
    with pytest.raises(PlanError, match=msg):
        plan_lengths(256, 1024, schedule)


def test_stages_carry_budget_and_checks():
    stages = build_stages(256, 1024, "yarn", {}, [10, 20], passkey_min=0.8, ppl_max_ratio=1.2,
                          short_max_regression_pct=5)
    assert [(s.index, s.length, s.steps) for s in stages] == [(1, 512, 10), (2, 1024, 20)]
    assert {c.probe for c in stages[0].checks} == {"passkey", "perplexity", "short_context"}
    with pytest.raises(PlanError, match="budgets"):
        build_stages(256, 1024, "yarn", {}, [10], passkey_min=0.8)


def test_worst_depth_gate_fails_a_model_that_retrieves_only_near_the_ends():
    """min_depth_accuracy gates the worst depth: a mean above min_accuracy is not enough."""
    from scaler_wizard.evaluation.figures import gate
    from scaler_wizard.evaluation.probes import ProbeResult

    (stage,) = build_stages(256, 512, "yarn", {}, 10, passkey_min=0.8, passkey_min_depth=0.8)
    assert [c.metric for c in stage.checks] == ["", "accuracy_worst_depth"]
    ends_only = ProbeResult("passkey", 512, {"accuracy": 0.9, "accuracy_worst_depth": 0.5})
    assert gate(stage, [ends_only], None) == ["passkey worst-depth accuracy @512 = 0.500 (needs >= 0.8)"]
    everywhere = ProbeResult("passkey", 512, {"accuracy": 0.9, "accuracy_worst_depth": 0.8})
    assert gate(stage, [everywhere], None) == []
    (ungated,) = build_stages(256, 512, "yarn", {}, 10, passkey_min=0.8)
    assert gate(ungated, [ends_only], None) == []
