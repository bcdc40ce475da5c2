"""A tabular task with embeddings and a dense tower, where the groups' curvatures really differ (issue 11).

``wide_deep``: binary classification from three categorical features (vocabularies of 2000, 200 and 20
values, drawn from Zipf laws, so most rows of the big table are seen a few times and the small table's
every step) and ten dense features. The model embeds each categorical feature (one table per feature),
concatenates the dense features and runs an MLP tower. Groups: each embedding table, the tower, the output
layer. Embedding rows get sparse, frequency-dependent gradients and the tower dense ones, the classic case
for different learning rates per group (wide-and-deep and recommendation models tune them apart).

Generated from a fixed seed (``data_seed``); 15,000 rows split 60 / 20 / 20, so the validation split
(3,000 rows) is large enough to separate methods.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Task
from .synthetic import _splits

VOCABULARIES = (2000, 200, 20)


class WideDeep(nn.Module):
    """Embeddings of the categorical columns, concatenated with the dense ones, through an MLP tower."""

    def __init__(self, vocabularies: tuple[int, ...], n_dense: int, dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(v, dim) for v in vocabularies)
        self.tower = nn.Sequential(
            nn.Linear(len(vocabularies) * dim + n_dense, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.output = nn.Linear(hidden, 2)
        self.n_categorical = len(vocabularies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, : self.n_categorical].long()  # the categorical columns hold exact small integers
        embedded = [table(ids[:, j]) for j, table in enumerate(self.embeddings)]
        return self.output(self.tower(torch.cat([*embedded, x[:, self.n_categorical :]], dim=1)))


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def wide_deep_task(n_samples: int = 30000, n_dense: int = 10, zipf: float = 1.2, data_seed: int = 0) -> Task:
    """Labels from a logistic model: per-category effects (rarer categories, larger effects), a nonlinear
    function of the dense features and one category-dense interaction."""
    gen = torch.Generator().manual_seed(data_seed)
    columns, logit = [], torch.zeros(n_samples)
    for j, vocabulary in enumerate(VOCABULARIES):
        ranks = torch.arange(1, vocabulary + 1, dtype=torch.float64)
        ids = torch.multinomial(ranks**-zipf, n_samples, replacement=True, generator=gen)  # p(rank r) ~ r^-zipf
        effect = torch.randn(vocabulary, generator=gen) * (1.5 if j == 0 else 1.0)
        logit += effect[ids]
        columns.append(ids.float())
    dense = torch.randn(n_samples, n_dense, generator=gen)
    w = torch.randn(n_dense, generator=gen) / n_dense**0.5
    logit += 2.0 * torch.tanh(dense @ w) + 0.5 * dense[:, 0] * dense[:, 1]
    logit += 0.8 * dense[:, 2] * (columns[2] < 3).float()  # a category-dense interaction
    y = (torch.rand(n_samples, generator=gen) < torch.sigmoid(logit)).long()
    x = torch.cat([torch.stack(columns, dim=1), dense], dim=1)
    train, val, test = _splits(x, y, gen)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return WideDeep(VOCABULARIES, n_dense)

    def grouping(name: str, param: nn.Parameter) -> str:
        return ".".join(name.split(".")[:2]) if name.startswith("embeddings.") else name.split(".")[0]

    return Task("wide_deep", train, val, test, make_model, cross_entropy, grouping, classification=True)
