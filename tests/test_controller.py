from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from hidlr_hpo import HiDLR, group_parameters

RAW = dict(trust_ratio=None, smoothing=0.0, min_r2=None, lr_bounds=None)  # every safeguard off


class TwoBlockLinear(nn.Module):
    """f(x) = x[:, :3] @ w_a + x[:, 3:] @ w_b: the MSE is exactly quadratic in (w_a, w_b)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.b = nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def least_squares_batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    x[:, 3:] *= 10.0  # group b sees ~100x the curvature of group a
    y = torch.randn(n, 1, generator=g)
    return x, y


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def clone_with_grads(model, opt):
    """A deep copy of (model, optimizer) that shares nothing, gradients included."""
    m2, o2 = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    return m2, o2


def analytic_rates(model, opt, probe_batch, mode):
    """eta* from the closed-form gradient and Hessian of the MSE and the optimizer's actual direction."""
    b, A, before, d = analytic_model(model, opt, probe_batch)
    if mode == "diag":
        return b / torch.diagonal(A), before, d
    return torch.linalg.solve(A, b), before, d


def analytic_model(model, opt, probe_batch):
    """b_k = G_k^T d_k and A_kj = d_k^T H d_j in learning-rate units, w(t) and the directions d_k."""
    m2, o2 = clone_with_grads(model, opt)
    before = flat(m2)
    o2.step()
    u = flat(m2) - before
    lrs = [g["lr"] for g in opt.param_groups]
    sizes = [sum(p.numel() for p in g["params"]) for g in opt.param_groups]
    masks = torch.zeros(len(sizes), u.numel(), dtype=torch.bool)
    start = 0
    for k, s in enumerate(sizes):
        masks[k, start : start + s] = True
        start += s
    d = torch.stack([torch.where(masks[k], -u / lrs[k], torch.zeros_like(u)) for k in range(len(sizes))])  # (K, n)
    x, y = probe_batch
    n = x.shape[0]
    G = 2.0 / n * x.T @ (x @ before - y.squeeze(1))  # gradient of the MSE at w(t)
    H = 2.0 / n * x.T @ x  # its (constant) Hessian
    b = d @ G  # b_k = G_k^T d_k
    A = d @ H @ d.T  # A_kj = d_k^T H_kj d_j
    return b, A, before, d


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-3),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("mode", ["diag", "full"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_refit_sets_the_analytic_rates(name, mode):
    torch.manual_seed(1)
    model = TwoBlockLinear()
    opt = OPTIMIZERS[name](group_parameters(model, "layer"))
    train_batch = least_squares_batch(seed=0)
    # Plain SGD probes its own training batch (then b_k = |G_k|^2 > 0); the others a held-out batch.
    probe_batch = train_batch if name == "SGD" else least_squares_batch(seed=1)
    for _ in range(3):  # give the optimizer some state first
        mse(model, train_batch).backward()
        opt.step()
        opt.zero_grad()
    mse(model, train_batch).backward()
    expected, w_t, d = analytic_rates(model, opt, probe_batch, mode)
    b, A, _, _ = analytic_model(model, opt, probe_batch)
    prev = torch.tensor([g["lr"] for g in opt.param_groups])

    hidlr = HiDLR(opt, model, mse, interval=1, mode=mode, **RAW, total_steps=None, probes=None)
    hidlr.step(probe_batch=probe_batch)
    fit = hidlr.last_fit
    assert fit.r2 == pytest.approx(1.0)
    torch.testing.assert_close(torch.tensor(fit.proposed), expected, rtol=1e-7, atol=0)
    # Raw maths: the rate is the model's minimiser where it descends, and the previous rate where it does not;
    # in full mode the other group is then re-solved with that one fixed: eta_f = (b_f - A_fc eta_c) / A_ff.
    descends = expected > 0
    applied = torch.where(descends, expected, prev)
    if mode == "full" and descends.sum() == 1:
        f, c = int(descends.nonzero()), int((~descends).nonzero())
        applied[f] = (b[f] - A[f, c] * prev[c]) / A[f, f]
    torch.testing.assert_close(torch.tensor(hidlr.lrs()), applied, rtol=1e-7, atol=0)
    assert fit.fired == ({} if descends.all() else {"nondescent": torch.nonzero(~descends).flatten().tolist()})
    # The step just taken is the optimizer's step with the new rates: w(t+1) = w(t) - sum_k eta_k d_k.
    torch.testing.assert_close(flat(model), w_t - applied @ d, rtol=1e-7, atol=1e-9)
    if name == "SGD" and mode == "diag":
        # Plain gradient directions: the group with ~100x the curvature gets a much smaller rate.
        assert expected[0] / expected[1] > 5


def test_one_group_is_gen():
    torch.manual_seed(2)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "single"), lr=1e-3)
    batch = least_squares_batch()
    mse(model, batch).backward()
    expected, _, _ = analytic_rates(model, opt, batch, "diag")
    hidlr = HiDLR(opt, model, mse, interval=1, **RAW, total_steps=None, probes=None)
    hidlr.step(probe_batch=batch)
    # GeN: eta* = G^T d / d^T H d, and with SGD on the training batch d = G.
    assert hidlr.lrs()[0] == pytest.approx(float(expected[0]), rel=1e-8)


