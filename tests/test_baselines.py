"""SAGE updates against values computed by hand, GeN's preset, schedules, and the learning-rate-free peers."""

from __future__ import annotations

import math

import pytest
import torch

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.baselines import (
    GEN_DEFAULTS,
    AdamaxSAGE,
    AdamWSAGE,
    GeN,
    make_optimizer,
    make_schedule,
    schedule_factor,
    set_eval_mode,
)

# Two steps on f(w) = sum (w - c_t)^2 with a moving target, so the sensitivity |w * g| changes between steps.
W0 = [1.0, -2.0]
TARGETS = [0.0, 0.5]


def _run(opt_cls, steps=2, **kwargs):
    w = torch.nn.Parameter(torch.tensor(W0))
    opt = opt_cls([w], **kwargs)
    for target in TARGETS[:steps]:
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    return w.detach(), opt


def _adamw_sage_by_hand(lr, b1, b2, b3, eps, wd, sensitivity=True):
    """AdamW-SAGE written out with Python floats, element by element."""
    out = []
    for w in W0:
        m = v = ibar = 0.0
        for t, c in enumerate(TARGETS, start=1):
            g = 2 * (w - c)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            scale = 1.0
            if sensitivity:
                i = abs(w * g)
                ibar = b3 * ibar + (1 - b3) * i
                ihat = ibar / (1 - b3**t)
                scale = abs(i - ihat) / (ihat + eps**2)
            w = w - step * scale * m / (math.sqrt(v) + eps)
            w = w * (1 - lr * wd)
        out.append(w)
    return out


def _adamax_sage_by_hand(lr, b1, b2, b3, eps, wd, sensitivity=True):
    out = []
    for w in W0:
        m = u = ibar = 0.0
        for c in TARGETS:
            g = 2 * (w - c)
            m = b1 * m + (1 - b1) * g
            u = max(b2 * u, abs(g) + eps)
            update = m / (u + eps) + wd * w
            scale = 1.0
            if sensitivity:
                i = abs(w * g)
                ibar = b3 * ibar + (1 - b3) * i
                scale = abs(i - ibar) / (ibar + eps**2)
            w = w - lr * scale * update
        out.append(w)
    return out


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("b3", [0.6, 0.75, 0.9])
def test_adamw_sage_matches_hand_computation(b3, wd):
    w, _ = _run(AdamWSAGE, lr=0.1, beta3=b3, weight_decay=wd)
    expected = _adamw_sage_by_hand(0.1, 0.9, 0.999, b3, 1e-6, wd)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("b3", [0.6, 0.75, 0.9])
def test_adamax_sage_matches_hand_computation(b3, wd):
    w, _ = _run(AdamaxSAGE, lr=0.1, beta3=b3, weight_decay=wd)
    expected = _adamax_sage_by_hand(0.1, 0.9, 0.999, b3, 1e-6, wd)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-12, atol=1e-12)


def test_adamw_sage_second_step_by_hand():
    # Written out once with the numbers: target 0.5, w = (1, -2) unchanged by step 1 (U_1 = 0), g_2 = (1, -5).
    # I_bar_2 = 0.75 * 0.25 * (2, 8) + 0.25 * (1, 10) = (0.625, 4); I_hat = I_bar / 0.4375 = (1.4286, 9.1429);
    # U / I_hat = (0.3, 0.09375); m_2 = (0.28, -0.86); v_2 = (0.004996, 0.040984).
    w, _ = _run(AdamWSAGE, lr=0.1)
    step = 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    delta = [0.3 * 0.28 / (math.sqrt(0.004996) + 1e-6), 0.09375 * -0.86 / (math.sqrt(0.040984) + 1e-6)]
    torch.testing.assert_close(w, torch.tensor([1.0 - step * delta[0], -2.0 - step * delta[1]]), rtol=1e-6, atol=0)


def test_adamw_sage_first_step_does_not_move_scaled_elements():
    w, _ = _run(AdamWSAGE, steps=1, lr=0.1)
    assert torch.equal(w, torch.tensor(W0))


def test_sensitivity_off_is_plain_adamw_and_adamax():
    # torch puts eps inside the bias correction (sqrt(v / bc2) + eps): equal up to eps-sized differences
    torch.testing.assert_close(_run_plain(AdamWSAGE, lr=0.1), _run_torch(torch.optim.AdamW, lr=0.1), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        _run_plain(AdamWSAGE, lr=0.1, weight_decay=0.1),
        torch.tensor(_adamw_sage_by_hand(0.1, 0.9, 0.999, 0.75, 1e-6, 0.1, sensitivity=False)),
    )
    torch.testing.assert_close(
        _run_plain(AdamaxSAGE, lr=0.1, weight_decay=0.1),
        torch.tensor(_adamax_sage_by_hand(0.1, 0.9, 0.999, 0.75, 1e-6, 0.1, sensitivity=False)),
    )


def _run_plain(opt_cls, **kwargs):
    w = torch.nn.Parameter(torch.tensor(W0))
    opt = opt_cls([{"params": [w], "sensitivity": False}], **kwargs)
    for target in TARGETS:
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    return w.detach()


def _run_torch(opt_cls, **kwargs):
    # torch's AdamW decays before the step; with weight_decay=0 the two orders agree.
    w = torch.nn.Parameter(torch.tensor(W0))
    opt = opt_cls([w], eps=1e-6, weight_decay=0.0, **kwargs)
    for target in TARGETS:
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    return w.detach()


