"""The research variants of studies/horizon_objectives.py (issue 11, section 2) and the seams they use."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.curvature import QuadraticFit, axial_design, fit_quadratic
from hidlr_hpo.inner import rate_units
from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import train

# Loaded from its file: putting studies/ on sys.path would let studies/peft.py shadow the peft package.
_SPEC = importlib.util.spec_from_file_location(
    "horizon_objectives", Path(__file__).resolve().parents[1] / "studies" / "horizon_objectives.py"
)
horizon_objectives = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(horizon_objectives)
AveragedFit = horizon_objectives.AveragedFit
DiscountedTrajectory = horizon_objectives.DiscountedTrajectory
NoiseGated = horizon_objectives.NoiseGated


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    batches = [(torch.randn(32, 5), torch.randn(32, 1)) for _ in range(8)]
    probe = (torch.randn(32, 5), torch.randn(32, 1))
    return model, batches, probe


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _run(cls, steps: int = 8, after_step=None, **kwargs):
    model, batches, probe = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = cls(opt, model, _loss, probes=None, total_steps=20, interval=2, max_interval=None, **kwargs)
    for batch in batches[:steps]:
        _loss(model, batch).backward()
        hidlr.step(probe_batch=probe if hidlr.refit_due else None)
        opt.zero_grad()
        if after_step is not None:
            after_step(model)
    return hidlr, model


def test_discount_zero_is_greedy_hidlr_bit_for_bit():
    plain, plain_model = _run(HiDLR)
    greedy, greedy_model = _run(DiscountedTrajectory, discount=0.0)
    assert [r.losses for r in greedy.history] == [r.losses for r in plain.history]
    assert [r.lrs for r in greedy.history] == [r.lrs for r in plain.history]
    for p, q in zip(plain_model.parameters(), greedy_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_discounted_probes_centre_is_the_weights_exponential_average():
    """x = 0 of the design is e(t) = mu e(t-1) + (1 - mu) w(t), e(-1) = w(0): its loss, bit for bit."""
    mu = 0.7
    averages = []  # e(t) after every step, computed here with the same arithmetic
    state = {}

    def after_step(model):
        params = [p.detach().clone() for p in model.parameters()]
        if "e" not in state:
            state["e"] = [p.clone() for p in state["w0"]]
        for e, p in zip(state["e"], params, strict=True):
            e.lerp_(p, 1.0 - mu)
        averages.append([e.clone() for e in state["e"]])

    model0, _, probe = _model_and_data()
    state["w0"] = [p.detach().clone() for p in model0.parameters()]
    hidlr, _ = _run(DiscountedTrajectory, after_step=after_step, discount=mu)
    refit = hidlr.history[2]  # the refit at step 4 probes from e(3), the average before step 4's weights
    assert refit.step == 4
    for p, e in zip(model0.parameters(), averages[3], strict=True):
        p.data.copy_(e)
    with torch.no_grad():
        centre = float(_loss(model0, probe).double())
    assert refit.losses[0] == centre
    # and the average is not w(t): the probes really moved their centre
    assert hidlr.history[2].losses[0] != _run(HiDLR)[0].history[2].losses[0]


def test_averaged_fit_averages_b_and_a_across_refits_and_skips_a_nan_fit():
    model, _, _ = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = AveragedFit(opt, model, _loss, probes=None, total_steps=None, fit_smoothing=0.75)
    assert hidlr.guards.smoothing == 0.0  # the rates are not smoothed on top

    def fit(b, a):
        b_t, a_t = torch.tensor(b, dtype=torch.float64), torch.diag(torch.tensor(a, dtype=torch.float64))
        return QuadraticFit("diag", 1.0, b_t, a_t, 1.0, torch.zeros(5), 5)

    first = hidlr._revised_fit(fit([1.0, 2.0], [4.0, 8.0]))
    assert first.b.tolist() == [1.0, 2.0] and first.A.diagonal().tolist() == [4.0, 8.0]
    nan = hidlr._revised_fit(fit([math.nan, 1.0], [1.0, 1.0]))
    assert not nan.is_finite  # passed through (the safeguards reject it), the averages untouched
    second = hidlr._revised_fit(fit([3.0, 0.0], [0.0, 16.0]))
    assert second.b.tolist() == [0.75 * 1.0 + 0.25 * 3.0, 0.75 * 2.0]  # b <- s b_prev + (1 - s) b
    assert second.A.diagonal().tolist() == [0.75 * 4.0, 0.75 * 8.0 + 0.25 * 16.0]


class _RawFits(AveragedFit):
    """AveragedFit that keeps each refit's own fit, before averaging."""

    def _revised_fit(self, fit):
        self.raw = [*getattr(self, "raw", []), fit]
        return super()._revised_fit(fit)


