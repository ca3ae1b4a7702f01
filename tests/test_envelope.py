"""Safety Envelope: every rule and action on synthetic series; telegrams; the Trainer callback
halting a tiny real run on NaN and on an operator abort."""

from __future__ import annotations

import json
import math
import random

import pytest
from pydantic import ValidationError

from scaler_wizard.safety.envelope import (
    EnvelopeConfig,
    RollbackPolicy,
    SafetyEnvelope,
    SpikeRuleConfig,
    robust_z,
)
from scaler_wizard.safety.telegrams import (
    ControlInbox,
    TelegramWriter,
    append_control_command,
    read_telegram,
    read_telegram_history,
)
from scaler_wizard.telemetry.schemas import schema_problems


def clean_loss(n: int, seed: int = 0) -> list[float]:
    """A decaying loss with 2% multiplicative noise, like a healthy run."""
    rng = random.Random(seed)
    return [(0.8 + 2.5 * math.exp(-t / 150)) * (1 + 0.02 * rng.gauss(0, 1)) for t in range(n)]


def feed(env: SafetyEnvelope, series: list[float], metric: str = "train/loss", start: int = 1):
    return [env.observe(start + i, {metric: v}) for i, v in enumerate(series)]


# -- spike rules ---------------------------------------------------------------------------------


def test_robust_z_matches_hand_computation():
    z, med, sigma = robust_z(10.0, [1, 2, 3, 4, 5])
    assert med == 3 and sigma == pytest.approx(1.4826) and z == pytest.approx(7 / 1.4826)
    assert robust_z(2.0, [1.0, 1.0, 1.0])[0] == math.inf


def test_clean_run_has_no_stop_and_few_warnings():
    telegrams = feed(SafetyEnvelope(), clean_loss(1000))
    actions = [t.action for t in telegrams]
    assert actions.count("stop") == 0
    assert actions.count("warn") <= 5  # false-positive rate <= 0.5% on 1000 steps


def test_single_loss_spike_warns():
    series = clean_loss(300)
    series[200] *= 3
    telegrams = feed(SafetyEnvelope(), series)
    flagged = [t for t in telegrams if t.action != "continue"]
    assert [t.step for t in flagged] == [201]
    assert flagged[0].action == "warn" and flagged[0].findings[0].rule == "spike"
    assert "robust sigma" in flagged[0].reasons[0] and flagged[0].resolution is None


def test_repeated_spikes_stop():
    series = clean_loss(300)
    for i in (200, 210, 220):
        series[i] *= 3
    telegrams = feed(SafetyEnvelope(), series)
    flagged = [(t.step, t.action) for t in telegrams if t.action != "continue"]
    assert flagged == [(201, "warn"), (211, "warn"), (221, "stop")]
    stop = telegrams[220]
    assert {f.rule for f in stop.findings} == {"spike", "repeated_spike"} and stop.resolution == "halt"


def test_spikes_far_apart_do_not_stop():
    series = clean_loss(400)
    for i in (100, 200, 300):
        series[i] *= 3
    actions = [t.action for t in feed(SafetyEnvelope(), series)]
    assert actions.count("warn") == 3 and "stop" not in actions


def test_ratio_to_running_max_catches_early_blowup():
    # too little history for the z-score (min_history 8), the 10x-max rule still fires
    telegrams = feed(SafetyEnvelope(), [2.0, 1.9, 1.8, 1.7, 30.0])
    assert [t.action for t in telegrams] == ["continue"] * 4 + ["warn"]
    assert "running max" in telegrams[-1].reasons[0]


def test_grad_norm_spike_warns_and_fast_falling_loss_does_not():
    rng = random.Random(1)
    norms = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(100)]
    norms[80] = 5.0
    telegrams = feed(SafetyEnvelope(), norms, metric="train/grad_norm")
    assert [t.step for t in telegrams if t.action == "warn"] == [81]
    falling = [10.0 * 0.9**t for t in range(100)]
    assert all(t.action == "continue" for t in feed(SafetyEnvelope(), falling))


