"""The plateau guard (HiDLR.report_validation) and the fast climb it brakes (believable_ratio)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from test_controller import TwoBlockLinear, analytic_rates, least_squares_batch, mse

from hidlr_hpo import HiDLR, group_parameters


def setup(**kwargs):
    torch.manual_seed(3)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, **{"total_steps": None, "probes": None, **kwargs})
    return model, opt, hidlr


def refit_once(model, opt, hidlr):
    batch = least_squares_batch(seed=0)
    mse(model, batch).backward()
    hidlr.step(probe_batch=batch if hidlr.refit_due else None)
    opt.zero_grad()


def test_a_rise_above_the_threshold_halves_and_caps_every_multiplier():
    model, opt, hidlr = setup(plateau_factor=0.5, plateau_threshold=0.02, plateau_patience=0, plateau_jump=None)
    assert hidlr.report_validation(1.0) is False and hidlr.best_validation == 1.0
    assert hidlr.report_validation(0.8) is False and hidlr.best_validation == 0.8
    assert hidlr.report_validation(0.8 * 1.02) is False  # within 2% of the best: noise, not a rise
    assert hidlr.multipliers.tolist() == [1.0, 1.0] and hidlr.ceiling is None
    refit_once(model, opt, hidlr)
    before = hidlr.multipliers.clone()
    assert hidlr.report_validation(torch.tensor(0.9)) is True  # a tensor is read as its value
    assert hidlr.multipliers.tolist() == (before * 0.5).tolist()
    assert hidlr.ceiling.tolist() == (before * 0.5).tolist() and hidlr.plateau_cuts == [1]
    # The best restarts from the report that caused the cut: 0.9 is the reference now, not 0.8.
    assert hidlr.best_validation == 0.9
    assert hidlr.report_validation(0.91) is False  # within 2% of 0.9
    assert hidlr.report_validation(0.95) is True
    assert hidlr.multipliers.tolist() == (before * 0.25).tolist() and hidlr.ceiling.tolist() == (before * 0.25).tolist()


def test_patience_waits_for_rises_in_a_row_and_a_jump_cuts_at_once():
    _, _, hidlr = setup()  # the defaults: x0.5 on two rises above 2% in a row, or one above 20%
    assert (hidlr.plateau_factor, hidlr.plateau_threshold, hidlr.plateau_patience, hidlr.plateau_jump) == (
        0.5, 0.02, 1, 0.2)  # fmt: skip
    hidlr.report_validation(1.0)
    assert hidlr.report_validation(1.1) is False and hidlr.bad_reports == 1  # one rise: maybe noise
    assert hidlr.report_validation(0.99) is False and hidlr.bad_reports == 0  # not in a row
    assert hidlr.report_validation(1.05) is False
    assert hidlr.report_validation(1.05) is True and hidlr.multipliers.tolist() == [0.5, 0.5]
    assert hidlr.bad_reports == 0 and hidlr.best_validation == 1.05
    assert hidlr.report_validation(1.05 * 1.21) is True  # above 20%: a divergence, cut at once
    assert hidlr.multipliers.tolist() == [0.25, 0.25] and len(hidlr.plateau_cuts) == 2


def test_after_a_cut_the_refits_may_lower_the_rates_but_not_raise_them():
    # SGD at 1e-3 on this least-squares model: every refit wants a much larger rate for both groups.
    model, opt, hidlr = setup(interval=1, trust_ratio=2.0, smoothing=0.0, plateau_factor=0.5)
    refit_once(model, opt, hidlr)
    assert all(m > 1.0 for m in hidlr.multipliers.tolist())  # the fit climbs
    hidlr.report_validation(1.0)
    hidlr.report_validation(2.0)
    cap = hidlr.ceiling.clone()
    for _ in range(5):
        refit_once(model, opt, hidlr)
        assert (hidlr.multipliers <= cap).all()
    assert hidlr.multipliers.tolist() == cap.tolist()  # the fit still wants more: the cap holds it
    assert hidlr.lrs() == pytest.approx((1e-3 * cap).tolist(), rel=1e-12)


def test_nan_reports_are_ignored_and_nonsense_is_refused():
    _, _, hidlr = setup()
    hidlr.report_validation(0.5)
    assert hidlr.report_validation(math.nan) is False and hidlr.report_validation(math.inf) is False
    assert hidlr.best_validation == 0.5 and hidlr.multipliers.tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match="report_validation takes a float loss, got str"):
        hidlr.report_validation("0.3")
    for bad in (
        dict(plateau_factor=0.0),
        dict(plateau_factor=1.5),
        dict(plateau_threshold=-0.1),
        dict(plateau_patience=-1),
        dict(plateau_jump=0.01),  # below the threshold
    ):
        with pytest.raises(ValueError, match="plateau_"):
            setup(**bad)


def test_without_a_guard_reports_are_recorded_and_nothing_is_cut():
    _, _, hidlr = setup(plateau_factor=None)
    hidlr.report_validation(0.5)
    assert hidlr.report_validation(5.0) is False and hidlr.multipliers.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("believable", [None, 1e6])
def test_a_believable_proposal_is_taken_unsmoothed(believable):
    # One refit from the same state: with believable_ratio=None the smoothing (0.9) applies; with a ratio
    # that covers the proposal, the rate is the model's minimiser itself.
    torch.manual_seed(1)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    batch = least_squares_batch(seed=0)
    mse(model, batch).backward()
    hidlr = HiDLR(opt, model, mse, interval=1, trust_ratio=None, lr_bounds=None, believable_ratio=believable,
                  total_steps=None, probes=None)  # fmt: skip
    expected, _, _ = analytic_rates(model, opt, batch, "diag")
    hidlr.step(probe_batch=batch)
    assert (expected > 0).all()
    want = expected if believable else 0.9 * 1e-3 + 0.1 * expected
    torch.testing.assert_close(torch.tensor(hidlr.lrs()), want, rtol=1e-7, atol=0)


def test_a_loop_that_never_reports_a_validation_loss_is_told_once():
    model, opt, hidlr = setup(interval=2, total_steps=10)
    with pytest.warns(RuntimeWarning, match="no validation loss after 6 steps") as caught:
        for _ in range(10):
            refit_once(model, opt, hidlr)
    assert len([w for w in caught if "validation loss" in str(w.message)]) == 1
    _, _, quiet = setup(interval=2, total_steps=10, believable_ratio=None)  # no fast climb: nothing to brake
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            refit_once(model, opt, quiet)


def test_the_guard_state_survives_a_checkpoint_and_bad_values_are_refused():
    model, opt, hidlr = setup()
    refit_once(model, opt, hidlr)
    hidlr.report_validation(1.0)
    hidlr.report_validation(3.0)
    state = copy.deepcopy(hidlr.state_dict())
    _, _, other = setup()
    other.load_state_dict(state)
    assert other.best_validation == 3.0 and other.plateau_cuts == [1]  # restarted from the cut
    assert other.ceiling.tolist() == hidlr.ceiling.tolist() and other.multipliers.tolist() == hidlr.multipliers.tolist()
    for broken in ({"ceiling": [1.0]}, {"best_validation": math.nan}, {"plateau_cuts": ["x"]}, {"bad_reports": -1}):
        _, _, target = setup()
        with pytest.raises(ValueError, match="state_dict"):
            target.load_state_dict({**state, "hidlr": {**state["hidlr"], **broken}})
        assert target.best_validation is None and target.ceiling is None  # nothing half-loaded
    _, _, changed = setup(plateau_factor=0.7)
    with pytest.raises(ValueError, match="plateau: saved"):
        changed.load_state_dict(state)


def test_a_best_of_zero_does_not_make_every_positive_loss_a_rise():
    _, _, hidlr = setup()
    hidlr.report_validation(0.0)  # an error rate can reach 0
    assert hidlr.report_validation(1e-9) is False and hidlr.report_validation(1e-9) is False
    assert hidlr.multipliers.tolist() == [1.0, 1.0]


def test_a_checkpoint_from_before_the_plateau_guard_loads_into_a_hidlr_without_it():
    model, opt, old = setup(believable_ratio=None, plateau_factor=None)
    refit_once(model, opt, old)
    state = copy.deepcopy(old.state_dict())
    del state["hidlr"]["config"]["plateau"]  # as HiDLR saved it before 2026-12-02
    for key in ("best_validation", "ceiling", "plateau_cuts", "bad_reports"):
        del state["hidlr"][key]
    _, _, default = setup()
    with pytest.raises(ValueError, match="pass believable_ratio=None, plateau_factor=None"):
        default.load_state_dict(state)
    _, _, alike = setup(believable_ratio=None, plateau_factor=None)
    alike.load_state_dict(state)
    assert alike.step_count == 1 and alike.best_validation is None and alike.plateau_cuts == []