def test_optimizer_state_advances_once_per_step():
    model = TwoBlockLinear()
    opt = torch.optim.Adam(group_parameters(model, "layer"), lr=1e-2)
    hidlr = HiDLR(opt, model, mse, interval=2, total_steps=None, probes=None)
    batch = least_squares_batch()
    for _ in range(5):
        mse(model, batch).backward()
        hidlr.step(probe_batch=batch if hidlr.refit_due else None)
        opt.zero_grad()
    assert len(hidlr.history) == 3  # steps 0, 2, 4
    for p in model.parameters():
        assert int(opt.state[p]["step"]) == 5


def test_nan_probe_rejects_the_fit_and_leaves_parameters_as_a_plain_step():
    model = TwoBlockLinear()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = HiDLR(opt, model, mse, interval=1, total_steps=None, probes=None)
    batch = least_squares_batch()
    mse(model, batch).backward()
    m2, o2 = clone_with_grads(model, opt)
    o2.step()
    x, y = least_squares_batch(seed=5)
    y[3] = math.nan
    hidlr.step(probe_batch=(x, y))
    assert hidlr.n_nonfinite == 1 and hidlr.n_rejected == 1
    assert hidlr.last_fit.rejected and "nonfinite" in hidlr.last_fit.fired
    assert hidlr.lrs() == [1e-2, 1e-2]
    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def run(steps, model, opt, hidlr, data):
    for t in range(steps):
        batch = data[t % len(data)]
        mse(model, batch).backward()
        hidlr.step(probe_batch=data[(t + 1) % len(data)] if hidlr.refit_due else None)
        opt.zero_grad()


def build(seed=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = HiDLR(
        opt, model, mse, interval=3, design=9, total_steps=40, seed=7, probes=None
    )  # random design: RNG state matters
    return model, opt, hidlr


def test_state_dict_round_trip_reproduces_the_trajectory():
    data = [least_squares_batch(seed=s) for s in range(4)]
    model, opt, hidlr = build()
    run(20, model, opt, hidlr, data)

    m1, o1, h1 = build()
    run(10, m1, o1, h1, data)
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "hidlr": h1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m2, o2, h2 = build(seed=99)  # different init: everything must come from the checkpoint
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    h2.load_state_dict(saved["hidlr"])
    for t in range(10, 20):  # continue where the first run stopped
        mse(m2, data[t % 4]).backward()
        h2.step(probe_batch=data[(t + 1) % 4] if h2.refit_due else None)
        o2.zero_grad()

    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert h2.lrs() == hidlr.lrs()
    assert [r.lrs for r in h2.history] == [r.lrs for r in hidlr.history]
    assert h2.step_count == 20 and len(h2.history) == len(hidlr.history) >= 5  # gaps of 3 or 6: adaptive


def test_horizon_scales_the_applied_rate():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.1)
    hidlr = HiDLR(opt, model, mse, interval=1000, total_steps=10, probes=None)
    for t in range(4):
        hidlr.step()  # no probe batch: plain steps
        assert hidlr.lrs() == pytest.approx([0.1 * (1 - t / 10)] * 2)
    assert hidlr.history == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(interval=0), ValueError, "interval must be an int >= 1"),
        (dict(mode="diagonal"), ValueError, "mode must be one of"),
        (dict(total_steps=0), ValueError, "total_steps must be None or an int >= 1"),
        (dict(smoothing=1.5), ValueError, "smoothing"),
        (dict(mode="full", design="axial"), ValueError, "unknowns but the design has only"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=0.1)
    with pytest.raises(error, match=message):
        HiDLR(opt, model, mse, **{"total_steps": None, "probes": None, **kwargs})


