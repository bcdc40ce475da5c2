"""Property-based tests (hypothesis): the study-file loader and the curvature fit take any input and either
give a valid result or one clean error, never a crash; on an exact quadratic the fit is the quadratic."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hidlr_hpo.config import StudyConfig, load_study_config
from hidlr_hpo.curvature import fit_quadratic, make_design, n_unknowns, solve

# Plausible keys (so that the loader gets past the first level) mixed with anything.
KEYS = st.sampled_from(
    ["name", "seeds", "task", "budget", "methods", "storage", "results_dir", "kind", "lrs", "lr", "options",
     "epochs", "batch_size", "n_trials", "low", "high", "pruner", "mode", "grouping", "optimizer", "x"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=5),
    max_leaves=25,
)
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=8)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(CONFIGS)
def test_the_study_model_takes_any_mapping(data):
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError:
        return  # a clean, field-naming error
    assert cfg.methods and cfg.seeds  # valid: it has what a study needs


@SETTINGS
@given(st.text(max_size=400))
def test_the_study_file_loader_takes_any_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "s.toml"
    path.write_text(text)
    try:
        load_study_config(path)
    except ValueError as exc:
        assert str(path) in str(exc)  # names the file


@SETTINGS
@given(
    k=st.integers(1, 4),
    mode=st.sampled_from(["diag", "full"]),
    extra=st.integers(0, 6),
    losses=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=40, max_size=40),
)
def test_the_fit_takes_any_losses(k, mode, extra, losses):
    points = make_design("axial" if mode == "diag" else "pairwise", k, mode, 1.0, torch.Generator().manual_seed(0))
    p = points.shape[0] + extra
    points = torch.cat([points, torch.rand(extra, k, dtype=points.dtype, generator=torch.Generator().manual_seed(1))])
    fit = fit_quadratic(points, torch.tensor(losses[:p], dtype=torch.float64), mode)
    finite_input = all(math.isfinite(v) for v in losses[:p])
    if not finite_input:
        assert not fit.is_finite  # NaN coefficients, which the safeguards reject
        return
    # Finite losses: a finite fit, unless they are so large that their squares overflow.
    if max(abs(v) for v in losses[:p]) < 1e150:
        assert fit.is_finite
        proposal = solve(fit)
        assert proposal.shape == (k,)  # NaN where the model has no minimum, never an error


@SETTINGS
@given(
    k=st.integers(1, 4),
    mode=st.sampled_from(["diag", "full"]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-4, 1e3),
)
def test_on_an_exact_quadratic_the_fit_is_the_quadratic(k, mode, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(k, generator=gen, dtype=torch.float64) * scale
    root = torch.randn(k, k, generator=gen, dtype=torch.float64)
    a = root @ root.T + k * torch.eye(k, dtype=torch.float64)  # positive definite
    if mode == "diag":
        a = torch.diag(torch.diagonal(a))
    a = a * scale
    points = make_design("axial" if mode == "diag" else "pairwise", k, mode, 1.0, gen)
    assert points.shape[0] >= n_unknowns(k, mode)
    losses = 2.0 - points @ b + 0.5 * torch.einsum("pi,ij,pj->p", points, a, points)
    fit = fit_quadratic(points, losses, mode)
    assert fit.b == pytest.approx(b, rel=1e-6, abs=1e-8 * scale)
    assert fit.A.flatten().tolist() == pytest.approx(a.flatten().tolist(), rel=1e-6, abs=1e-8 * scale)
    assert solve(fit).tolist() == pytest.approx(torch.linalg.solve(a, b).tolist(), rel=1e-5, abs=1e-9)
