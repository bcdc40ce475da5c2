from __future__ import annotations

import math

import pytest
import torch

from hidlr_hpo.groups import group_parameters
from hidlr_hpo.tasks import get_task
from hidlr_hpo.training import train


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(
    "name, groups",
    [
        ("digits", ["Linear_0", "Linear_2", "Linear_4"]),
        ("nam", [f"features.{j}" for j in range(6)] + ["output"]),
        ("multitask", ["trunk", "heads.0", "heads.1", "heads.2"]),
        ("wide_deep", ["embeddings.0", "embeddings.1", "embeddings.2", "tower", "output"]),
    ],
)
def test_tasks_have_fixed_disjoint_splits_and_their_groups(name, groups):
    task = get_task(name)
    assert [g["name"] for g in group_parameters(task.make_model(0), task.grouping)] == groups
    n = len(task.train) + len(task.val) + len(task.test)
    assert len(task.train) == pytest.approx(0.6 * n, abs=2)
    assert torch.equal(get_task(name).train.x, task.train.x)  # the split does not depend on anything else
    rows = {tuple(r.tolist()) for r in task.train.x}
    assert not rows & {tuple(r.tolist()) for r in task.test.x}
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")


def test_multitask_heads_see_different_curvature():
    """The targets' scales differ by 100x, so Hi-DLR's first fit measures very different head curvatures."""
    task = get_task("multitask")
    result = train(task, lr=1e-3, epochs=1, seed=0, hidlr={"interval": 1000, "trust_ratio": None, "smoothing": 0.0})
    (fit,) = result.hidlr.history
    heads = [fit.A[k][k] for k in range(1, 4)]
    # A head whose loss moves less than float32 resolves along its step may come out non-convex (kept rate).
    measured = [c for c in heads if math.isfinite(c) and c > 0]
    assert len(measured) >= 2
    assert max(measured) / min(measured) > 10


def test_wide_deep_embedding_tables_see_frequency_dependent_gradients():
    """Zipf-distributed categories: the big table's rows are mostly rare, the small table's all frequent."""
    task = get_task("wide_deep", n_samples=3000)
    ids = task.train.x[:, :3].long()
    assert torch.equal(ids.float(), task.train.x[:, :3])  # categorical columns are exact integers
    assert int(ids[:, 0].max()) < 2000 and int(ids[:, 2].max()) < 20
    counts = torch.bincount(ids[:, 0], minlength=2000)
    assert (counts == 0).sum() > 1000 and counts.max() > 100  # a long tail and a head
    model = task.make_model(0)
    task.loss_fn(model, (task.train.x[:64], task.train.y[:64])).backward()
    big, small = model.embeddings[0].weight.grad, model.embeddings[2].weight.grad
    assert (big.abs().sum(dim=1) > 0).sum() <= 64 < 2000  # a batch touches at most 64 of the 2000 rows
    assert (small.abs().sum(dim=1) > 0).sum() >= 5


def test_sentiment_lora_task_trains_only_the_adapters_and_the_head():
    task = get_task("sentiment", n_samples=60)
    model = task.make_model(0)
    groups = group_parameters(model, task.grouping)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "head"]
    assert sum(p.numel() for g in groups for p in g["params"]) == 2 * 6 * 2 * 8 * 384 + 385  # rank 8, q and v
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 90  # the whole MiniLM encoder

    result = train(task, lr=1e-3, epochs=1, batch_size=16, seed=0, hidlr={"interval": 1})
    assert math.isfinite(result.final_val_loss) and len(result.hidlr.history) == 3
    assert -1.0 <= float(task.train.y.min()) and float(task.train.y.max()) <= 1.0  # ratings / 4


def test_sentiment_full_and_bitfit_finetuning_group_every_trainable_parameter():
    full = get_task("sentiment", n_samples=60, finetune="full")
    model = full.make_model(0)
    groups = group_parameters(model, full.grouping)
    names = [g["name"] for g in groups]
    assert len(names) == 55 and {"emb.word", "L0.q", "L5.ffn_norm", "pooler", "biases", "head"} <= set(names)
    assert all(p.requires_grad for p in model.parameters())
    (biases,) = [g for g in groups if g["name"] == "biases"]
    assert all(n.endswith(".bias") for n in biases["param_names"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())

    bitfit = get_task("sentiment", n_samples=60, finetune="bitfit")
    model = bitfit.make_model(0)
    assert [g["name"] for g in group_parameters(model, bitfit.grouping)] == ["biases", "head"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".bias") or n.startswith("head.") for n in trainable) and len(trainable) > 50
    with pytest.raises(ValueError, match="finetune must be one of"):
        get_task("sentiment", n_samples=60, finetune="prefix")