def test_averaged_fit_decides_on_the_averaged_statistics_and_records_them():
    s = 0.5
    hidlr, _ = _run(_RawFits, fit_smoothing=s)
    records, raw = hidlr.history, hidlr.raw
    assert len(records) == len(raw) >= 3 and all(f.is_finite for f in raw)
    assert records[0].b == raw[0].b.tolist()
    for j in range(1, len(records)):
        expected = [s * prev + (1 - s) * new for prev, new in zip(records[j - 1].b, raw[j].b.tolist(), strict=True)]
        assert records[j].b == expected
        assert records[j].b != raw[j].b.tolist()  # the average is not this refit's own fit
        for k, (b, row) in enumerate(zip(records[j].b, records[j].A, strict=True)):
            if row[k] > 0:  # a convex axis: the proposal is the averaged b_k / A_kk
                assert records[j].proposed[k] == pytest.approx(b / row[k], rel=1e-12)


def test_noise_gate_with_two_identical_halves_is_hidlr_on_one_half_bit_for_bit():
    """No noise between the halves: every change with a positive predicted gain is accepted."""
    model, batches, (x, y) = _model_and_data()
    plain, _ = _run(HiDLR)

    def run_gated():
        model, batches, (x, y) = _model_and_data()
        opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
        gated = NoiseGated(opt, model, _loss, probes=None, total_steps=20, interval=2, max_interval=None, gate_z=1.0)
        doubled = (torch.cat([x, x]), torch.cat([y, y]))
        for batch in batches:
            _loss(model, batch).backward()
            gated.step(probe_batch=doubled if gated.refit_due else None)
            opt.zero_grad()
        return gated

    gated = run_gated()
    assert gated.n_gated == 0
    assert [r.losses for r in gated.history] == [r.losses for r in plain.history]
    assert [r.lrs for r in gated.history] == [r.lrs for r in plain.history]


def test_noise_gate_keeps_the_rate_of_a_group_whose_halves_disagree():
    """Group 0: both halves gain from moving; group 1: one half gains, the other loses more than it."""
    model, _, _ = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    gated = NoiseGated(opt, model, _loss, probes=None, total_steps=None, gate_z=1.0)
    points = axial_design(2)
    eta0 = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def quadratic(b, a):  # L(x) = 1 - b^T x + 1/2 sum_k a_k x_k^2, in multipliers x of eta0
        b, a = torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)
        return 1.0 - points @ b + 0.5 * (points**2) @ a

    # x = 1 is the current rate. Pooled: group 0 proposes 1.9x (gains 0.495 and 0.315 at 1.9x: accepted),
    # group 1 2.2x, clipped to 2x by the trust region, where the halves predict +2.5 and -1.1 (mean 0.7 < 1.8).
    first, second = quadratic([2.0, 4.0], [1.0, 1.0]), quadratic([1.8, 0.4], [1.0, 1.0])
    # The step used half the level (a horizon factor 0.5), so the probes' coefficients are c = x eta0 / applied = 2x.
    applied = 0.5 * eta0
    gated.prober.halves, gated.prober.coeffs = (first, second), points * (eta0 / applied)
    gated._context = (eta0, applied, 0)
    pooled = rate_units(fit_quadratic(points, (first + second) / 2, "diag"), eta0)
    revised = gated._revised_fit(pooled)
    assert gated.n_gated == 1
    assert float(pooled.b[1] / pooled.A[1, 1]) == pytest.approx(2.2 * 2.0, rel=1e-12)  # what the gate stops
    assert revised.b[0] == pooled.b[0]  # both halves say go up: the proposal stands
    assert revised.b[1] == pytest.approx(float(pooled.A[1, 1] * eta0[1]), rel=1e-12)  # minimum at eta0
    assert float(revised.b[1] / revised.A[1, 1]) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (DiscountedTrajectory, {"discount": 1.0}, "discount must be in"),
        (DiscountedTrajectory, {"discount": 0.5, "slope": "gradient"}, "slope='probes'"),
        (AveragedFit, {"fit_smoothing": -0.1}, "fit_smoothing must be in"),
        (NoiseGated, {"gate_z": 1.0, "mode": "full"}, "diag fit"),
        (NoiseGated, {"gate_z": -1.0}, "gate_z must be"),
    ],
)
def test_the_variants_refuse_what_they_do_not_support(cls, kwargs, message):
    model, _, _ = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    with pytest.raises(ValueError, match=message):
        cls(opt, model, _loss, probes=None, total_steps=None, **kwargs)


@pytest.fixture
def _float32():
    torch.set_default_dtype(torch.float32)  # the real tasks run in float32


