from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.testing.pytest_samplers import BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase
from optuna.trial import TrialState

from hidlr_hpo import HiDLRSampler
from hidlr_hpo.curvature import n_unknowns

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TestOptunaSamplerCases(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    """Optuna's own test cases for single-objective relative samplers."""

    @pytest.fixture
    def sampler(self):
        return lambda: HiDLRSampler(seed=0)


def attrs(study, trial):
    """The system attributes the sampler stored for a live trial (as another worker sees them)."""
    return study._storage.get_trial(trial._trial_id).system_attrs


def quadratic_problem(d: int, seed: int = 0):
    """f(x) = (x - m)^T Q (x - m) + 1 on [-5, 5]^d with Q positive definite and m inside the first box."""
    rng = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rng.randn(d, d))
    Q = q @ np.diag(np.linspace(1.0, 5.0, d)) @ q.T
    m = rng.uniform(-2.0, 2.0, size=d)

    def objective(trial):
        x = np.array([trial.suggest_float(f"x{i}", -5, 5) for i in range(d)])
        return float((x - m) @ Q @ (x - m)) + 1.0

    space = {f"x{i}": FloatDistribution(-5, 5) for i in range(d)}
    return objective, space


@pytest.mark.parametrize("d", [2, 4, 8])
def test_finds_a_quadratic_minimum_in_far_fewer_trials_than_tpe_or_random(d):
    objective, space = quadratic_problem(d)
    budget = n_unknowns(d, "full") + 1  # one pairwise design, then the model's minimiser
    gaps = {}
    for name, sampler in {
        "hidlr": HiDLRSampler(search_space=space, radius=0.3, design="pairwise", seed=0),
        "tpe": optuna.samplers.TPESampler(seed=0),
        "random": optuna.samplers.RandomSampler(seed=0),
    }.items():
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=budget)
        gaps[name] = study.best_value - 1.0
    assert gaps["hidlr"] < 1e-9
    assert gaps["tpe"] > 1e-2 and gaps["random"] > 1e-2


def test_fit_recovers_the_model_in_parameter_units_with_log_scale():
    # f = 2 (ln lr - ln 1e-3)^2 + (w - 0.3)^2 + 0.5 (ln lr - ln 1e-3) (w - 0.3): quadratic in (ln lr, w).
    def objective(trial):
        u = math.log(trial.suggest_float("lr", 1e-6, 1.0, log=True)) - math.log(1e-3)
        w = trial.suggest_float("w", -1.0, 1.0) - 0.3
        return 2 * u**2 + w**2 + 0.5 * u * w + 7.0

    space = {"lr": FloatDistribution(1e-6, 1.0, log=True), "w": FloatDistribution(-1.0, 1.0)}
    sampler = HiDLRSampler(search_space=space, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=6)
    fit = sampler.fit(study)
    # In parameter units p = (ln lr, w): A = [[4, 0.5], [0.5, 2]] and the minimiser is (ln 1e-3, 0.3).
    np.testing.assert_allclose(fit.A.numpy(), [[4.0, 0.5], [0.5, 2.0]], rtol=1e-8)
    minimiser = np.linalg.solve(fit.A.numpy(), fit.b.numpy())
    np.testing.assert_allclose(minimiser, [math.log(1e-3), 0.3], rtol=1e-8)
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].params["lr"] == pytest.approx(1e-3, rel=1e-8)
    assert study.best_value == pytest.approx(7.0, abs=1e-12)


def test_maximize_direction():
    study = optuna.create_study(direction="maximize", sampler=HiDLRSampler(seed=1))
    study.optimize(lambda t: -((t.suggest_float("x", -3, 3) - 1.2) ** 2), n_trials=6)
    assert study.best_params["x"] == pytest.approx(1.2, abs=1e-9)


