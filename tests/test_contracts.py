"""HiDLR's promises at the edges: rates read not assumed, dead groups, gradient slope, no trace, checkpoints."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from test_controller import RAW, TwoBlockLinear, analytic_rates, flat, least_squares_batch, mse
from torch import nn

from hidlr_hpo import HiDLR, group_parameters


def train_steps(model, opt, hidlr, steps, probe=None, scheduler=None):
    probe = probe or least_squares_batch(seed=1)
    for _ in range(steps):
        mse(model, least_squares_batch(seed=0)).backward()
        hidlr.step(probe_batch=probe if hidlr.refit_due else None)
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


# ---- 1. the rate the step used is read, and an LR scheduler composes -----------------------------------


def test_an_outside_lr_change_is_read_not_assumed():
    torch.manual_seed(1)
    model = TwoBlockLinear()
    opt = torch.optim.Adam(group_parameters(model, "layer"), lr=0.05)
    hidlr = HiDLR(opt, model, mse, interval=2, **RAW, total_steps=None, probes=None)
    train_steps(model, opt, hidlr, 2)  # a refit at step 0 moves the multipliers off 1
    for group in opt.param_groups:
        group["lr"] = 0.01  # a manual change (or a scheduler's) before the refit at step 2
    mse(model, least_squares_batch(seed=0)).backward()
    probe = least_squares_batch(seed=1)
    expected, w_t, d = analytic_rates(model, opt, probe, "diag")  # per-unit-lr directions: lr-independent
    m = hidlr.multipliers.clone()
    hidlr.step(probe_batch=probe)
    record = hidlr.last_fit
    assert record.scheduled_lrs == [0.01, 0.01]
    torch.testing.assert_close(torch.tensor(record.prev_lrs), 0.01 * m, rtol=1e-12, atol=0)  # stepped at lr * m
    descends = expected > 0
    torch.testing.assert_close(torch.tensor(record.proposed)[descends], expected[descends], rtol=1e-7, atol=0)
    # The step taken is the optimizer's step at the new rates, and group["lr"] is the user's value again.
    torch.testing.assert_close(flat(model), w_t - torch.tensor(hidlr.lrs()) @ d, rtol=1e-7, atol=1e-9)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def test_a_closed_form_scheduler_gives_the_shape_and_hidlr_the_multipliers():
    torch.manual_seed(2)
    model = TwoBlockLinear()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=0.02)
    shape = lambda t: 0.5 * (1 + math.cos(math.pi * t / 20))  # noqa: E731 (cosine to 0 over 20 steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    hidlr = HiDLR(opt, model, mse, interval=3, total_steps=None, probes=None)
    for t in range(12):
        scheduled = [g["lr"] for g in opt.param_groups]
        assert scheduled == pytest.approx([0.02 * shape(t)] * 2, rel=1e-12)  # never overwritten by HiDLR
        train_steps(model, opt, hidlr, 1, scheduler=None)
        # the rate used is the scheduled lr times the fitted multiplier (the refit of this step included)
        assert hidlr.lrs() == pytest.approx((torch.tensor(scheduled) * hidlr.multipliers).tolist(), rel=1e-12)
        scheduler.step()
    assert len(hidlr.history) == 4 and not torch.equal(hidlr.multipliers, torch.ones(2))
    assert hidlr.history[-1].scheduled_lrs == pytest.approx([0.02 * shape(9)] * 2)


def test_a_chainable_scheduler_never_compounds_with_the_multipliers():
    torch.manual_seed(3)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    hidlr = HiDLR(opt, model, mse, interval=2, total_steps=None, probes=None)
    train_steps(model, opt, hidlr, 8, scheduler=scheduler)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01 * 0.9**8] * 2, rel=1e-12)
    assert hidlr.lrs() == pytest.approx((0.01 * 0.9**7 * hidlr.multipliers).tolist(), rel=1e-12)


def test_the_horizon_multiplies_the_scheduled_rate_and_leaves_group_lr_alone():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.1)
    hidlr = HiDLR(opt, model, mse, interval=1000, total_steps=10, probes=None)
    for t in range(4):
        if t == 2:
            opt.param_groups[0]["lr"] = 0.05  # no longer overwritten
        hidlr.step()
    assert hidlr.lrs() == pytest.approx([0.05 * 0.7, 0.1 * 0.7])
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.1]


# ---- 2. only optimizers whose step is linear in lr ----------------------------------------------------


def test_non_rate_linear_optimizers_are_refused_with_the_reason():
    model = TwoBlockLinear()
    refused = [torch.optim.ASGD, torch.optim.Rprop, torch.optim.LBFGS]
    if hasattr(torch.optim, "Adafactor"):
        refused.append(torch.optim.Adafactor)
    for cls in refused:
        opt = cls(model.parameters(), lr=0.01)
        with pytest.raises(ValueError, match=f"cannot wrap {cls.__name__}.*assume_rate_linear=True"):
            HiDLR(opt, model, mse, total_steps=None, probes=None)
    HiDLR(
        torch.optim.ASGD(model.parameters(), lr=0.01),
        model,
        mse,
        assume_rate_linear=True,
        total_steps=None,
        probes=None,
    )  # explicit opt-in

    class MyAdam(torch.optim.Adam):  # a subclass may change the step: not assumed
        pass

    with pytest.raises(ValueError, match="cannot wrap MyAdam"):
        HiDLR(MyAdam(model.parameters(), lr=0.01), model, mse, total_steps=None, probes=None)
    MyAdam.hidlr_rate_linear = True
    HiDLR(MyAdam(model.parameters(), lr=0.01), model, mse, total_steps=None, probes=None)


# ---- 4. a group that does not move keeps its rate and stays out of the solve ---------------------------


def dead_branch_batch(seed):
    x, y = least_squares_batch(seed=seed)
    x[:, 3:] = 0.0  # group b's weights multiply zeros: the loss does not depend on them
    return x, y


@pytest.mark.parametrize("mode", ["diag", "full"])
def test_a_group_without_gradient_keeps_its_rate_exactly(mode):
    torch.manual_seed(4)
    model = TwoBlockLinear()
    # AdamW's weight decay still moves the dead weights, so their update is not zero: the loss decides.
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=0.05, weight_decay=0.1)
    hidlr = HiDLR(opt, model, mse, interval=1, mode=mode, total_steps=None, probes=None)
    for t in range(6):
        mse(model, dead_branch_batch(t)).backward()
        hidlr.step(probe_batch=dead_branch_batch(100 + t))
        opt.zero_grad()
    assert all(r.fired.get("dead") == [1] for r in hidlr.history)
    assert all(r.lrs[1] == 0.05 for r in hidlr.history)  # exactly: no round-off drift
    assert all(math.isnan(r.proposed[1]) for r in hidlr.history)
    assert hidlr.lrs()[0] != 0.05  # the live group is still tuned


def test_full_mode_solves_the_live_groups_alone():
    torch.manual_seed(5)
    runs = {}
    for mode in ("diag", "full"):
        torch.manual_seed(5)
        model = TwoBlockLinear()
        opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.01)
        hidlr = HiDLR(opt, model, mse, interval=1, mode=mode, **RAW, total_steps=None, probes=None)
        mse(model, dead_branch_batch(0)).backward()
        hidlr.step(probe_batch=dead_branch_batch(0))
        runs[mode] = hidlr.last_fit
    # With one live group the full model's solve is that group's 1-D minimiser, the diag one.
    assert runs["full"].lrs[0] == pytest.approx(runs["diag"].lrs[0], rel=1e-9)
    assert runs["full"].fired == {"dead": [1]}


# ---- 5. slope="gradient" needs the gradient of the function the probes evaluate ------------------------


def test_gradient_slope_refuses_a_clipped_gradient():
    torch.manual_seed(6)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=1, slope="gradient", total_steps=None, probes=None)
    batch = least_squares_batch()
    mse(model, batch).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    before = flat(model)
    with pytest.raises(ValueError, match="changed by a factor .* between backward and step"):
        hidlr.step(probe_batch=batch)
    assert torch.equal(flat(model), before)  # refused before stepping
    opt.zero_grad()
    mse(model, batch).backward()  # unclipped: accepted
    hidlr.step(probe_batch=batch)
    assert len(hidlr.history) == 1


def test_gradient_slope_refuses_dropout_and_train_mode_batchnorm_under_eval_probes():
    def gradient_slope(model, **kwargs):
        opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
        return HiDLR(opt, model, mse, slope="gradient", total_steps=None, probes=None, **kwargs)

    dropout = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"active dropout \(1: Dropout\(p=0.3\)\)"):
        gradient_slope(dropout)
    norm = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        gradient_slope(norm)
    gradient_slope(norm, eval_mode=False)  # train-mode probes use the batch statistics, as the gradient did


# ---- 6. probing leaves no trace -------------------------------------------------------------------------


def bn_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))


def test_probes_restore_each_modules_own_mode():
    model = bn_model()
    model.train()
    model[1].eval()  # the user froze the batch norm
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=1, total_steps=None, probes=None)
    train_steps(model, opt, hidlr, 2)
    assert model.training and not model[1].training and model[3].training


def test_train_mode_probes_leave_buffers_and_the_random_state_untouched():
    model = bn_model()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=1, eval_mode=False, total_steps=None, probes=None)
    mse(model, least_squares_batch(seed=0)).backward()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    hidlr.step(probe_batch=least_squares_batch(seed=1))  # 7 train-mode probes with dropout and batch norm
    assert hidlr.probe_forwards == 7  # 2K + 1, K = 3
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # num_batches_tracked, running statistics
    assert torch.equal(torch.get_rng_state(), rng)


# ---- 7. refits are never skipped silently ---------------------------------------------------------------


def test_a_due_refit_waits_for_a_probe_batch_and_a_batch_off_schedule_warns_once():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=3, total_steps=None, probes=None)
    batch = least_squares_batch()
    for _ in range(2):  # due at step 0, but no batch: it waits
        mse(model, batch).backward()
        hidlr.step()
        opt.zero_grad()
    assert hidlr.refit_due and hidlr.history == []
    mse(model, batch).backward()
    hidlr.step(probe_batch=batch)
    assert [r.step for r in hidlr.history] == [2] and not hidlr.refit_due
    with pytest.warns(RuntimeWarning, match="no refit is due.*hidlr.refit_due"):
        hidlr.step(probe_batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        hidlr.step(probe_batch=batch)
    assert [r.step for r in hidlr.history] == [2] and hidlr.refit_due  # next due at step 5


def test_a_loop_that_never_passes_a_batch_is_told():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=4, total_steps=None, probes=None)
    with pytest.warns(RuntimeWarning, match="no probe batch for 4 steps.*refit_due"):
        for _ in range(6):
            hidlr.step()


# ---- 8. checkpoints --------------------------------------------------------------------------------------


def test_load_state_dict_refuses_other_settings_and_is_atomic():
    torch.manual_seed(8)
    model = TwoBlockLinear()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    saved_by = HiDLR(opt, model, mse, interval=2, total_steps=100, probes=None)
    train_steps(model, opt, saved_by, 4)
    state = saved_by.state_dict()
    own = state["hidlr"]

    other = HiDLR(opt, model, mse, interval=7, total_steps=None, probes=None)
    with pytest.raises(
        ValueError, match="interval: saved 2, here 7; max_interval: saved 8, here 28; total_steps: saved 100, here None"
    ):
        other.load_state_dict(state)

    target = HiDLR(opt, model, mse, interval=2, total_steps=100, probes=None)
    train_steps(model, opt, target, 1)
    before = copy.deepcopy(target.state_dict())
    for broken in (
        {k: v for k, v in own.items() if k != "generator"},
        {**own, "multipliers": [1.0]},
        {**own, "multipliers": [1.0, math.nan]},
        {**own, "step_count": -3},
        {**own, "history": [{"bogus": 1}]},
        {**own, "generator": torch.zeros(3)},
    ):
        with pytest.raises(ValueError):
            target.load_state_dict({**state, "hidlr": broken})
        after = target.state_dict()
        assert after["hidlr"]["step_count"] == 1 and after["hidlr"]["history"] == before["hidlr"]["history"]
        assert after["hidlr"]["multipliers"] == before["hidlr"]["multipliers"]
        assert after["state"][0]["step"] == before["state"][0]["step"]  # the base optimizer untouched too
    with pytest.raises(ValueError, match="a plain optimizer state dict goes to hidlr.optimizer.load_state_dict"):
        target.load_state_dict(opt.state_dict())
    target.load_state_dict(state)
    assert target.step_count == 4 and target.multipliers.tolist() == saved_by.multipliers.tolist()


def test_history_is_bounded():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=1, history_size=3, total_steps=None, probes=None)
    train_steps(model, opt, hidlr, 10)
    assert hidlr.n_refits == 10 and [r.step for r in hidlr.history] == [7, 8, 9]


def test_a_loss_fn_that_does_not_return_one_loss_is_named():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    per_example = HiDLR(opt, model, lambda m, b: (m(b[0]) - b[1]).pow(2).squeeze(1), total_steps=None, probes=None)
    with pytest.raises(TypeError, match=r"must return a scalar tensor \(one loss\), got a tensor of shape \(32,\)"):
        per_example.step(probe_batch=least_squares_batch())
    as_float = HiDLR(opt, model, lambda m, b: float(mse(m, b)), total_steps=None, probes=None)
    with pytest.raises(TypeError, match="got float"):
        as_float.step(probe_batch=least_squares_batch())


# ---- found in review -------------------------------------------------------------------------------------


def test_a_group_warming_up_from_zero_does_not_stop_the_others_refits():
    torch.manual_seed(9)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: min(1.0, t / 4)])
    hidlr = HiDLR(
        opt, model, mse, interval=2, total_steps=None, probes=None
    )  # built after the scheduler set group 1's lr to 0
    train_steps(model, opt, hidlr, 6, probe=least_squares_batch(seed=0), scheduler=scheduler)
    first = hidlr.history[0]
    assert not first.rejected and first.fired == {"dead": [1], "trust_region": [0]} and first.lrs[1] == 0.0
    assert first.lrs[0] != 0.05  # group 0 was refitted
    assert hidlr.multipliers[1] != 1.0  # once warmed up, group 1 is tuned too


def test_a_float32_group_with_a_tiny_rate_is_tuned_not_called_dead():
    torch.manual_seed(10)
    model = nn.Linear(4, 1).float()
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.03}, {"params": [model.bias], "lr": 1e-6}])
    hidlr = HiDLR(opt, model, mse, interval=1, smoothing=0.0, total_steps=None, probes=None)  # may double every refit
    x, y = torch.randn(64, 4, dtype=torch.float32), torch.randn(64, 1, dtype=torch.float32) + 3.0
    for _ in range(12):
        mse(model, (x, y)).backward()
        hidlr.step(probe_batch=(x, y))
        opt.zero_grad()
    assert not any("dead" in r.fired for r in hidlr.history)
    assert hidlr.lrs()[1] > 1e-5  # grew from 1e-6


def test_a_group_with_a_zero_update_is_dead_also_under_a_random_design():
    torch.manual_seed(11)
    model = TwoBlockLinear()
    opt = torch.optim.Adam(group_parameters(model, "layer"), lr=0.05)  # no gradient, no decay: u = 0
    hidlr = HiDLR(opt, model, mse, interval=1, design=9, total_steps=None, probes=None)
    for t in range(4):
        mse(model, dead_branch_batch(t)).backward()
        hidlr.step(probe_batch=dead_branch_batch(50 + t))
        opt.zero_grad()
    assert all(r.fired.get("dead") == [1] and r.lrs[1] == 0.05 for r in hidlr.history)


def post_accumulate_hooks(p):
    return len(getattr(p, "_post_accumulate_grad_hooks", None) or {})


def test_gradient_hooks_skip_frozen_parameters_and_leave_with_their_hidlr():
    model = TwoBlockLinear()
    model.b.weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # holds the frozen parameter too
    first = HiDLR(opt, model, mse, slope="gradient", total_steps=None, probes=None)
    second = HiDLR(opt, model, mse, slope="gradient", total_steps=None, probes=None)
    assert post_accumulate_hooks(model.a.weight) == 2 and post_accumulate_hooks(model.b.weight) == 0
    first.close()
    del second
    import gc

    gc.collect()
    assert post_accumulate_hooks(model.a.weight) == 0
    mse(model, least_squares_batch()).backward()  # a plain backward afterwards is unaffected


def test_gradient_slope_checks_the_gradient_a_closure_leaves():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(opt, model, mse, interval=1, slope="gradient", total_steps=None, probes=None)
    batch = least_squares_batch()

    def clipped_closure():
        opt.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        return loss

    with pytest.raises(ValueError, match="changed by a factor"):
        hidlr.step(probe_batch=batch, closure=clipped_closure)


def test_a_checkpoint_round_trips_through_plain_lists():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    hidlr = HiDLR(
        opt, model, mse, interval=2, lr_bounds=[1e-6, 1.0], total_steps=None, probes=None
    )  # a list, as a config file would give
    train_steps(model, opt, hidlr, 3)
    state = hidlr.state_dict()
    config = state["hidlr"]["config"]
    state["hidlr"]["config"] = {**config, "safeguards": {**config["safeguards"], "lr_bounds": [1e-6, 1.0]}}
    again = HiDLR(opt, model, mse, interval=2, lr_bounds=(1e-6, 1.0), total_steps=None, probes=None)
    again.load_state_dict(state)
    assert again.step_count == 3