# Pre-clipping grad norms of a healthy run: bench/telemetry_overhead.py's tiny Llama (2x64,
# vocab 256, one fixed batch 4x128, AdamW 1e-3, seed 0), steps 1-40. The norm doubles at step
# 23-24 while the loss keeps falling (5.56 -> 2.84): a level shift, not a divergence.
HEALTHY_GRAD_NORMS = [
    0.5674, 0.525, 0.5126, 0.5236, 0.5217, 0.5138, 0.5231, 0.5217, 0.5138, 0.5083, 0.5057, 0.5116, 0.5132,
    0.5137, 0.521, 0.5269, 0.5322, 0.5381, 0.5436, 0.5518, 0.5624, 0.5882, 0.7577, 1.219, 0.9793, 1.1979,
    1.1211, 0.8739, 1.2016, 0.866, 1.1058, 0.7896, 1.0768, 0.8752, 1.2686, 1.0805, 1.3242, 1.3286, 1.5244,
    1.0674,
]


def test_grad_norm_level_shift_of_a_healthy_run_never_stops():
    telegrams = feed(SafetyEnvelope(), HEALTHY_GRAD_NORMS, metric="train/grad_norm")
    assert "stop" not in [t.action for t in telegrams]
    # with the loss defaults applied to the grad norm, the same healthy run would have been halted
    strict = EnvelopeConfig(grad_norm={"min_relative_excess": 0.05, "repeat_to_stop": 3})
    assert "stop" in [t.action for t in feed(SafetyEnvelope(strict), HEALTHY_GRAD_NORMS, metric="train/grad_norm")]


def test_repeated_grad_norm_spikes_warn_by_default_and_stop_when_configured():
    norms = [1.0 + 0.01 * (i % 5) for i in range(100)]
    for i in (60, 65, 70):
        norms[i] = 8.0
    assert [t.action for t in feed(SafetyEnvelope(), norms, metric="train/grad_norm")].count("warn") == 3
    cfg = EnvelopeConfig(grad_norm={"repeat_to_stop": 3})
    assert cfg.grad_norm.min_relative_excess == 1.0  # a partial section keeps the grad-norm defaults
    actions = [t.action for t in feed(SafetyEnvelope(cfg), norms, metric="train/grad_norm")]
    assert actions.count("warn") == 2 and actions[70] == "stop"


def test_new_stage_restarts_the_rolling_series():
    env = SafetyEnvelope()
    env.begin_stage(0)
    feed(env, [2.0 + 0.01 * (i % 3) for i in range(40)])
    env.begin_stage(0)  # same stage (e.g. after a rollback): history kept
    assert env.observe(41, {"train/loss": 2.6}).action == "warn"
    env.begin_stage(1)  # longer context: a higher loss is expected
    assert [t.action for t in feed(env, [2.6, 2.61, 2.59], start=42)] == ["continue"] * 3


def test_disabled_spike_rule():
    cfg = EnvelopeConfig(loss=SpikeRuleConfig(enabled=False))
    assert feed(SafetyEnvelope(cfg), [1.0] * 20 + [100.0])[-1].action == "continue"


# -- non-finite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["train/loss", "train/grad_norm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_stops_at_once(metric, value):
    env = SafetyEnvelope()
    t = env.observe(7, {metric: value}, stage=2)
    assert t.action == "stop" and t.step == 7 and t.stage == 2 and t.findings[0].rule == "non_finite"
    d = t.to_dict()
    assert d["metrics"][metric] is None and d["non_finite"][metric] in ("nan", "inf", "-inf")
    assert schema_problems("telegram", d) == []


# -- evaluation, accuracy, throughput ------------------------------------------------------------