def test_a_failed_or_pruned_point_is_used_up_and_scored_as_bad():
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0))
    first = study.ask(space)
    study.tell(first, state=TrialState.FAIL)
    second = study.ask(space)
    assert attrs(study, first)["hidlr:index"] == 0 and attrs(study, second)["hidlr:index"] == 1  # moved on
    with pytest.warns(UserWarning, match="nan is not acceptable"):
        study.tell(second, float("nan"))  # Optuna fails a NaN objective
    third = study.ask(space)
    study.tell(third, state=TrialState.PRUNED)
    assert attrs(study, third)["hidlr:index"] == 2
    # With a few failures the search still finds the minimum of a quadratic.
    calls = []

    def objective(trial):
        x, y = trial.suggest_float("x", -4, 4), trial.suggest_float("y", -4, 4)
        calls.append(1)
        return float("nan") if len(calls) == 3 else (x - 1) ** 2 + (y + 1) ** 2

    study.optimize(objective, n_trials=25)
    assert study.best_value < 1e-3


def test_a_region_that_always_fails_does_not_stall_the_rounds():
    def objective(trial):
        x, y = trial.suggest_float("x", -4, 4), trial.suggest_float("y", -4, 4)
        if x > 2.0:
            raise RuntimeError("diverged")  # a region where training always fails
        return (x - 1.5) ** 2 + (y + 1) ** 2

    study = optuna.create_study(sampler=HiDLRSampler(seed=0, radius=0.5, x0={"x": 3.0, "y": 0.0}))
    study.optimize(objective, n_trials=40, catch=(RuntimeError,))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    asked = Counter(tuple(t.params.values()) for t in failed)
    assert max(asked.values()) <= 2  # a failing point is not asked again and again (29 of 30 times, before)
    assert len(failed) < 20
    assert study.best_value < 0.05  # near the minimum at the edge of the failing region


def test_conditional_parameters_are_left_out_of_the_fit_and_warned_about_once(caplog):
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}

    def objective(trial):
        x = trial.suggest_float("x", -4, 4)
        y = trial.suggest_float("y", -4, 4) if x < 1.0 else 0.0  # y exists only for some x
        trial.suggest_categorical("act", ["relu", "tanh"])
        return (x - 0.5) ** 2 + (y + 1) ** 2

    study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0))
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            study.optimize(objective, n_trials=30)  # used to raise KeyError when a round ended
    finally:
        optuna.logging.disable_propagation()
    assert len(study.trials) == 30 and study.best_value < 0.05
    warned = [r for r in caplog.records if "independent sampler" in r.getMessage()]
    assert len(warned) == 1 and "'act'" in warned[0].getMessage()
    quiet = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0, warn_independent_sampling=False))
    caplog.clear()
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            quiet.optimize(objective, n_trials=5)
    finally:
        optuna.logging.disable_propagation()
    assert not [r for r in caplog.records if "independent sampler" in r.getMessage()]


def test_workers_on_one_sqlite_storage_share_the_round(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    a = optuna.create_study(study_name="s", storage=storage, sampler=HiDLRSampler(search_space=space, seed=0))
    b = optuna.load_study(study_name="s", storage=storage, sampler=HiDLRSampler(search_space=space, seed=1))

    def f(p):
        return (p["x"] - 0.5) ** 2 + 2 * (p["y"] + 1.5) ** 2 + 0.3 * p["x"] * p["y"]

    trials = []
    for _ in range(3):  # two workers ask in turn while the other's trial is still running
        for study in (a, b):
            trial = study.ask(space)
            trials.append((study, trial))
    indices = [attrs(study, t)["hidlr:index"] for study, t in trials]
    assert sorted(indices) == list(range(6))  # the six points of one pairwise design, none twice
    for study, trial in trials:
        study.tell(trial, f(trial.params))
    nxt = b.ask(space)
    assert attrs(b, nxt)["hidlr:round"] == 1
    # The minimiser of the exact quadratic: 2(x - .5) + .3y = 0, 4(y + 1.5) + .3x = 0.
    expected = np.linalg.solve([[2.0, 0.3], [0.3, 4.0]], [1.0, -6.0])
    np.testing.assert_allclose([nxt.params["x"], nxt.params["y"]], expected, rtol=1e-9)


def test_seed_makes_sampling_reproducible():
    def run(seed):
        study = optuna.create_study(sampler=HiDLRSampler(seed=seed))
        study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_int("n", 0, 9), n_trials=8)
        return [t.params for t in study.trials]

    assert run(3) == run(3)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="not continuous"):
        HiDLRSampler(search_space={"n": optuna.distributions.IntDistribution(0, 3)})
    with pytest.raises(ValueError, match="radius must be in"):
        HiDLRSampler(radius=2.0)
    with pytest.raises(ValueError, match="outside"):
        HiDLRSampler(search_space={"x": FloatDistribution(0, 1)}, x0={"x": 3.0})
    with pytest.raises(ValueError, match="mode must be one of"):
        HiDLRSampler(mode="quadratic")