def test_sage_records_mean_scale_and_state_dict_round_trip():
    w, opt = _run(AdamWSAGE, lr=0.1)
    assert opt.param_groups[0]["mean_scale"] == pytest.approx((0.3 + 0.09375) / 2, rel=1e-5)
    w2 = torch.nn.Parameter(w.clone())
    opt2 = AdamWSAGE([w2], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[w2]["exp_avg_ipt"], opt.state[opt.param_groups[0]["params"][0]]["exp_avg_ipt"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"beta3": 1.0}, "beta3"),
        ({"eps": -1e-6}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"sensitivity_eps": -1.0}, "sensitivity_eps"),
    ],
)
def test_sage_rejects_bad_hyperparameters(kwargs, match):
    for cls in (AdamWSAGE, AdamaxSAGE):
        with pytest.raises(ValueError, match=match):
            cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_make_optimizer_plain_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = make_optimizer("adamax-sage", group_parameters(model, "layer"), 1e-3, plain_groups=["Linear_2"], beta3=0.8)
    assert [g["sensitivity"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["beta3"] == 0.8
    with pytest.raises(ValueError, match="unknown groups"):
        make_optimizer("adamw-sage", group_parameters(model, "layer"), 1e-3, plain_groups=["head"])
    with pytest.raises(ValueError, match="SAGE optimizers only"):
        make_optimizer("adamw", group_parameters(model, "layer"), 1e-3, plain_groups=["Linear_2"])
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        make_optimizer("adamm", group_parameters(model, "layer"), 1e-3)


def test_gen_preset_is_hidlr_with_one_group():
    model = torch.nn.Linear(3, 1)
    gen = GeN(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        lambda m, b: m(b).pow(2).mean(),
        smoothing=0.5,
        total_steps=None,
        probes=None,
    )
    assert isinstance(gen, HiDLR)
    assert (gen.interval, gen.guards.min_r2, gen.guards.trust_ratio, gen.guards.smoothing) == (4, 0.99, 2.0, 0.5)
    assert GEN_DEFAULTS["delta"] == 1.0 and GEN_DEFAULTS["design"] == "axial"  # multipliers {0, +1, -1}
    two = torch.optim.SGD(group_parameters(torch.nn.Sequential(model, torch.nn.Linear(1, 1)), "layer"), lr=0.1)
    with pytest.raises(ValueError, match="one learning rate"):
        GeN(two, model, lambda m, b: m(b).sum(), total_steps=None, probes=None)


def test_gen_preset_recovers_the_analytic_rate_on_a_quadratic():
    # Least squares 1/2n |Xw - y|^2 with SGD: eta* = g^T g / g^T H g after one refit with safeguards off.
    x, y = torch.randn(32, 3), torch.randn(32)
    model = torch.nn.Linear(3, 1, bias=False)

    def loss_fn(m, batch):
        return 0.5 * (m(batch[0]).squeeze(-1) - batch[1]).pow(2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = GeN(opt, model, loss_fn, trust_ratio=None, smoothing=0.0, lr_bounds=None, total_steps=None, probes=None)
    loss_fn(model, (x, y)).backward()
    g = model.weight.grad.flatten().clone()
    gen.step(probe_batch=(x, y))
    hessian = x.T @ x / len(x)
    assert gen.lrs()[0] == pytest.approx(float(g @ g / (g @ hessian @ g)), rel=1e-9)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules(name):
    f = schedule_factor(name, total_steps=11, warmup_steps=1)
    assert f(0) == pytest.approx(0.5)  # warm-up: (t + 1) / (warmup + 1)
    assert f(1) == pytest.approx(1.0)
    expected_mid = {"constant": 1.0, "linear": 0.5, "cosine": 0.5}[name]
    assert f(6) == pytest.approx(expected_mid)
    assert 0 <= f(10) <= 1
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}], lr=0.1)
    sched = make_schedule(opt, name, total_steps=11, warmup_steps=1)
    for _ in range(6):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * expected_mid, 0.01 * expected_mid])


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        schedule_factor("step", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedule_factor("cosine", 10, warmup_steps=10)


@pytest.mark.parametrize("name", ["prodigy", "dadapt-adam", "schedulefree-adamw"])
def test_learning_rate_free_peers_train(name):
    pytest.importorskip({"prodigy": "prodigyopt", "dadapt-adam": "dadaptation"}.get(name, "schedulefree"))
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = torch.nn.Linear(3, 1)
    opt = make_optimizer(
        name, [{"params": list(model.parameters()), "name": "all"}], 1.0 if name != "schedulefree-adamw" else 0.05
    )
    set_eval_mode(opt, False)
    first = None
    for _ in range(200):
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_eval_mode(opt, True)
    assert float((model(x).squeeze(-1) - y).pow(2).mean().detach()) < 0.1 * first


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_sage_in_float16_stays_finite(cls):
    # eps**2 = 1e-12 is 0 in float16: elements with theta = 0 or g = 0 must not give 0 / 0.
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float16))
    opt = cls([w], lr=0.01)
    for grad in ([0.5, 0.0, 0.3], [0.4, 0.0, 0.2], [0.1, 0.0, 0.6]):
        w.grad = torch.tensor(grad, dtype=torch.float16)
        opt.step()
    assert torch.isfinite(w).all() and math.isfinite(opt.param_groups[0]["mean_scale"])


def test_sage_warns_about_an_all_zero_sensitivity_scaled_parameter():
    b = torch.nn.Parameter(torch.zeros(3))  # like LoRA's B at initialisation
    opt = AdamWSAGE([b], lr=0.1)
    b.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="all zeros .* plain_groups"):
        opt.step()
    plain = AdamWSAGE([{"params": [torch.nn.Parameter(torch.zeros(3))], "sensitivity": False}], lr=0.1)
    plain.param_groups[0]["params"][0].grad = torch.ones(3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.step()  # a plain group is not scaled: no warning, and it moves
    assert plain.param_groups[0]["params"][0].abs().sum() > 0
