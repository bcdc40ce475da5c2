from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hidlr_hpo.curvature import (
    QuadraticFit,
    Safeguards,
    apply_safeguards,
    axial_design,
    fit_quadratic,
    influence,
    limit_rates,
    make_design,
    n_unknowns,
    pairwise_design,
    random_design,
    solve,
)


def random_quadratic(k: int, seed: int = 0, cond: float = 10.0):
    """L(x) = L0 - b^T x + 1/2 x^T A x with A symmetric positive definite."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    eig = torch.logspace(0, math.log10(cond), k)
    A = q @ torch.diag(eig) @ q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(k, generator=g)
    return 1.7, b, A


def evaluate(points, L0, b, A):
    return L0 - points @ b + 0.5 * torch.einsum("pi,ij,pj->p", points, A, points)


def test_unknown_counts():
    assert n_unknowns(3, "diag") == 7
    assert n_unknowns(3, "full") == 1 + 3 + 6
    assert axial_design(3).shape == (7, 3)
    assert pairwise_design(3).shape == (n_unknowns(3, "full"), 3)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_diag_fit_on_axial_design_is_exact_even_with_cross_terms(k):
    L0, b, A = random_quadratic(k)
    x = axial_design(k, delta=0.7)
    fit = fit_quadratic(x, evaluate(x, L0, b, A), "diag")
    # Cross terms vanish on the axes, so the axial design recovers b_k and A_kk exactly.
    torch.testing.assert_close(fit.b, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.diagonal(fit.A), torch.diagonal(A), rtol=1e-10, atol=1e-10)
    assert fit.L0 == pytest.approx(L0, abs=1e-12)
    torch.testing.assert_close(solve(fit), b / torch.diagonal(A), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("design", ["pairwise", 40])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_full_fit_recovers_b_A_and_minimiser(k, design):
    L0, b, A = random_quadratic(k, seed=k)
    x = make_design(design, k, "full", delta=1.3, generator=torch.Generator().manual_seed(1))
    fit = fit_quadratic(x, evaluate(x, L0, b, A), "full")
    torch.testing.assert_close(fit.b, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.A, A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(solve(fit), torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.residuals.abs().max() < 1e-10


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-3, 2),  # smaller steps move the loss by less than float64 can resolve
    cond=st.floats(1.0, 1e3),
)
def test_rescaled_fit_equals_fit_in_rate_coordinates(k, seed, log_scale, cond):
    """Fitting in multipliers of eta0 and rescaling gives the model in learning-rate units."""
    L0, b, A = random_quadratic(k, seed, cond)
    eta0 = 10.0**log_scale * torch.rand(k, generator=torch.Generator().manual_seed(seed)).add(0.5)
    x = pairwise_design(k)
    eta = x * eta0
    fit = fit_quadratic(x, evaluate(eta, L0, b, A), "full").rescale(eta0)
    torch.testing.assert_close(fit.b, b, rtol=1e-6, atol=1e-9 * b.abs().max().item())
    torch.testing.assert_close(fit.A, A, rtol=1e-6, atol=1e-6 * A.abs().max().item())


def test_noise_lowers_r2_and_keeps_estimates_close():
    L0, b, A = random_quadratic(3, seed=3)
    x = random_design(3, 400, generator=torch.Generator().manual_seed(0))
    clean = evaluate(x, L0, b, A)
    noisy = clean + 0.01 * torch.randn(len(clean), generator=torch.Generator().manual_seed(1))
    fit = fit_quadratic(x, noisy, "full")
    assert 0.9 < fit.r2 < 1.0
    torch.testing.assert_close(fit.A, A, atol=0.02, rtol=0.0)
    torch.testing.assert_close(fit.b, b, atol=0.01, rtol=0.0)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="10 unknowns but the design has only 7 points"):
        make_design("axial", 3, "full")
    with pytest.raises(ValueError, match="cannot determine"):
        fit_quadratic(axial_design(3), torch.zeros(7), "full")
    with pytest.raises(ValueError, match="mode must be one of"):
        fit_quadratic(axial_design(3), torch.zeros(7), "diagonal")
    with pytest.raises(ValueError, match="got 6 losses for 7 probe points"):
        fit_quadratic(axial_design(3), torch.zeros(6), "diag")


def test_nonfinite_losses_give_rejected_fit_and_keep_rates():
    x = axial_design(2)
    losses = evaluate(x, 1.0, torch.ones(2), torch.eye(2))
    losses[3] = math.nan
    fit = fit_quadratic(x, losses, "diag")
    assert not fit.is_finite
    prev = torch.tensor([0.1, 0.2])
    out = apply_safeguards(prev, fit, Safeguards())
    assert out.rejected and "nonfinite" in out.fired
    assert torch.equal(out.lrs, prev)


def test_flat_losses_are_nonconvex_and_keep_rates():
    fit = fit_quadratic(axial_design(2), torch.full((5,), 0.3), "diag")
    assert fit.r2 == 1.0
    prev = torch.tensor([0.1, 0.2])
    out = apply_safeguards(prev, fit, Safeguards())
    assert out.fired["nonconvex"] == [0, 1]
    assert torch.equal(out.lrs, prev)


def test_nonconvex_and_nondescent_groups():
    b = torch.tensor([1.0, 1.0, -1.0])
    A = torch.diag(torch.tensor([2.0, -1.0, 4.0]))
    x = axial_design(3)
    fit = fit_quadratic(x, evaluate(x, 0.0, b, A), "diag")
    prev = torch.tensor([0.1, 0.2, 0.3])
    out = apply_safeguards(prev, fit, Safeguards(nondescent_shrink=0.5))
    torch.testing.assert_close(out.lrs, torch.tensor([0.5, 0.2, 0.15]))
    assert out.fired == {"nonconvex": [1], "nondescent": [2]}


def test_full_mode_falls_back_to_diag_when_A_is_not_positive_definite():
    b = torch.tensor([1.0, 2.0])
    A = torch.tensor([[1.0, 3.0], [3.0, 2.0]])  # indefinite, positive diagonal
    x = pairwise_design(2)
    fit = fit_quadratic(x, evaluate(x, 0.0, b, A), "full")
    assert torch.isnan(solve(fit)).all()
    prev = torch.tensor([0.1, 0.1])
    out = apply_safeguards(prev, fit, Safeguards())
    assert out.used_mode == "diag" and "nonconvex_full" in out.fired
    torch.testing.assert_close(out.lrs, torch.tensor([1.0, 1.0]))
    kept = apply_safeguards(prev, fit, Safeguards(full_fallback_diag=False))
    torch.testing.assert_close(kept.lrs, prev)


def test_trust_region_smoothing_and_bounds_in_order():
    b, A = torch.tensor([10.0, 0.01]), torch.eye(2)  # eta* = (10, 0.01)
    x = axial_design(2)
    fit = fit_quadratic(x, evaluate(x, 0.0, b, A), "diag")
    prev = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(apply_safeguards(prev, fit, Safeguards()).lrs, torch.tensor([10.0, 0.01]))
    trusted = apply_safeguards(prev, fit, Safeguards(trust_ratio=2.0))
    torch.testing.assert_close(trusted.lrs, torch.tensor([2.0, 0.5]))
    assert trusted.fired["trust_region"] == [0, 1]
    plain = Safeguards(trust_ratio=2.0, smoothing=0.9, smoothing_bias_correction=False)
    smoothed = apply_safeguards(prev, fit, plain)
    torch.testing.assert_close(smoothed.lrs, torch.tensor([0.9 + 0.1 * 2.0, 0.9 + 0.1 * 0.5]))
    bounded = apply_safeguards(prev, fit, Safeguards(lr_bounds=(0.1, 5.0)))
    torch.testing.assert_close(bounded.lrs, torch.tensor([5.0, 0.1]))


def test_bias_corrected_smoothing_is_an_ema_of_the_proposals():
    """With bias correction, the rates equal Adam-style corrected EMAs of the proposals (no weight on eta0)."""
    s = 0.9
    guards = Safeguards(smoothing=s, smoothing_bias_correction=True)
    x = axial_design(1)
    proposals = [0.5, 2.0, 1.0, 4.0]
    rate, ema = torch.tensor([100.0]), 0.0
    for n, p in enumerate(proposals):
        fit = fit_quadratic(x, evaluate(x, 0.0, torch.tensor([p]), torch.eye(1)), "diag")  # eta* = p
        rate = apply_safeguards(rate, fit, guards, n_accepted=n).lrs
        ema = s * ema + (1 - s) * p
        assert rate.item() == pytest.approx(ema / (1 - s ** (n + 1)), rel=1e-12)


def test_log_smoothing_is_a_geometric_average():
    x = axial_design(2)
    fit = fit_quadratic(x, evaluate(x, 0.0, torch.tensor([4.0, 0.25]), torch.eye(2)), "diag")  # eta* = (4, 1/4)
    guards = Safeguards(smoothing=0.5, smoothing_bias_correction=False, log_smoothing=True)
    out = apply_safeguards(torch.tensor([1.0, 1.0]), fit, guards)
    # sqrt(1 * 4) = 2 and sqrt(1 * 1/4) = 1/2: up and down pull equally in log space.
    torch.testing.assert_close(out.lrs, torch.tensor([2.0, 0.5]))


def test_fast_decreases_skip_the_smoothing_only_downwards():
    x = axial_design(2)
    fit = fit_quadratic(x, evaluate(x, 0.0, torch.tensor([4.0, 0.25]), torch.eye(2)), "diag")  # eta* = (4, 1/4)
    guards = Safeguards(smoothing=0.9, smoothing_bias_correction=False, smooth_decreases=False)
    out = apply_safeguards(torch.tensor([1.0, 1.0]), fit, guards)
    torch.testing.assert_close(out.lrs, torch.tensor([0.9 + 0.1 * 4.0, 0.25]))


def test_min_r2_rejects_poor_fits():
    x = random_design(1, 50, generator=torch.Generator().manual_seed(0))
    losses = torch.randn(50, generator=torch.Generator().manual_seed(1))  # no quadratic structure
    fit = fit_quadratic(x, losses, "diag")
    assert fit.r2 < 0.5
    out = apply_safeguards(torch.tensor([0.1]), fit, Safeguards(min_r2=0.99))
    assert out.rejected and "low_r2" in out.fired


def test_influence_is_predicted_decrease_per_parameter():
    b, A = torch.tensor([2.0, 1.0]), torch.diag(torch.tensor([4.0, 0.5]))
    x = axial_design(2)
    fit = fit_quadratic(x, evaluate(x, 0.0, b, A), "diag")
    # b_k^2 / (2 A_kk) = (0.5, 1.0); per parameter with 10 and 4 parameters.
    torch.testing.assert_close(influence(fit), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(influence(fit, [10, 4]), torch.tensor([0.05, 0.25]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(trust_ratio=0.5), "trust_ratio"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(lr_bounds=(1.0, 0.1)), "lr_bounds"),
        (dict(nondescent_shrink=0.0), "nondescent_shrink"),
    ],
)
def test_safeguard_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Safeguards(**kwargs)


def test_full_mode_partial_nondescent_re_solves_with_the_kept_group_fixed():
    """The issue's case: A^-1 b = (2.89, -2.11); keeping group 2 and moving group 1 to 2.89 would be worse
    (+3.90) than keeping both (+0.40). With group 2 fixed at 1 the best group 1 is b_1 - A_12 = 0.1."""
    A = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    b = torch.tensor([1.0, 0.5])
    fit = QuadraticFit("full", 0.0, b, A, 1.0, torch.zeros(6), 6)
    prev = torch.ones(2)
    result = apply_safeguards(prev, fit, Safeguards())
    assert result.lrs.tolist() == pytest.approx([0.1, 1.0])
    assert result.fired == {"nondescent": [1]}
    assert float(fit.predict(result.lrs[None])[0]) == pytest.approx(-0.005)
    assert float(fit.predict(prev[None])[0]) == pytest.approx(0.4)


def test_full_mode_never_chooses_rates_the_model_predicts_worse_than_the_current_ones():
    gen = torch.Generator().manual_seed(0)
    guard_sets = [
        Safeguards(),
        Safeguards(trust_ratio=2.0, smoothing=0.9),
        Safeguards(trust_ratio=1.5, nondescent_shrink=0.5),
        Safeguards(trust_ratio=4.0, smoothing=0.5, smooth_decreases=False, log_smoothing=True),
    ]
    worse = 0
    for trial in range(400):
        k = 2 + trial % 4
        m = torch.randn(k, k, generator=gen)
        A = m @ m.T + 0.05 * torch.eye(k)  # positive definite, often strongly coupled
        b = torch.randn(k, generator=gen)
        prev = torch.rand(k, generator=gen) + 0.1
        fit = QuadraticFit("full", 0.0, b, A, 1.0, torch.zeros(1), 1)
        result = apply_safeguards(prev, fit, guard_sets[trial % len(guard_sets)])
        chosen, current = (float(fit.predict(x[None])[0]) for x in (result.lrs, prev))
        assert chosen <= current + 1e-12
        assert (result.lrs > 0).all()
        worse += "no_predicted_gain" in result.fired
    assert worse < 400  # the final check is a backstop, not the rule


def test_the_no_gain_check_compares_the_rates_the_step_applies():
    """With a horizon factor f the step uses f * eta: the model must not predict f * new worse than f * prev."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(400):
        k = 2 + trial % 3
        m = torch.randn(k, k, generator=gen)
        A = m @ m.T + 0.05 * torch.eye(k)
        fit = QuadraticFit("full", 0.0, torch.randn(k, generator=gen), A, 1.0, torch.zeros(1), 1)
        prev = torch.rand(k, generator=gen) + 0.1
        result = apply_safeguards(prev, fit, Safeguards(trust_ratio=2.0, smoothing=0.9), applied_scale=0.2)
        chosen, current = fit.predict(torch.stack([result.lrs, prev]) * 0.2).tolist()
        assert chosen <= current + 1e-12


def test_believable_ratio_takes_near_proposals_unsmoothed_and_smooths_far_ones():
    guards = Safeguards(trust_ratio=4.0, smoothing=0.9, believable_ratio=4.0)
    prev = torch.ones(3, dtype=torch.float64)
    proposals = torch.tensor([3.0, 10.0, 0.5], dtype=torch.float64)  # within 4x, beyond, within (down)
    new = limit_rates(prev, proposals, guards)
    # 3x and 0.5x are taken as they are; 10x is clipped to 4x, then smoothed: 0.9 * 1 + 0.1 * 4.
    assert new.tolist() == pytest.approx([3.0, 1.3, 0.5])
    assert limit_rates(prev, proposals, Safeguards(trust_ratio=4.0, smoothing=0.9)).tolist() == pytest.approx(
        [1.2, 1.3, 0.95]
    )
    with pytest.raises(ValueError, match="believable_ratio"):
        Safeguards(believable_ratio=0.5)