def test_threads_of_one_study_never_take_the_same_design_point():
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    sampler = HiDLRSampler(search_space=space, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        return (trial.suggest_float("x", -4, 4) - 1) ** 2 + (trial.suggest_float("y", -4, 4) + 1) ** 2

    study.optimize(objective, n_trials=40, n_jobs=4)  # an instant objective: the threads race (23 repeats before)
    claims = Counter(tuple(attrs(study, t)[f"hidlr:{k}"] for k in ("run", "round", "index")) for t in study.trials)
    assert max(claims.values()) == 1
    points = Counter(tuple(t.params.values()) for t in study.trials)
    assert max(points.values()) == 1
    assert study.best_value < 1e-9
    assert pickle.loads(pickle.dumps(sampler))._lock is not sampler._lock  # copies get their own lock


def test_bad_trust_region_arguments_are_rejected():
    with pytest.raises(ValueError, match="min_radius must be in"):
        HiDLRSampler(radius=0.1, min_radius=0.2)
    with pytest.raises(ValueError, match="running_timeout"):
        HiDLRSampler(running_timeout=0)
    with pytest.raises(ValueError, match="design must be"):
        HiDLRSampler(design="star")


def test_a_stale_running_trial_stops_holding_its_point_after_the_timeout():
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    for timeout, expected in ((None, 1), (1e-3, 0)):
        study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0, running_timeout=timeout))
        dead = study.ask(space)  # a worker that died holding design point 0: never told
        time.sleep(0.01)
        assert attrs(study, study.ask(space))["hidlr:index"] == expected
        assert attrs(study, dead)["hidlr:index"] == 0


def test_the_centre_is_the_best_point_and_a_poor_model_shrinks_the_region_then_restarts():
    # |x| + |y|: not quadratic, so model steps keep falling short of their prediction.
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0, min_radius=1e-3))
    study.optimize(lambda t: abs(t.suggest_float("x", -4, 4) - 1.3) + abs(t.suggest_float("y", -4, 4)), n_trials=60)
    models = [t for t in study.trials if attrs(study, t)["hidlr:kind"] == "model"]
    assert models and min(attrs(study, t)["hidlr:radius"] for t in models) < 0.25  # shrunk
    for t in models:  # every step starts from the best point of its run so far
        a = attrs(study, t)
        earlier = [s for s in study.trials[: t.number] if attrs(study, s)["hidlr:run"] == a["hidlr:run"]]
        done = [s for s in earlier if s.state == TrialState.COMPLETE]
        if done:
            assert a["hidlr:base"] == min(s.value for s in done)
    assert max(attrs(study, t)["hidlr:run"] for t in study.trials) >= 1  # converged, then restarted elsewhere
    assert study.best_value < 0.05


WORKER = """
import sys, time, optuna
from optuna.distributions import FloatDistribution
from hidlr_hpo import HiDLRSampler
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = sys.argv[1]
if storage.startswith("journal:"):
    from optuna.storages.journal import JournalFileBackend
    storage = optuna.storages.JournalStorage(JournalFileBackend(storage[len("journal:"):]))
space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
sampler = HiDLRSampler(search_space=space, seed=int(sys.argv[2]))
study = optuna.load_study(study_name="s", storage=storage, sampler=sampler)

def objective(trial):
    x, y = trial.suggest_float("x", -4, 4), trial.suggest_float("y", -4, 4)
    time.sleep(0.005)
    return (x - 1) ** 2 + 3 * (y + 1) ** 2 + abs(x * y)

study.optimize(objective, n_trials=25)
"""


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_two_processes_never_evaluate_the_same_point(tmp_path, backend):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
        optuna.create_study(study_name="s", storage=url)
    else:
        from optuna.storages.journal import JournalFileBackend

        path = tmp_path / "study.log"
        optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))
        url = f"journal:{path}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, url, str(seed)], env=env, stderr=subprocess.PIPE, text=True)
        for seed in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    if backend == "sqlite":
        study = optuna.load_study(study_name="s", storage=url)
    else:
        study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 50
    points = Counter((round(t.params["x"], 12), round(t.params["y"], 12)) for t in trials)
    assert max(points.values()) == 1  # no point evaluated twice


