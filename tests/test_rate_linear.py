"""The optimizers HiDLR accepts: the rescaled step equals the optimizer's own step at the new rate."""

from __future__ import annotations

import copy

import pytest
import torch

from hidlr_hpo.baselines import AdamaxSAGE, AdamWSAGE
from hidlr_hpo.rate_linear import is_rate_linear

optim = torch.optim
ACCEPTED = {
    "SGD": lambda p: optim.SGD(p, lr=0.01, weight_decay=0.01),
    "SGD-momentum": lambda p: optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "SGD-nesterov": lambda p: optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "Adam": lambda p: optim.Adam(p, lr=0.01, weight_decay=0.01),
    "Adam-amsgrad": lambda p: optim.Adam(p, lr=0.01, amsgrad=True),
    "AdamW": lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Adagrad": lambda p: optim.Adagrad(p, lr=0.01, lr_decay=0.01, weight_decay=0.01),
    "RMSprop": lambda p: optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
    "Adamax": lambda p: optim.Adamax(p, lr=0.01, weight_decay=0.01),
    "NAdam": lambda p: optim.NAdam(p, lr=0.01, weight_decay=0.01),
    "NAdam-decoupled": lambda p: optim.NAdam(p, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
    "RAdam": lambda p: optim.RAdam(p, lr=0.01, weight_decay=0.01),
    "Adadelta": lambda p: optim.Adadelta(p, lr=0.5, weight_decay=0.01),
    "AdamaxSAGE": lambda p: AdamaxSAGE(p, lr=0.01, weight_decay=0.01),
    "AdamWSAGE-no-decay": lambda p: AdamWSAGE(p, lr=0.01),
}
NOT_LINEAR = {
    "ASGD": lambda p: optim.ASGD(p, lr=0.01, t0=0),
    "Rprop": lambda p: optim.Rprop(p, lr=0.01),
    "AdamWSAGE-decay": lambda p: AdamWSAGE(p, lr=0.01, weight_decay=0.1),
}


def rescale_gap(make, steps=12):
    """Largest |w| difference between "step at lr, then rescale by c" and "step at c * lr", after warm-up."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20))
    x, y = torch.randn(64, 20), torch.randn(64)
    opt = make([w])
    gap = 0.0
    for t in range(steps):
        opt.zero_grad()
        ((x @ w - y) ** 2).mean().backward()
        if t < 3:  # some state first
            opt.step()
            continue
        w2 = w.detach().clone().requires_grad_(True)
        opt2 = copy.deepcopy(opt)
        opt2.param_groups[0]["params"] = [w2]
        opt2.state = {w2: copy.deepcopy(opt.state[w])}
        w2.grad = w.grad.clone()
        lr, c = opt.param_groups[0]["lr"], 1.7
        opt2.param_groups[0]["lr"] = c * lr
        opt2.step()  # the optimizer's own step at the new rate
        start = w.detach().clone()
        opt.step()
        with torch.no_grad():
            w.copy_(torch.lerp(start, w, c))  # HiDLR's rescale: w(t) + c (w(t+1) - w(t))
        gap = max(gap, float((w - w2).detach().abs().max()) / float(start.abs().max()))
        for key, value in opt.state[w].items():  # the state does not depend on the rate
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                torch.testing.assert_close(value, opt2.state[w2][key], rtol=1e-10, atol=1e-12, msg=key)
        opt.state[w] = opt2.state[w2] = opt.state[w]  # continue from one trajectory
        with torch.no_grad():
            w2.copy_(w)
    return gap


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_optimizers_are_rate_linear(name):
    assert is_rate_linear(ACCEPTED[name]([torch.nn.Parameter(torch.zeros(1))]))
    assert rescale_gap(ACCEPTED[name]) < 1e-12


@pytest.mark.parametrize("name", list(NOT_LINEAR))
def test_refused_optimizers_are_not(name):
    assert not is_rate_linear(NOT_LINEAR[name]([torch.nn.Parameter(torch.zeros(1))]))
    try:
        gap = rescale_gap(NOT_LINEAR[name])
    except AssertionError:  # their state depends on the rate
        return
    assert gap > 1e-9  # far above the accepted ones' round-off (< 1e-12)
