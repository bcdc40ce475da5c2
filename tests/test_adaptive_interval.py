"""The adaptive refit interval (issue 11 section 5): fewer refits while the rates are settled, more while they trend."""

import io

import pytest
import torch
from torch import nn

from hidlr_hpo import HiDLR, group_parameters
from hidlr_hpo.controller import next_gap


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(32, 5, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(32, 1, generator=g)))
    return out


def build(max_interval, seed=3, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=1e-2)
    data = batches(8, seed=1)
    probes = iter(data * 100)
    hidlr = HiDLR(opt, model, mse, probes=probes, total_steps=400, interval=5, max_interval=max_interval, **kwargs)
    return model, hidlr, data


def train(model, hidlr, data, steps, start=0):
    for t in range(start, start + steps):
        mse(model, data[t % len(data)]).backward()
        hidlr.step()
        hidlr.zero_grad()


def test_a_steady_trend_halves_the_gap_and_noise_doubles_it():
    up = [[0.1, 0.0]] * 4  # group 0 keeps rising: refit more often
    assert next_gap(up, 40, 10, 80) == 20
    assert next_gap(up, 10, 10, 80) == 10  # never below the interval
    noise = [[0.1, -0.05], [-0.05, 0.1], [0.1, -0.05], [-0.05, 0.1]]  # both signs: settled
    assert next_gap(noise, 10, 10, 80) == 20
    assert next_gap(noise, 80, 10, 80) == 80  # never above max_interval
    assert next_gap([[0.0, 0.0]] * 4, 10, 10, 80) == 20  # rejected fits or dead groups: nothing to chase
    assert next_gap(up[:2], 10, 10, 80) == 10  # two refits cannot tell a trend from noise


def test_t_statistic_decides_the_trend():
    # mean 0.059, standard error 0.036: |t| = 1.6 < 2, settled; one more rise makes it a trend.
    three_up_one_down = [[0.095], [0.095], [0.095], [-0.05]]
    assert next_gap(three_up_one_down, 10, 10, 80) == 20
    assert next_gap([[0.095], [0.09], [0.1], [0.095]], 40, 10, 80) == 20


def test_gaps_follow_the_rule_and_records_hold_them():
    model, hidlr, data = build(max_interval=40)
    train(model, hidlr, data, 300)
    steps = [r.step for r in hidlr.history]
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert [r.gap for r in hidlr.history] == [0, *gaps]
    assert all(5 <= g <= 40 for g in gaps)
    assert max(gaps) > 5, "the rates settle on this problem, so the gap must grow"
    assert len(hidlr.history) < 300 // 5 + 1  # fewer refits than every 5 steps
    # Each gap is what next_gap made of the multipliers' changes so far (replayed from the records).
    changes: list[list[float]] = []
    m_before, gap = torch.ones(2, dtype=torch.float64), 5
    for record, following in zip(hidlr.history, hidlr.history[1:], strict=False):
        m_after = torch.tensor(record.lrs, dtype=torch.float64) / torch.tensor(
            record.scheduled_lrs, dtype=torch.float64
        )
        changes = [*changes, (torch.log(m_after / m_before) * (5 / (record.gap or 5))).tolist()][-4:]
        gap = next_gap(changes, gap, 5, 40)
        assert following.step - record.step == gap
        m_before = m_after


def test_fixed_interval_is_unchanged_by_the_mechanism():
    model, hidlr, data = build(max_interval=None)
    train(model, hidlr, data, 100)
    assert [r.step for r in hidlr.history] == list(range(0, 100, 5))
    assert [r.gap for r in hidlr.history] == [0] + [5] * 19


def test_smoothing_is_scaled_to_the_gap():
    _, hidlr, _ = build(max_interval=40)
    assert hidlr._guards_after(5).smoothing == 0.9
    assert hidlr._guards_after(20).smoothing == pytest.approx(0.9**4)
    assert hidlr._guards_after(0).smoothing == 0.9  # the first refit


def test_state_dict_round_trip_keeps_the_adaptive_schedule():
    model, hidlr, data = build(max_interval=40)
    train(model, hidlr, data, 200)

    m1, h1, _ = build(max_interval=40)
    train(m1, h1, data, 120)
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "hidlr": h1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m2, h2, _ = build(max_interval=40, seed=99)
    m2.load_state_dict(saved["model"])
    h2.load_state_dict(saved["hidlr"])
    h2._probe_source = h1._probe_source  # the same probe stream, where the first left it
    train(m2, h2, data, 80, start=120)
    assert [r.step for r in h2.history] == [r.step for r in hidlr.history]
    for p, q in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "key, value, message",
    [("gap", 3, "gap"), ("gap", 41, "gap"), ("last_refit", -1, "last_refit"), ("recent_changes", [[1.0]], "recent")],
)
def test_bad_adaptive_state_is_refused_and_nothing_changes(key, value, message):
    model, hidlr, data = build(max_interval=40)
    train(model, hidlr, data, 30)
    state = hidlr.state_dict()
    state["hidlr"][key] = value
    before = (hidlr.gap, hidlr.last_refit, list(hidlr.recent_changes))
    with pytest.raises(ValueError, match=message):
        hidlr.load_state_dict(state)
    assert (hidlr.gap, hidlr.last_refit, hidlr.recent_changes) == before


@pytest.mark.parametrize("bad", [4, 0, 2.5, True, "8x"])
def test_max_interval_below_interval_is_refused(bad):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_interval must be None, .4x. or an int >= interval"):
        HiDLR(opt, model, mse, probes=None, total_steps=None, interval=5, max_interval=bad)