def test_perplexity_regression_vs_base():
    env = SafetyEnvelope(baseline={"base/eval/perplexity@64": 10.0})
    assert env.observe(1, {"eval/perplexity@64": 10.5}).action == "continue"
    assert env.observe(2, {"eval/perplexity@64": 11.5}).action == "warn"
    stop = env.observe(3, {"eval/perplexity@64": 16.0})
    assert stop.action == "stop" and stop.findings[0].rule == "perplexity_regression"
    assert env.observe(4, {"eval/perplexity@64": float("inf")}).action == "stop"
    # no baseline for this length: nothing is invented
    assert env.observe(5, {"eval/perplexity@128": 1e6}).action == "continue"


def test_short_context_regression():
    env = SafetyEnvelope()
    name = "eval/short_context_regression_pct@64"
    assert [env.observe(i, {name: v}).action for i, v in enumerate([1.0, 3.0, 12.0])] == ["continue", "warn", "stop"]


def test_accuracy_floor_actions():
    env = SafetyEnvelope(EnvelopeConfig(accuracy_floors={"probe/passkey@*": 0.5}))
    assert env.observe(1, {"probe/passkey@256": 0.6}).action == "continue"
    assert env.observe(2, {"probe/passkey@256": 0.4}).action == "stop"
    assert env.observe(3, {"probe/passkey@256": float("nan")}).action == "stop"
    warn_env = SafetyEnvelope(EnvelopeConfig(accuracy_floors={"probe/*": 0.5}, accuracy_floor_action="warn"))
    assert warn_env.observe(1, {"probe/passkey@256": 0.1}).action == "warn"


def test_throughput_collapse_warns_only():
    env = SafetyEnvelope()
    rng = random.Random(2)
    steady = [env.observe(i, {"train/tokens_per_s": 1000 + 10 * rng.gauss(0, 1)}) for i in range(10)]
    assert all(t.action == "continue" for t in steady)
    t = env.observe(10, {"train/tokens_per_s": 300.0})
    assert t.action == "warn" and t.findings[0].rule == "throughput_collapse"
    assert env.observe(11, {"train/tokens_per_s": 0.0}).action == "warn"  # never a stop


def test_worst_finding_decides_and_all_reasons_kept():
    env = SafetyEnvelope(baseline={"eval/perplexity@64": 10.0})
    t = env.observe(1, {"eval/perplexity@64": 11.5, "train/loss": float("nan")})
    assert t.action == "stop" and len(t.reasons) == 2


# -- policy, state, config -----------------------------------------------------------------------


def test_rollback_policy_limits_and_truncates_history():
    env = SafetyEnvelope(EnvelopeConfig(policy=RollbackPolicy(on_stop="rollback", max_rollbacks=2, lr_factor=0.25)))
    feed(env, clean_loss(50))
    t = env.observe(51, {"train/loss": float("nan")})
    assert t.resolution == "rollback" and t.max_rollbacks == 2
    env.record_rollback(40)
    assert max(s for s, _ in env.loss.window) == 40
    env.record_rollback(40)
    assert env.observe(52, {"train/loss": float("nan")}).resolution == "halt"
    assert env.rollbacks_used == 2 and env.rollback_steps == [40, 40]
    assert env.rollback_lr(1e-3) == pytest.approx(2.5e-4)


def test_halt_policy_never_rolls_back():
    assert SafetyEnvelope().observe(1, {"train/loss": float("nan")}).resolution == "halt"


def test_state_dict_round_trip_gives_identical_decisions():
    series = clean_loss(200)
    series[150] *= 3
    a = SafetyEnvelope()
    feed(a, series[:100])
    b = SafetyEnvelope()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest_a = [t.action for t in feed(a, series[100:], start=101)]
    rest_b = [t.action for t in feed(b, series[100:], start=101)]
    assert rest_a == rest_b and "warn" in rest_a


def test_config_is_validated():
    with pytest.raises(ValidationError, match="perplexity_stop_ratio"):
        EnvelopeConfig(evaluation={"perplexity_warn_ratio": 1.5, "perplexity_stop_ratio": 1.2})
    with pytest.raises(ValidationError):
        EnvelopeConfig(loss={"z_treshold": 3})  # typo is an error, not ignored
    assert EnvelopeConfig().loss.window == 128 and EnvelopeConfig().loss.z_threshold == 6.0


