"""Automatic PEFT (``HiDLR(freeze=FreezePolicy(...))``): the policies' decisions, and freezing that is real."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from hidlr_hpo import FreezePolicy, HiDLR, group_parameters
from hidlr_hpo.freezing import Freezer

# -- the policies, on measurements given by hand ---------------------------------------------------------------


def test_influence_is_the_bias_corrected_average_of_b2_over_2_a_n():
    freezer = Freezer(FreezePolicy(threshold=0.1, smoothing=0.5), n_params=[4, 2], total_steps=100)
    freezer.observe(0, b=[2.0, 1.0], a_diag=[1.0, 4.0])  # PPI = 4 / 8 = 0.5 and 1 / 16
    freezer.observe(1, b=[1.0, 1.0], a_diag=[1.0, 1.0])  # PPI = 1 / 8 and 1 / 4
    # (0.5 * (0.5 * 0 + 0.5 * x1) + 0.5 * x2) / (1 - 0.5^2)
    expected = [(0.25 * 0.5 + 0.5 * 0.125) / 0.75, (0.25 * 0.0625 + 0.5 * 0.25) / 0.75]
    assert freezer.influence() == pytest.approx(expected, rel=1e-15)


def test_dead_groups_measure_zero_unbounded_ones_infinity_and_missing_fits_nothing():
    freezer = Freezer(FreezePolicy(threshold=0.1, smoothing=0.0), n_params=[1, 1, 1, 1], total_steps=100)
    freezer.observe(0, b=[1.0, 1.0, math.nan, -1.0], a_diag=[1.0, -1.0, 1.0, 1.0], dead=[0])
    assert freezer.measured == [1, 1, 0, 1]  # dead: 0; A <= 0 < b: unbounded; NaN: nothing; b <= 0: 0
    influence = freezer.influence()
    assert influence[0] == 0.0 and influence[1] == math.inf and math.isnan(influence[2]) and influence[3] == 0.0
    freezer.observe(1, b=[1.0, 2.0, 1.0, 1.0], a_diag=[1.0, 1.0, 1.0, 1.0])  # now group 1 has an optimum
    assert freezer.influence()[1] == 2.0  # the bounded measurements alone: 2^2 / 2


def test_threshold_never_freezes_an_unbounded_group_and_compares_with_the_largest_bounded_one():
    freezer = Freezer(FreezePolicy(threshold=0.5, warmup=0, min_refits=1, smoothing=0.0), n_params=[1, 1, 1])
    freezer.observe(0, b=[1.0, 1.0, 0.5], a_diag=[-1.0, 1.0, 1.0])  # inf, 0.5, 0.125
    assert freezer.decide(0) == ([2], [])


def test_budget_takes_groups_greedily_by_influence_per_parameter():
    n = [10, 80, 10, 30]  # 130 parameters; a 40% budget is 52
    freezer = Freezer(FreezePolicy(budget=0.4, warmup=0, min_refits=1, smoothing=0.0), n_params=n)
    # PPI = b^2 / (2 n): 0.05, 0.025, 0.0005, 1/60 = 0.0167
    freezer.observe(0, b=[1.0, 2.0, 0.1, 1.0], a_diag=[1.0, 1.0, 1.0, 1.0])
    # greedy: group 0 (10, room 42), group 1 (80) does not fit, group 3 (30, room 12), group 2 (10, room 2)
    assert freezer.decide(0) == ([1], [])
    assert freezer.trainable_fraction == pytest.approx(50 / 130)
    assert freezer.decide(1) == ([], [])  # the live groups fit: nothing more to freeze


def test_threshold_is_relative_to_the_largest_influence_and_waits_for_warmup_and_measurements():
    policy = FreezePolicy(threshold=0.1, warmup=5, min_refits=2, smoothing=0.0)
    freezer = Freezer(policy, n_params=[1, 1, 1])
    freezer.observe(0, b=[1.0, 0.2, 0.5], a_diag=[1.0, 1.0, 1.0])  # PPI 0.5, 0.02, 0.125
    assert freezer.decide(0) == ([], [])  # in the warm-up
    assert freezer.decide(6) == ([], [])  # one measurement each, two needed
    freezer.observe(6, b=[1.0, 0.2, 0.5], a_diag=[1.0, 1.0, 1.0])
    assert freezer.decide(6) == ([1], [])  # 0.02 < 0.1 * 0.5; 0.125 is not
    assert [e.action for e in freezer.events] == ["freeze"] and freezer.events[0].influence == pytest.approx(0.02)


def test_revisit_thaws_and_the_group_is_measured_again_before_any_new_decision():
    policy = FreezePolicy(threshold=0.1, warmup=0, min_refits=1, smoothing=0.0, revisit=10)
    freezer = Freezer(policy, n_params=[1, 1])
    freezer.observe(0, b=[1.0, 0.1], a_diag=[1.0, 1.0])
    assert freezer.decide(0) == ([1], [])
    assert freezer.decide(9) == ([], [])
    assert freezer.decide(10) == ([], [1])  # thawed, and not refrozen before it is measured again
    assert freezer.frozen == [False, False] and freezer.measured == [1, 0]
    freezer.observe(11, b=[1.0, 1.0], a_diag=[1.0, 1.0])  # its influence rose: it stays live
    assert freezer.decide(11) == ([], [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "budget="),
        ({"budget": 0.0}, "budget must be"),
        ({"threshold": 1.0}, "threshold must be"),
        ({"threshold": 0.1, "warmup": 1.5}, "fraction of total_steps"),
        ({"threshold": 0.1, "warmup": -1}, "warmup must be >= 0"),
        ({"threshold": 0.1, "min_refits": 0}, "min_refits"),
        ({"threshold": 0.1, "revisit": 0}, "revisit"),
    ],
)
def test_policy_rejects_nonsense_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreezePolicy(**kwargs)


def test_a_fixed_pattern_freezes_exactly_its_groups_when_the_warmup_ends():
    freezer = Freezer(FreezePolicy(groups=["b"], warmup=5), n_params=[1, 2, 3], names=["a", "b", "c"])
    assert freezer.decide(4) == ([], [])  # in the warm-up; no measurement is needed after it
    assert freezer.decide(5) == ([1], [])
    assert freezer.frozen == [False, True, False] and freezer.trainable_fraction == pytest.approx(4 / 6)
    assert freezer.decide(9) == ([], [])  # once
    with pytest.raises(ValueError, match=r"names \['x'\], which are not groups; the groups: \['a', 'b'\]"):
        Freezer(FreezePolicy(groups=["x"]), n_params=[1, 1], total_steps=10, names=["a", "b"])
    with pytest.raises(ValueError, match="fixed pattern: leave budget and threshold unset"):
        FreezePolicy(groups=["a"], budget=0.5)
    with pytest.raises(ValueError, match="a list of group names"):
        FreezePolicy(groups="a")


def test_a_pattern_found_by_one_run_freezes_the_same_groups_in_another():
    _, _, first = _run(FreezePolicy(threshold=0.01, warmup=10, min_refits=2), steps=12)
    model, opt, again = _run(FreezePolicy(groups=first.frozen_groups, warmup=10), steps=12, seed=1)
    assert again.frozen_groups == first.frozen_groups == ["side"]
    assert not model.side.weight.requires_grad and model.side.weight not in opt.state


def test_a_budget_no_group_fits_is_refused_at_construction():
    with pytest.raises(ValueError, match="no group fits"):
        Freezer(FreezePolicy(budget=0.01), n_params=[50, 50], total_steps=100)


# -- freezing inside HiDLR, on a real model ---------------------------------------------------------------------


class _TwoBranch(nn.Module):
    """An MLP and a side branch whose input is all zeros: the side's weight gets no gradient (a dead group)."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.side = nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.side(torch.zeros_like(x))


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def _run(policy, steps: int, seed: int = 0, total: int = 60, state=None):
    torch.manual_seed(seed)
    model = _TwoBranch()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = HiDLR(opt, model, _loss, probes=[_data(128, 99)], total_steps=total, interval=5, freeze=policy)
    if state is not None:
        model.load_state_dict(state["model"])
        hidlr.load_state_dict(state["hidlr"])
    batches = [_data(32, i) for i in range(total)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no validation reports in these short runs
        for t in range(hidlr.step_count, hidlr.step_count + steps):
            _loss(model, batches[t]).backward()
            hidlr.step()
            hidlr.zero_grad()
    return model, opt, hidlr


def test_a_group_that_does_not_change_the_loss_is_frozen_for_real():
    policy = FreezePolicy(threshold=0.01, warmup=10, min_refits=2)
    model, opt, hidlr = _run(policy, steps=12)
    assert hidlr.group_names == ["main.0", "main.2", "side"]
    assert hidlr.frozen_groups == ["side"]
    (event,) = hidlr.freezer.events
    assert (event.step, event.group, event.action, event.influence) == (10, 2, "freeze", 0.0)
    assert hidlr.trainable_fraction == pytest.approx(97 / 101)
    side = model.side.weight
    before = side.detach().clone()
    model, opt, hidlr = _continue(model, opt, hidlr, steps=30)
    assert torch.equal(side, before)  # bit-identical while the others train on
    assert not side.requires_grad and side.grad is None and side not in opt.state
    assert all(p in opt.state for p in model.main.parameters())
    assert hidlr.lrs()[2] == 0.0 and hidlr.lrs()[0] > 0
    # The refits after the freeze probe the two live groups only: 2 * 2 + 1 points.
    after = [r for r in hidlr.history if r.step > 10]
    assert after and all(len(r.losses) == 5 and r.frozen == [2] for r in after)
    assert all(math.isnan(r.b[2]) and r.lrs[2] == r.prev_lrs[2] for r in after)


def _continue(model, opt, hidlr, steps: int):
    batches = [_data(32, 1000 + i) for i in range(steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, y in batches:
            out = _loss(model, (x, y))
            out.backward()
            assert model.side.weight.grad is None or model.side.weight.requires_grad  # backward skipped it
            hidlr.step()
            hidlr.zero_grad()
    return model, opt, hidlr


def test_without_freezing_the_trajectory_is_unchanged_by_the_option():
    _, _, plain = _run(None, steps=30)
    _, _, never = _run(FreezePolicy(threshold=0.0, warmup=0), steps=30)  # a policy that freezes nothing
    assert [r.lrs for r in plain.history] == [r.lrs for r in never.history]
    assert never.frozen_groups == []


def test_a_checkpoint_freezes_the_same_groups_and_continues_bit_identically():
    policy = FreezePolicy(threshold=0.01, warmup=10, min_refits=2)
    full_model, _, full = _run(policy, steps=40)
    half_model, _, half = _run(policy, steps=20)
    state = {"model": half_model.state_dict(), "hidlr": half.state_dict()}
    resumed_model, resumed_opt, resumed = _run(policy, steps=20, seed=1, state=state)  # another init, then loaded
    assert resumed.frozen_groups == ["side"] and not resumed_model.side.weight.requires_grad
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.freezer.events == full.freezer.events


def test_a_checkpoint_with_another_policy_is_refused():
    _, _, hidlr = _run(FreezePolicy(threshold=0.01, warmup=10), steps=12)
    _, _, other = _run(FreezePolicy(threshold=0.02, warmup=10), steps=0)
    with pytest.raises(ValueError, match="freeze"):
        other.load_state_dict(hidlr.state_dict())


def test_revisit_thaws_the_group_in_the_model():
    policy = FreezePolicy(threshold=0.01, warmup=10, min_refits=2, revisit=10)
    model, _, hidlr = _run(policy, steps=26)
    actions = [(e.step, e.group, e.action) for e in hidlr.freezer.events]
    assert actions[:2] == [(10, 2, "freeze"), (20, 2, "thaw")]
    thawed_at_20 = not any(r.frozen for r in hidlr.history if r.step == 20)
    assert thawed_at_20 and len([r for r in hidlr.history if r.step == 25][0].losses) == 7  # probed again


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"slope": "gradient"}, ValueError, "slope='probes'"),
        ({"design": torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}, ValueError, "explicit tensor"),
        ({"freeze": {"budget": 0.5}}, TypeError, "FreezePolicy"),
        ({"total_steps": None, "freeze": FreezePolicy(threshold=0.1, warmup=0.1)}, ValueError, "in steps"),
        ({"freeze": FreezePolicy(budget=0.001)}, ValueError, "no group fits"),
    ],
)
def test_hidlr_refuses_freezing_it_cannot_do(kwargs, error, message):
    model = _TwoBranch()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    settings = {"probes": None, "total_steps": 10, "freeze": FreezePolicy(threshold=0.1), **kwargs}
    with pytest.raises(error, match=message):
        HiDLR(opt, model, _loss, **settings)