def test_an_optimum_on_a_bound_in_one_dimension_converges_without_repeating_a_point():
    study = optuna.create_study(sampler=HiDLRSampler(search_space={"x": FloatDistribution(-1, 1)}, seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 2) ** 2, n_trials=60)  # the minimum is at x = 1
    assert study.best_value == pytest.approx(1.0, abs=1e-9)
    points = Counter(attrs(study, t)["hidlr:point"][0] for t in study.trials)
    assert max(points.values()) == 1  # the probes of a collapsing region stay new points
    assert max(attrs(study, t)["hidlr:run"] for t in study.trials) >= 1  # the region collapsed: a restart


def test_a_trial_interrupted_while_its_point_is_recorded_does_not_break_the_study():
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    study = optuna.create_study(sampler=HiDLRSampler(search_space=space, seed=0))

    def objective(t):
        return (t.suggest_float("x", -4, 4) - 1) ** 2 + (t.suggest_float("y", -4, 4) + 1) ** 2 + abs(t.params["x"])

    study.optimize(objective, n_trials=7)
    write = study._storage.set_trial_system_attr

    def interrupted(trial_id, key, value):
        if key == "hidlr:point":
            raise KeyboardInterrupt  # Ctrl-C, or a locked database, between two attribute writes
        write(trial_id, key, value)

    study._storage.set_trial_system_attr = interrupted
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    study._storage.set_trial_system_attr = write
    assert study.trials[-1].state == TrialState.FAIL and "hidlr:point" not in study.trials[-1].system_attrs
    study.optimize(objective, n_trials=10)  # the half-written trial is ignored
    assert all(t.state == TrialState.COMPLETE for t in study.trials[-10:])


def test_a_late_trial_of_an_earlier_run_does_not_take_the_search_back():
    space = {"x": FloatDistribution(-4, 40), "y": FloatDistribution(-4, 40)}

    def f(p):
        return (p["x"] - 37.8) ** 2 + (p["y"] - 37.8) ** 2

    sampler = HiDLRSampler(search_space=space, seed=0, radius=0.1, min_radius=0.06)
    study = optuna.create_study(sampler=sampler)
    for _ in range(7):  # the design and a first model step
        trial = study.ask(space)
        study.tell(trial, f(trial.params))
    slow, b, c = study.ask(space), study.ask(space), study.ask(space)  # three workers at once
    study.tell(b, state=TrialState.FAIL)
    study.tell(c, state=TrialState.FAIL)  # the region collapses: the next trial starts run 1
    restarted = study.ask(space)
    assert attrs(study, restarted)["hidlr:run"] == 1
    study.tell(slow, f(slow.params))  # run 0's slow worker finishes late
    study.tell(restarted, f(restarted.params))
    assert attrs(study, study.ask(space))["hidlr:run"] == 1


def test_trials_of_an_older_version_are_not_asked_again():
    space = {"x": FloatDistribution(-4, 4), "y": FloatDistribution(-4, 4)}
    study = optuna.create_study()
    # A trial the previous sampler recorded (no point attribute) at the first design point, the centre.
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.0, "y": 0.0},
            distributions=space,
            value=2.0,
            system_attrs={"hidlr:names": ["x", "y"], "hidlr:round": 0, "hidlr:index": 0},
        )
    )
    study.sampler = HiDLRSampler(search_space=space, seed=0)
    first = study.ask(space)
    assert (first.params["x"], first.params["y"]) != (0.0, 0.0) and attrs(study, first)["hidlr:index"] == 1