@pytest.mark.parametrize("metrics,action", [({"train/loss": 1.0}, "continue"),
                                            ({"train/tokens_per_s": 1.0}, "continue"),
                                            ({"eval/short_context_regression_pct@8": 5.0}, "warn"),
                                            ({"train/loss": float("nan")}, "stop")])
def test_telegrams_match_schema(metrics, action):
    t = SafetyEnvelope().observe(3, metrics, stage=1)
    assert t.action == action and schema_problems("telegram", t.to_dict()) == []


# -- telegram files and control commands ---------------------------------------------------------


def test_telegram_writer(tmp_path):
    env = SafetyEnvelope()
    w = TelegramWriter(tmp_path)
    w.write(env.observe(1, {"train/loss": 1.0}))
    w.write(env.observe(2, {"train/loss": float("nan")}))
    assert read_telegram(tmp_path)["action"] == "stop"
    assert [t["action"] for t in read_telegram_history(tmp_path).records] == ["continue", "stop"]
    other = tmp_path / "other"
    other.mkdir()
    TelegramWriter(other, is_main_process=False).write(env.observe(3, {"train/loss": 1.0}))
    assert read_telegram(other) is None


def test_telegram_writer_rate_limits_routine_continues_only(tmp_path):
    env = SafetyEnvelope()
    w = TelegramWriter(tmp_path, continue_interval_s=3600)
    for step in range(1, 6):
        w.write(env.observe(step, {"train/loss": 1.0}))
    w.write(env.observe(6, {"eval/short_context_regression_pct@8": 5.0}))  # warn: always written
    w.write(env.observe(7, {"eval/short_context_regression_pct@8": 6.0}))  # history only
    assert read_telegram(tmp_path)["step"] == 6
    w.write(env.observe(8, {"train/loss": 1.0}))  # first continue after a warn: written
    w.write(env.observe(9, {"train/loss": 1.0}))
    assert [(t["step"], t["action"]) for t in read_telegram_history(tmp_path).records] == [
        (1, "continue"), (6, "warn"), (7, "warn"), (8, "continue")]
    assert w.skipped == 5 and w.latest["step"] == 9 and read_telegram(tmp_path)["step"] == 8
    w.write(env.observe(10, {"train/loss": 1.0}), force=True)
    assert read_telegram(tmp_path)["step"] == 10
    w.write(env.observe(11, {"train/loss": float("nan")}))
    w.write(env.observe(12, {"train/loss": float("nan")}))  # every stop replaces the file
    assert read_telegram(tmp_path)["step"] == 12


def test_control_inbox(tmp_path):
    append_control_command(tmp_path, "abort", source="cockpit")  # before the inbox: not for this training
    inbox = ControlInbox(tmp_path / "control.jsonl")
    assert inbox.poll() == []
    append_control_command(tmp_path, "rollback", {"to_step": 3}, source="cli")
    with open(tmp_path / "control.jsonl", "a") as fh:
        fh.write('{"action": "explode"}\n{"timestamp": "x", "act')
    commands = inbox.poll()
    assert [(c.action, c.args) for c in commands] == [("rollback", {"to_step": 3})]
    assert len(inbox.rejected) == 1 and inbox.rejected[0].line_number == 3 and "action" in inbox.rejected[0].reason


# -- the callback in a real (tiny) Trainer run ---------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class AtStep(transformers.TrainerCallback):
    """Runs ``action(model)`` at the start of training step ``k`` (1-based)."""

    def __init__(self, k, action):
        self.k, self.action = k, action

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.k - 1:
            self.action(model)


def poison(model):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A tiny model gains nothing from threads and loses much to contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_trainer(tmp_path, callbacks, max_steps=12):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=2,
        learning_rate=1e-3, logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    return Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=TokenRows(), callbacks=callbacks)