def test_bad_optimizer_setups_are_rejected():
    model = TwoBlockLinear()
    nan_lr = torch.optim.SGD(model.parameters(), lr=0.1)
    nan_lr.param_groups[0]["lr"] = math.nan
    with pytest.raises(ValueError, match="lr=nan; a learning rate must be finite and >= 0"):
        HiDLR(nan_lr, model, mse, total_steps=None, probes=None)
    with pytest.raises(ValueError, match="not in the model"):
        HiDLR(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), model, mse, total_steps=None, probes=None)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        HiDLR("adam", model, mse, total_steps=None, probes=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode, design", [("diag", "axial"), ("full", "pairwise"), ("diag", 11)])
def test_optuna_ask_and_tell_with_hidlr_sampler_gives_the_fast_path_rates(mode, design):
    def run(inner):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
        hidlr = HiDLR(opt, model, mse, interval=2, mode=mode, design=design, inner=inner, total_steps=None, probes=None)
        data = [least_squares_batch(seed=s) for s in range(3)]
        run_steps = 8
        for t in range(run_steps):
            mse(model, data[t % 3]).backward()
            hidlr.step(probe_batch=data[(t + 1) % 3] if hidlr.refit_due else None)
            opt.zero_grad()
        return hidlr

    fast, via_optuna = run(None), run("hidlr")
    assert len(fast.history) == len(via_optuna.history) == 4
    for a, b in zip(fast.history, via_optuna.history, strict=True):
        torch.testing.assert_close(torch.tensor(b.lrs), torch.tensor(a.lrs), rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.tensor(b.b), torch.tensor(a.b), rtol=1e-6, atol=1e-9)
    assert via_optuna.probe_forwards == fast.probe_forwards


def grid_factory(space):
    import optuna

    return optuna.samplers.GridSampler({name: [0.25, 0.5, 1.0, 2.0, 4.0] for name in space}, seed=0)


@pytest.mark.parametrize(
    "factory",
    [
        grid_factory,
        lambda space: __import__("optuna").samplers.TPESampler(seed=0),
        lambda space: __import__("optuna").samplers.RandomSampler(seed=0),
        lambda space: __import__("optuna").samplers.CmaEsSampler(seed=0),
        lambda space: __import__("optuna").samplers.GPSampler(seed=0),
    ],
    ids=["grid", "tpe", "random", "cmaes", "gp"],
)
def test_other_optuna_samplers_pick_the_best_probe_with_the_same_budget(factory):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.manual_seed(1)
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    batch = least_squares_batch()
    mse(model, batch).backward()
    hidlr = HiDLR(opt, model, mse, interval=1, inner=factory, **RAW, total_steps=None, probes=None)
    hidlr.step(probe_batch=batch)
    fit = hidlr.last_fit
    assert hidlr.probe_forwards == 5 == len(fit.losses)  # 2K + 1, the axial design's budget
    best = min(range(5), key=lambda j: fit.losses[j])
    assert fit.used_mode == "best-probe"
    # With the safeguards off the new rate is the best probed multiplier times the old rate.
    torch.testing.assert_close(torch.tensor(hidlr.lrs()), torch.tensor(fit.proposed), rtol=1e-12, atol=0)
    assert all(0.25 * 1e-3 <= lr <= 4.0 * 1e-3 for lr in fit.proposed)
    assert fit.losses[best] == min(fit.losses)


def test_inner_must_be_none_hidlr_or_a_factory():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="inner must be None"):
        HiDLR(opt, model, mse, inner="tpe", total_steps=None, probes=None)


