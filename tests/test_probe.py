from __future__ import annotations

import pytest
import torch
from torch import nn

from hidlr_hpo.probe import Prober


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))
    groups = [list(model[0].parameters()) + list(model[1].parameters()), list(model[3].parameters())]
    return model, groups


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_probe_losses_match_manual_evaluation_and_parameters_are_bit_identical():
    model, groups = make()
    batch = (torch.randn(16, 3), torch.randn(16, 1))
    prober = Prober(model, mse, groups)
    start = [[p.detach().clone() for p in g] for g in groups]
    with torch.no_grad():  # the "step": w(t+1) = w(t) + u
        for g in groups:
            for p in g:
                p.add_(0.1 * torch.randn_like(p))
    before = state(model)
    coeffs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0], [0.5, 3.0]])
    losses = prober.losses(batch, start, coeffs)
    assert_bit_identical(before, model)
    assert model.training  # mode restored

    end = [[p.detach().clone() for p in g] for g in groups]
    for row, loss in zip(coeffs, losses, strict=True):
        probe = model.__class__(*[m for m in model])  # same modules; set weights by hand below
        with torch.no_grad():
            for g, gs, ge, c in zip(groups, start, end, row, strict=True):
                for p, s, e in zip(g, gs, ge, strict=True):
                    p.copy_(s + c * (e - s))
        probe.eval()
        expected = mse(probe, batch)
        torch.testing.assert_close(loss, expected.detach().double(), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            for g, ge in zip(groups, end, strict=True):
                for p, e in zip(g, ge, strict=True):
                    p.copy_(e)
    model.train()
    assert_bit_identical(before, model)


def test_a_design_whose_rows_share_coefficients_gives_each_point_its_own_loss_bit_for_bit():
    # Consecutive rows that keep a group's coefficient skip that group's lerp: each loss must still equal the
    # loss of its point probed alone.
    model, groups = make()
    batch = (torch.randn(16, 3), torch.randn(16, 1))
    prober = Prober(model, mse, groups)
    start = [[p.detach().clone() for p in g] for g in groups]
    with torch.no_grad():
        for g in groups:
            for p in g:
                p.add_(0.1 * torch.randn_like(p))
    before = state(model)
    design = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 1.0], [0.0, -1.0], [0.0, -1.0], [1.0, 1.0]])
    together = prober.losses(batch, start, design)
    alone = torch.cat([prober.losses(batch, start, row.unsqueeze(0)) for row in design])
    assert torch.equal(together, alone)
    assert len(set(together.tolist())) > 4  # the points differ: a skipped lerp that was needed would show
    assert_bit_identical(before, model)


def test_parameters_survive_a_loss_that_raises_or_is_nan():
    model, groups = make()
    start = [[p.detach().clone() + 1.0 for p in g] for g in groups]
    before = state(model)
    calls = []

    def exploding(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return mse(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        Prober(model, exploding, groups).losses((torch.randn(4, 3), torch.randn(4, 1)), start, torch.ones(3, 2) * 7)
    assert_bit_identical(before, model)
    nan_batch = (torch.randn(4, 3), torch.full((4, 1), float("nan")))
    losses = Prober(model, mse, groups).losses(nan_batch, start, torch.ones(3, 2))
    assert torch.isnan(losses).all()
    assert_bit_identical(before, model)


def test_batchnorm_statistics_are_untouched_in_eval_mode():
    model, groups = make()
    model.train()
    before = state(model)
    start = [[p.detach().clone() for p in g] for g in groups]
    Prober(model, mse, groups).losses((torch.randn(8, 3) * 5, torch.randn(8, 1)), start, torch.ones(4, 2))
    assert_bit_identical(before, model)  # includes running_mean / running_var / num_batches_tracked


def test_coeff_shape_is_checked():
    model, groups = make()
    start = [[p.detach().clone() for p in g] for g in groups]
    with pytest.raises(ValueError, match=r"coeffs must have shape \(P, 2\)"):
        Prober(model, mse, groups).losses(None, start, torch.ones(3))


def _stepped(seed=0):
    model, groups = make(seed)
    start = [[p.detach().clone() for p in g] for g in groups]
    with torch.no_grad():
        for g in groups:
            for p in g:
                p.add_(0.1 * torch.randn_like(p))
    return model, groups, start


@pytest.mark.parametrize("memory_budget", [1, 10**9])  # one point per chunk, and the whole design at once
def test_batched_probes_equal_sequential_and_leave_parameters_bit_identical(memory_budget):
    model, groups, start = _stepped()
    batch = (torch.randn(16, 3), torch.randn(16, 1))
    coeffs = torch.randn(9, 2)
    before = state(model)
    sequential = Prober(model, mse, groups).losses(batch, start, coeffs)
    batched_prober = Prober(model, mse, groups, batched=True, memory_budget=memory_budget)
    batched = batched_prober.losses(batch, start, coeffs)
    assert batched_prober.fallback_reason is None
    torch.testing.assert_close(batched, sequential, rtol=1e-12, atol=1e-12)  # float64: same maths, same order
    assert_bit_identical(before, model)
    assert model.training  # the mode is restored


def test_batched_probes_fall_back_once_with_a_warning_when_vmap_cannot_run():
    model, groups, start = _stepped()

    def item_loss(m, batch):  # .item() cannot run under vmap
        x, y = batch
        return torch.tensor((m(x) - y).pow(2).mean().item())

    prober = Prober(model, item_loss, groups, batched=True)
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    with pytest.warns(RuntimeWarning, match="cannot run Sequential under vmap"):
        first = prober.losses(batch, start, torch.ones(3, 2))
    assert prober.fallback_reason is not None
    expected = Prober(model, item_loss, groups).losses(batch, start, torch.ones(3, 2))
    assert torch.equal(first, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        prober.losses(batch, start, torch.ones(3, 2))


def test_memory_budget_is_validated():
    model, groups = make()
    with pytest.raises(ValueError, match="memory_budget"):
        Prober(model, mse, groups, batched=True, memory_budget=0)


def test_batched_probes_in_bfloat16_keep_the_coefficients_exact():
    model, groups, start = _stepped()
    model.to(torch.bfloat16)
    start = [[s.to(torch.bfloat16) for s in g] for g in start]
    batch = (torch.randn(16, 3, dtype=torch.bfloat16), torch.randn(16, 1, dtype=torch.bfloat16))
    coeffs = torch.tensor([[1.3699, 0.5], [0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)  # 1.3699 is not a bf16
    sequential = Prober(model, mse, groups).losses(batch, start, coeffs)
    prober = Prober(model, mse, groups, batched=True)
    batched = prober.losses(batch, start, coeffs)
    assert prober.fallback_reason is None
    torch.testing.assert_close(batched, sequential, rtol=1e-2, atol=1e-2)  # bfloat16 forward: ~3 digits
