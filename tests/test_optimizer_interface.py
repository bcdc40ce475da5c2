"""HiDLR is a torch optimizer: shared groups and state, a probe source, schedulers, GradScaler, one checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from test_controller import TwoBlockLinear, flat, least_squares_batch, mse
from torch.utils.data import DataLoader, TensorDataset

from hidlr_hpo import HiDLR, group_parameters


def setup(lr=1e-2, **kwargs):
    torch.manual_seed(0)
    model = TwoBlockLinear()
    opt = torch.optim.AdamW(group_parameters(model, "layer"), lr=lr)
    return model, opt, kwargs


def test_it_is_an_optimizer_sharing_the_base_groups_and_state():
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=None, total_steps=None)
    assert isinstance(hidlr, torch.optim.Optimizer)
    assert hidlr.param_groups is opt.param_groups and hidlr.state is opt.state
    mse(model, least_squares_batch()).backward()
    hidlr.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="fixed at construction"):
        hidlr.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_the_horizon_and_the_probe_source_are_explicit_choices():
    model, opt, _ = setup()
    with pytest.raises(TypeError, match="total_steps=the planned number of optimizer steps.*total_steps=None"):
        HiDLR(opt, model, mse, probes=None)
    with pytest.raises(TypeError, match="probes=a source of held-out probe batches.*probes=None"):
        HiDLR(opt, model, mse, total_steps=100)
    with pytest.raises(TypeError, match="probes must be an iterable of batches"):
        HiDLR(opt, model, mse, probes=3, total_steps=100)
    hidlr = HiDLR(opt, model, mse, probes=None, total_steps=None)
    with pytest.raises(TypeError, match=r"step\(closure\) got a tuple.*step\(probe_batch=...\)"):
        hidlr.step(least_squares_batch())


def test_probe_batches_are_drawn_from_a_dataloader_only_when_a_refit_is_due():
    model, opt, _ = setup()
    x, y = least_squares_batch(n=96, seed=1)
    drawn = []

    class Counting(DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                drawn.append(len(batch[0]))
                yield batch

    loader = Counting(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    hidlr = HiDLR(opt, model, mse, probes=loader, total_steps=100, interval=4)
    for _ in range(20):
        mse(model, least_squares_batch(seed=0)).backward()
        hidlr.step()
        hidlr.zero_grad()
    assert [r.step for r in hidlr.history] == [0, 4, 8, 12, 16]
    assert drawn == [32] * 5  # five batches over two passes of a 3-batch loader: restarted, never more


def test_a_callable_or_an_iterator_as_the_probe_source():
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=lambda: least_squares_batch(seed=1), total_steps=None, interval=2)
    for _ in range(4):
        mse(model, least_squares_batch()).backward()
        hidlr.step()
    assert hidlr.n_refits == 2
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=iter([least_squares_batch(seed=1)]), total_steps=None, interval=1)
    mse(model, least_squares_batch()).backward()
    hidlr.step()
    with pytest.raises(ValueError, match="iterator is exhausted; pass a re-iterable"):
        hidlr.step()


def test_an_lr_scheduler_built_on_hidlr_gives_the_shape():
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=[least_squares_batch(seed=1)], total_steps=None, interval=3)
    scheduler = torch.optim.lr_scheduler.LinearLR(hidlr, start_factor=1.0, end_factor=0.1, total_iters=10)
    for _ in range(10):
        scheduled = torch.tensor([g["lr"] for g in hidlr.param_groups])
        mse(model, least_squares_batch()).backward()
        hidlr.step()
        hidlr.zero_grad()
        scheduler.step()
        assert hidlr.lrs() == pytest.approx((scheduled * hidlr.multipliers).tolist(), rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3])


def test_grad_scaler_skips_the_step_and_the_refit_on_an_overflow():
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=[least_squares_batch(seed=1)], total_steps=None, interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = least_squares_batch()
    scaler.scale(mse(model, batch)).backward()
    model.a.weight.grad[0, 0] = float("inf")  # an overflow
    before = flat(model)
    scaler.step(hidlr)
    scaler.update()
    assert torch.equal(flat(model), before) and hidlr.step_count == 0 and hidlr.history == []
    assert scaler.get_scale() == 2.0**9
    hidlr.zero_grad()
    scaler.scale(mse(model, batch)).backward()
    scaler.step(hidlr)  # unscaled gradients, then HiDLR's step with its refit
    scaler.update()
    assert hidlr.step_count == 1 and len(hidlr.history) == 1 and not hidlr.last_fit.rejected
    assert torch.isfinite(flat(model)).all()


def test_one_state_dict_checkpoints_the_base_optimizer_and_hidlr():
    data = [least_squares_batch(seed=s) for s in range(3)]

    def build():
        model, opt, _ = setup()
        return model, HiDLR(opt, model, mse, probes=None, total_steps=30, interval=2, design=9)

    def run(model, hidlr, steps):
        for t in steps:
            mse(model, data[t % 3]).backward()
            hidlr.step(probe_batch=data[(t + 1) % 3] if hidlr.refit_due else None)
            hidlr.zero_grad()

    model, hidlr = build()
    run(model, hidlr, range(12))
    m1, h1 = build()
    run(m1, h1, range(6))
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "optimizer": h1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only: the state is plain tensors, numbers, lists and dicts
    m2, h2 = build()
    m2.load_state_dict(saved["model"])
    h2.load_state_dict(saved["optimizer"])
    assert h2.param_groups is h2.optimizer.param_groups  # still shared after the base reloaded
    run(m2, h2, range(6, 12))
    assert torch.equal(flat(m2), flat(model)) and h2.lrs() == hidlr.lrs()


def test_refits_stop_after_the_refit_phase():
    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=[least_squares_batch(seed=1)], total_steps=40, interval=2, refit_until=0.25)
    for _ in range(40):
        mse(model, least_squares_batch()).backward()
        hidlr.step()
        hidlr.zero_grad()
    assert [r.step for r in hidlr.history] == [0, 2, 4, 6, 8]  # t < 0.25 * 40
    assert hidlr.lrs() == pytest.approx((hidlr.base_lrs * (1 - 39 / 40)).tolist())  # the horizon goes on


def test_a_copy_or_a_pickle_of_hidlr_is_a_working_hidlr():
    import copy
    import pickle

    model, opt, _ = setup()
    hidlr = HiDLR(opt, model, mse, probes=[least_squares_batch(seed=1)], total_steps=None, interval=2)
    for _ in range(3):
        mse(model, least_squares_batch()).backward()
        hidlr.step()
        hidlr.zero_grad()
    model2, hidlr2 = copy.deepcopy((model, hidlr))
    model3, hidlr3 = pickle.loads(pickle.dumps((model, hidlr)))
    for m, h in ((model, hidlr), (model2, hidlr2), (model3, hidlr3)):
        mse(m, least_squares_batch()).backward()
        h.step()
    assert hidlr2.param_groups is hidlr2.optimizer.param_groups and hidlr2.model is model2
    assert torch.equal(flat(model2), flat(model)) and torch.equal(flat(model3), flat(model))
    assert hidlr2.lrs() == hidlr.lrs() == hidlr3.lrs() and hidlr3.n_refits == hidlr.n_refits == 2