@pytest.mark.usefixtures("_float32")
def test_train_probe_batch_size_sets_the_held_out_batch_and_its_compute():
    task = get_task("digits")
    result = train(task, lr=1e-3, epochs=1, seed=0, hidlr=dict(horizon=True), probe_batch_size=16)
    # one epoch trains on every example once (3 forward-equivalents each); every probe forward sees 16 examples
    assert result.hidlr.probe_forwards > 0
    assert result.compute == 3 * len(task.train) + 16 * result.hidlr.probe_forwards


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"probe_batch_size": 0}, ValueError, "probe_batch_size must be"),
        ({"probe_batch_size": 16, "probe": "train"}, ValueError, "held-out probe batch"),
        ({"hidlr_class": torch.optim.AdamW}, TypeError, "hidlr_class must be HiDLR"),
        ({"hidlr": None, "probe_batch_size": 16}, ValueError, "pass hidlr="),
        ({"hidlr": None, "hidlr_class": DiscountedTrajectory}, ValueError, "pass hidlr="),
    ],
)
@pytest.mark.usefixtures("_float32")
def test_train_refuses_a_bad_probe_batch_size_or_class(kwargs, error, message):
    with pytest.raises(error, match=message):
        train(get_task("digits"), lr=1e-3, epochs=1, **{"hidlr": dict(horizon=True), **kwargs})


VARIANTS = [
    (DiscountedTrajectory, {"discount": 0.7}),
    (AveragedFit, {"fit_smoothing": 0.5}),
    (NoiseGated, {"gate_z": 1.0}),
    (horizon_objectives.DiscountedAveragedFit, {"discount": 0.7, "fit_smoothing": 0.5}),
]


def _steps(hidlr, model, batches, probe):
    for batch in batches:
        _loss(model, batch).backward()
        hidlr.step(probe_batch=probe if hidlr.refit_due else None)
        hidlr.zero_grad()


@pytest.mark.parametrize("cls, kwargs", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_variant_resumed_from_its_state_dict_continues_bit_for_bit(cls, kwargs):
    def build():
        model, batches, (x, y) = _model_and_data()
        opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
        hidlr = cls(opt, model, _loss, probes=None, total_steps=20, interval=2, max_interval=None, **kwargs)
        return hidlr, model, batches, (torch.cat([x, x[:16]]), torch.cat([y, y[:16]]))  # halves that differ

    straight, model, batches, probe = build()
    _steps(straight, model, batches, probe)
    first, model1, batches1, probe1 = build()
    _steps(first, model1, batches1[:3], probe1)
    saved = copy.deepcopy(first.state_dict())
    resumed, model2, batches2, probe2 = build()
    model2.load_state_dict(model1.state_dict())
    resumed.load_state_dict(saved)
    _steps(resumed, model2, batches2[3:], probe2)
    assert [r.lrs for r in resumed.history] == [r.lrs for r in straight.history]
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="other settings"):  # a variant's checkpoint does not load into HiDLR
        plain_model, _, _ = _model_and_data()
        opt = torch.optim.AdamW(group_parameters(plain_model, "layer"), lr=1e-2)
        HiDLR(opt, plain_model, _loss, probes=None, total_steps=20, interval=2, max_interval=None).load_state_dict(
            saved
        )


@pytest.mark.parametrize("cls, kwargs", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_variant_runs_step_hooks_once_and_copies(cls, kwargs):
    HiDLR(*_plain_args(), probes=None, total_steps=None)  # a plain HiDLR first: torch wraps HiDLR.step too
    model, batches, probe = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    hidlr = cls(opt, model, _loss, probes=None, total_steps=20, interval=2, max_interval=None, **kwargs)
    calls = []
    hidlr.register_step_post_hook(lambda *args: calls.append(1))
    _steps(hidlr, model, batches[:3], probe)
    assert len(calls) == 3
    clone = copy.deepcopy(hidlr)
    assert clone.config() == hidlr.config()


def _plain_args():
    model, _, _ = _model_and_data()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    return opt, model, _loss


def test_averaged_fit_refuses_the_known_slope_and_the_gate_a_one_example_batch():
    opt, model, loss = _plain_args()
    with pytest.raises(ValueError, match="slope='probes'"):
        AveragedFit(opt, model, loss, probes=None, total_steps=None, fit_smoothing=0.5, slope="gradient")
    gated = NoiseGated(opt, model, loss, probes=None, total_steps=None, gate_z=1.0)
    loss(model, (torch.randn(4, 5), torch.randn(4, 1))).backward()
    with pytest.raises(ValueError, match="two halves"):
        gated.step(probe_batch=(torch.randn(1, 5), torch.randn(1, 1)))


@pytest.mark.usefixtures("_float32")
def test_train_builds_the_hidlr_class_it_is_given():
    result = train(get_task("digits"), lr=1e-3, epochs=1, hidlr=dict(horizon=True, discount=0.5),
                   hidlr_class=DiscountedTrajectory)  # fmt: skip
    assert type(result.hidlr) is DiscountedTrajectory and result.hidlr.n_refits > 0


@pytest.mark.usefixtures("_float32")
def test_a_probe_batch_larger_than_the_validation_split_is_warned():
    with pytest.warns(UserWarning, match="larger than the validation split"):
        train(get_task("digits"), lr=1e-3, epochs=1, hidlr=dict(horizon=True), probe_batch_size=10_000)