def test_callback_halts_training_at_the_nan_step(tmp_path):
    from scaler_wizard.telemetry.sink import MetricWriter
    from scaler_wizard.training.safety_callback import SafetyCallback

    k = 5
    writer = MetricWriter(tmp_path / "metrics.jsonl")
    safety = SafetyCallback(SafetyEnvelope(), TelegramWriter(tmp_path, continue_interval_s=0), stage=0,
                            tokens_per_step=32, metric_writer=writer)
    trainer = tiny_trainer(tmp_path, [AtStep(k, poison), safety])
    trainer.train()
    writer.close()
    assert trainer.state.global_step == k  # halted right after the poisoned step, not at 12
    assert safety.requested_action == "halt" and safety.stopped_at_step == k
    assert safety.stop_telegram.step == k and "train/loss is nan" in safety.stop_reason
    history = read_telegram_history(tmp_path).records
    assert [t["action"] for t in history] == ["continue"] * (k - 1) + ["stop"]
    assert [t["step"] for t in history] == list(range(1, k + 1))
    assert read_telegram(tmp_path)["action"] == "stop" and read_telegram(tmp_path)["step"] == k
    assert all(schema_problems("telegram", t) == [] for t in history)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["metric"], e["action"]) for e in events] == [(k, "safety/action", "stop")]


def test_callback_signals_rollback_policy(tmp_path):
    from scaler_wizard.training.safety_callback import SafetyCallback

    env = SafetyEnvelope(EnvelopeConfig(policy=RollbackPolicy(on_stop="rollback", max_rollbacks=1)))
    safety = SafetyCallback(env, TelegramWriter(tmp_path))
    trainer = tiny_trainer(tmp_path, [AtStep(3, poison), safety])
    trainer.train()
    assert trainer.state.global_step == 3
    assert safety.requested_action == "rollback" and read_telegram(tmp_path)["resolution"] == "rollback"


def test_operator_abort_stops_within_one_step(tmp_path):
    from scaler_wizard.training.safety_callback import SafetyCallback

    inbox = ControlInbox(tmp_path / "control.jsonl")
    safety = SafetyCallback(SafetyEnvelope(), TelegramWriter(tmp_path), inbox=inbox)

    def operator(model):
        append_control_command(tmp_path, "approve", source="cockpit")
        append_control_command(tmp_path, "abort", source="cockpit")

    trainer = tiny_trainer(tmp_path, [AtStep(4, operator), safety])
    trainer.train()
    assert trainer.state.global_step == 4
    assert safety.requested_action == "abort" and [c.action for c in safety.approvals] == ["approve"]
    last = read_telegram(tmp_path)
    assert last["action"] == "stop" and last["source"] == "operator" and "abort" in last["reasons"][0]


def test_operator_rollback_request_carries_its_args(tmp_path):
    from scaler_wizard.training.safety_callback import SafetyCallback

    safety = SafetyCallback(SafetyEnvelope(), TelegramWriter(tmp_path), inbox=ControlInbox(tmp_path / "control.jsonl"))
    trainer = tiny_trainer(tmp_path, [AtStep(2, lambda m: append_control_command(tmp_path, "rollback", {"to_step": 1})),
                                      safety])
    trainer.train()
    assert trainer.state.global_step == 2
    assert safety.requested_action == "rollback" and safety.request_args == {"to_step": 1}
    assert read_telegram(tmp_path)["resolution"] == "rollback"


def test_loss_spike_early_in_a_stage_is_found():
    # a stage of the demo recipe logs ~10 times: the z-score rule must be awake by then
    series = [8.3 - 0.01 * i for i in range(10)] + [8.3 * 3]
    telegrams = feed(SafetyEnvelope(), series)
    assert [t.action for t in telegrams][-1] == "warn"
    assert all(t.action == "continue" for t in telegrams[:-1])