# -- in a study: the TOML setting, checked at load time, and what MLflow shows ----------------------------------

_STUDY = """
name = "frozen"
seeds = [0]
storage = "sqlite:///{db}"
results_dir = "{out}"

[task]
name = "digits"

[budget]
epochs = 2
batch_size = 128

[[methods]]
name = "hidlr-peft"
kind = "hidlr"
interval = 3
freeze = {freeze}
"""


def _study_file(tmp_path, freeze: str):
    path = tmp_path / "frozen.toml"
    path.write_text(_STUDY.format(db=tmp_path / "optuna.db", out=tmp_path / "report", freeze=freeze))
    return path


@pytest.mark.parametrize(
    ("freeze", "message"),
    [("{ budget = 2.0 }", "budget must be"), ("{ budgett = 0.5 }", "unknown keys"), ("{}", "budget=")],
)
def test_a_study_file_with_a_bad_freeze_setting_is_refused_at_load_time(tmp_path, freeze, message):
    from hidlr_hpo.config import load_study_config

    with pytest.raises(Exception, match=message):
        load_study_config(_study_file(tmp_path, freeze))


def test_a_study_logs_what_froze_when_and_on_what_evidence_to_mlflow(tmp_path, monkeypatch):
    import optuna

    torch.set_default_dtype(torch.float32)  # the tasks' data is float32 (conftest restores its float64 after)
    from mlflow import MlflowClient

    from hidlr_hpo.config import describe_method, load_study_config
    from hidlr_hpo.study import optuna_study_name, run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_study_config(_study_file(tmp_path, "{ threshold = 0.5, warmup = 0, min_refits = 1 }"))
    assert "freezing threshold=0.5" in describe_method(cfg.methods[0])
    run_study(cfg, show_progress=False)
    client = MlflowClient("sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("frozen")
    (child,) = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    run_id = child.info.run_id
    fraction = client.get_metric_history(run_id, "trainable_fraction")
    from hidlr_hpo.tasks import get_task

    task = get_task("digits")
    sizes = {
        g["name"]: sum(p.numel() for p in g["params"]) for g in group_parameters(task.make_model(0), task.grouping)
    }
    groups = list(sizes)
    flags = {g: client.get_metric_history(run_id, f"frozen/{g}") for g in groups}
    smoothed = {g: client.get_metric_history(run_id, f"smoothed_influence/{g}") for g in groups}
    steps = [m.step for m in fraction]
    assert steps and all([m.step for m in flags[g]] == steps for g in groups)
    assert min(m.value for m in fraction) < 1.0  # a threshold of half the largest influence froze something
    # At the first refit every group was measured once: the groups below half the largest froze then.
    first = {g: smoothed[g][0].value for g in groups}
    expected = {g: float(first[g] < 0.5 * max(first.values())) for g in groups}
    assert {g: flags[g][0].value for g in groups} == expected
    # A frozen group's parameters count out of the trainable fraction.
    live = sum(sizes[g] for g in groups if not expected[g])
    assert fraction[0].value == pytest.approx(live / sum(sizes.values()))
    # The Optuna trial keeps the end state: the trainable fraction and which groups froze, at which step.
    study = optuna.load_study(study_name=optuna_study_name(cfg, cfg.methods[0], 0), storage=cfg.storage)
    (trial,) = study.trials
    frozen_at_end = [g for g in groups if flags[g][-1].value == 1.0]
    assert trial.user_attrs["frozen_groups"] == frozen_at_end
    assert trial.user_attrs["trainable_fraction"] == pytest.approx(fraction[-1].value)
    events = trial.user_attrs["freeze_events"]
    assert {name for _, name, action in events if action == "freeze"} >= set(frozen_at_end)