def test_measure_realised_changes_nothing_and_matches_the_model_on_a_quadratic():
    """On an exactly quadratic loss the realised decrease equals the predicted one; training is bit-identical."""
    x, y = torch.randn(64, 4), torch.randn(64, 2)

    def loss_fn(m, batch):
        return 0.5 * (m(batch[0]) - batch[1]).pow(2).mean()

    runs = []
    for measure in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(group_parameters(model, "type"), lr=0.05)
        hidlr = HiDLR(
            opt, model, loss_fn, interval=3, mode="full", measure_realised=measure, total_steps=None, probes=None
        )  # exact model
        for _ in range(9):
            loss_fn(model, (x, y)).backward()
            hidlr.step(probe_batch=(x, y) if hidlr.refit_due else None)
            opt.zero_grad()
        runs.append((model, hidlr))
    (plain_model, plain), (measured_model, measured) = runs
    for a, b in zip(plain_model.parameters(), measured_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert plain.probe_forwards == measured.probe_forwards and measured.diagnostic_forwards == 3
    assert all(math.isnan(r.realised_decrease) for r in plain.history)
    for r in measured.history:
        assert r.realised_decrease == pytest.approx(r.predicted_decrease, rel=1e-9, abs=1e-12)


def test_batched_probes_give_the_same_trajectory_as_sequential():
    x, y = torch.randn(64, 4), torch.randn(64, 2)

    def loss_fn(m, batch):
        return 0.5 * (m(batch[0]) - batch[1]).pow(2).mean()

    runs = []
    for batched in (False, True):
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
        hidlr = HiDLR(
            opt, model, loss_fn, interval=2, mode="full", batched_probes=batched, total_steps=None, probes=None
        )
        for _ in range(8):
            loss_fn(model, (x, y)).backward()
            hidlr.step(probe_batch=(x, y) if hidlr.refit_due else None)
            opt.zero_grad()
        runs.append((model, hidlr))
    (seq_model, seq), (bat_model, bat) = runs
    assert bat.prober.fallback_reason is None
    for r_seq, r_bat in zip(seq.history, bat.history, strict=True):
        assert r_bat.losses == pytest.approx(r_seq.losses, rel=1e-12, abs=1e-14)
        assert r_bat.lrs == pytest.approx(r_seq.lrs, rel=1e-9)
    for a, b in zip(seq_model.parameters(), bat_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradient_slope_gives_the_analytic_rates_with_k_plus_one_probes(name):
    """slope='gradient': b from the training gradient, K + 1 probes on the training batch, same eta*."""
    torch.manual_seed(1)
    model = TwoBlockLinear()
    opt = OPTIMIZERS[name](group_parameters(model, "layer"))
    batch = least_squares_batch(seed=0)
    for _ in range(3):
        mse(model, batch).backward()
        opt.step()
        opt.zero_grad()
    mse(model, batch).backward()
    expected, _, _ = analytic_rates(model, opt, batch, "diag")  # probe batch = the gradient's batch
    hidlr = HiDLR(opt, model, mse, interval=1, slope="gradient", **RAW, total_steps=None, probes=None)
    hidlr.step(probe_batch=batch)
    assert hidlr.probe_forwards == 3  # K + 1, against 2K + 1 with slope="probes"
    torch.testing.assert_close(torch.tensor(hidlr.last_fit.proposed), expected, rtol=1e-7, atol=0)


def test_gradient_slope_needs_diag_and_the_default_solver():
    model = TwoBlockLinear()
    opt = torch.optim.SGD(group_parameters(model, "layer"), lr=1e-3)
    for kwargs in ({"mode": "full"}, {"inner": "hidlr"}, {"design": 9}):
        with pytest.raises(ValueError, match="slope='gradient'"):
            HiDLR(opt, model, mse, slope="gradient", **kwargs, total_steps=None, probes=None)
    with pytest.raises(ValueError, match="slope must be"):
        HiDLR(opt, model, mse, slope="hessian", total_steps=None, probes=None)
