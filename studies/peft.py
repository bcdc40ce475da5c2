"""The automatic-PEFT table (issue 15) from the three finished PEFT studies, printed as markdown.

    hidlr run studies/peft_full.toml && hidlr run studies/peft_lora.toml && hidlr run studies/peft_bitfit.toml
    python studies/peft.py [--storage URL] > docs/results/peft/table.md

Per method (each seed's selected run: a grid's best rate on the final validation loss, or the one Hi-DLR
run): the test loss and the validation loss it was selected on (mean +- std over seeds), the fraction of the
model's parameters that trained at the end, the seconds per training step of the selected run (its wall time,
probes and per-epoch evaluation included, over its steps), the method's compute per seed (all its trials) as a
fraction of the full fine-tuning grid's, and a paired verdict against full fine-tuning and LoRA (95%
t-interval of the per-seed differences of the test loss; "tie" unless it excludes 0).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from hidlr_hpo.config import load_study_config
from hidlr_hpo.report import MethodSummary, collect, mean_std, paired_verdict

STUDIES = ("peft_full", "peft_lora", "peft_bitfit")
FULL, LORA = "full-grid", "lora-grid"


def _configuration(s: MethodSummary) -> str:
    """A grid's selected rate on each seed; for a frozen Hi-DLR run, how many of its groups froze."""
    if s.kind == "grid":
        return "lr " + ", ".join(f"{t.params['lr']:.3g}" for t in s.selected)
    frozen = [len(t.user_attrs.get("frozen_groups", [])) for t in s.selected]
    return f"{'/'.join(map(str, frozen))} groups frozen" if any(frozen) else "Hi-DLR rates"


def main(storage: str | None = None) -> None:
    here = Path(__file__).parent
    summaries: dict[str, MethodSummary] = {}
    for name in STUDIES:
        cfg = load_study_config(here / f"{name}.toml")
        summaries.update({s.name: s for s in collect(cfg, storage) if s.selected})
    if FULL not in summaries:
        raise SystemExit("the full fine-tuning grid has no finished trials yet: run studies/peft_full.toml first")
    full_compute = statistics.mean(summaries[FULL].compute)
    print(
        "| method | configuration | test loss | val loss | trainable | s/step | compute vs full grid "
        "| test loss against full FT | against LoRA |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        steps = [t.user_attrs["steps"] for t in s.selected]
        per_step = [t.user_attrs["wall_seconds"] / n for t, n in zip(s.selected, steps, strict=True)]
        against = [
            "-" if name == ref or ref not in summaries else paired_verdict(s, summaries[ref], "test_loss")
            for ref in (FULL, LORA)
        ]
        print(
            f"| {name} | {_configuration(s)} | {mean_std(s.metric('test_loss'))} | "
            f"{mean_std(s.metric('final_val_loss'))} | {statistics.mean(s.metric('trainable_fraction')):.2%} | "
            f"{statistics.mean(per_step):.2f} | {statistics.mean(s.compute) / full_compute:.0%} | "
            f"{against[0]} | {against[1]} |"
        )
    seeds = sorted({seed for s in summaries.values() for seed in s.seeds})
    print(f"\nSeeds {seeds}; wall time per seed (all trials): ", end="")
    print(", ".join(f"{n} {statistics.mean(s.wall):.0f} s" for n, s in summaries.items()) + ".")
    for name, s in summaries.items():  # which groups Hi-DLR kept, and how often over the seeds
        kept = Counter(g for t in s.selected for g in _kept(t.user_attrs))
        if kept and any(t.user_attrs.get("frozen_groups") for t in s.selected):
            listed = ", ".join(f"{g} ({n}/{len(s.selected)})" for g, n in kept.most_common())
            print(f"\n{name} kept: {listed}.")


def _kept(attrs: dict) -> list[str]:
    """The groups that were never frozen at the end of the run: the refit record's names minus the frozen."""
    names = attrs.get("refits", {}).get("group_names", [])
    frozen = set(attrs.get("frozen_groups", []))
    return [g for g in names if g not in frozen]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="the studies' storage URL (default: the study files')")
    main(parser.parse_args().storage)
