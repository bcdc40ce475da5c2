from __future__ import annotations

import pytest
import torch
from torch import nn

from hidlr_hpo.groups import check_param_groups, group_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.ModuleDict({"block0": nn.Linear(4, 4), "block1": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))


def names(groups):
    return {g["name"]: g["param_names"] for g in groups}


def test_layer_groups_follow_module_paths_and_depth():
    model = Net()
    assert names(group_parameters(model, "layer")) == {
        "scale": ["scale"],  # parameters of the root module come first in named_parameters()
        "embed": ["embed.weight"],
        "encoder.block0": ["encoder.block0.weight", "encoder.block0.bias"],
        "encoder.block1": ["encoder.block1.weight", "encoder.block1.bias"],
        "norm": ["norm.weight", "norm.bias"],
        "head": ["head.weight", "head.bias"],
    }
    assert list(names(group_parameters(model, "layer", depth=1))) == ["scale", "embed", "encoder", "norm", "head"]


def test_type_groups():
    groups = names(group_parameters(Net(), "type"))
    assert groups["embedding"] == ["embed.weight"]
    assert groups["norm"] == ["norm.weight", "norm.bias"]
    assert groups["bias"] == ["encoder.block0.bias", "encoder.block1.bias", "head.bias"]
    assert groups["weight"] == ["scale", "encoder.block0.weight", "encoder.block1.weight", "head.weight"]


def test_regex_groups_with_rest_and_errors():
    model = Net()
    groups = names(group_parameters(model, "regex", patterns={"enc": r"^encoder\.", "head": r"^head\."}))
    assert groups["enc"] == [
        "encoder.block0.weight",
        "encoder.block0.bias",
        "encoder.block1.weight",
        "encoder.block1.bias",
    ]
    assert groups["rest"] == ["scale", "embed.weight", "norm.weight", "norm.bias"]
    with pytest.raises(ValueError, match="would be in two groups"):
        group_parameters(model, "regex", patterns={"a": "encoder", "b": "block0"})
    with pytest.raises(ValueError, match=r"\['nothing'\] matched no trainable parameter"):
        group_parameters(model, "regex", patterns={"nothing": "^zzz", "head": "head"})
    with pytest.raises(ValueError, match="matches no pattern"):
        group_parameters(model, "regex", patterns={"head": "head"}, rest=None)
    with pytest.raises(ValueError, match="invalid regex"):
        group_parameters(model, "regex", patterns={"bad": "("})
    with pytest.raises(ValueError, match="needs patterns"):
        group_parameters(model, "regex")


def test_callable_single_and_options():
    model = Net()
    groups = group_parameters(model, lambda n, p: "big" if p.numel() > 8 else "small", lr=0.1)
    assert {g["name"] for g in groups} == {"big", "small"}
    assert all(g["lr"] == 0.1 for g in groups)
    (single,) = group_parameters(model, "single")
    assert len(single["params"]) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert opt.param_groups[0]["name"] in {"big", "small"}
    with pytest.raises(ValueError, match="must give a non-empty str"):
        group_parameters(model, lambda n, p: None)


def test_frozen_parameters_are_left_out_and_bad_input_is_rejected():
    model = Net()
    model.embed.weight.requires_grad_(False)
    assert "embed" not in names(group_parameters(model, "layer"))
    with pytest.raises(ValueError, match="unknown grouping strategy 'per-layer'"):
        group_parameters(model, "per-layer")
    with pytest.raises(ValueError, match="no trainable parameters"):
        group_parameters(nn.Linear(2, 2).requires_grad_(False))


def test_check_param_groups_rejects_duplicates_and_empty_groups():
    model = Net()
    with pytest.raises(ValueError, match="is in group 'a' and again in 'b'"):
        check_param_groups([{"params": [model.head.weight], "name": "a"}, {"params": [model.head.weight], "name": "b"}])
    with pytest.raises(ValueError, match="group 'x' is empty"):
        check_param_groups([{"params": [], "name": "x"}])
