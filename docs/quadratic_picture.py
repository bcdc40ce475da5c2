"""Draw docs/images/quadratic-fit.png: one Hi-DLR refit on a real model, over its two group learning rates.

    python docs/quadratic_picture.py [--out docs/images/quadratic-fit.png]

An MLP with one hidden layer on scikit-learn's digits has two parameter groups (the hidden layer and the
head). After 30 SGD steps, one more step proposes the update u = (u_1, u_2); the probe point x = (x_1, x_2)
is w(t) + x_1 u_1 + x_2 u_2, i.e. group k at x_k times the rate the step used. The script uses the package's own
pieces, as a refit does: ``Prober`` evaluates the loss forward-only at the pairwise design's points (and, for
the background, on a grid of points that Hi-DLR never evaluates), ``fit_quadratic`` fits the full model,
``solve`` gives its minimiser, ``Safeguards`` and ``apply_safeguards`` where HiDLR's trust region alone would
put the rates (within [1/2, 2] times the current ones; HiDLR also smooths). The numbers it prints are those
in the picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hidlr_hpo import Prober, Safeguards, fit_quadratic, group_parameters  # noqa: E402
from hidlr_hpo.curvature import apply_safeguards, make_design, solve  # noqa: E402
from hidlr_hpo.tasks import get_task  # noqa: E402

# SGD at 0.3 after 30 steps: the fitted optimum lies a few times above the current rates, inside the picture
# (with AdamW at its usual 1e-3 the one-step landscape is nearly linear over the design and the optimum far out).
OPT, LR = torch.optim.SGD, 0.3


def refit(warmup_steps: int = 30) -> dict:
    torch.set_default_dtype(torch.float64)  # the picture's loss differences are far above round-off
    torch.manual_seed(0)
    task = get_task("digits", hidden=(32,))
    task.train, task.val = (type(s)(s.x.double(), s.y) for s in (task.train, task.val))
    model = task.make_model(0)
    groups = group_parameters(model, "layer")
    opt = OPT(groups, lr=LR)  # both groups at the same current rate
    gen = torch.Generator().manual_seed(0)
    batches = (batch for _ in range(1000) for batch in task.train.batches(64, gen))  # epoch after epoch
    for _ in range(warmup_steps):  # past the first steps, where everything is steep
        task.loss_fn(model, next(batches)).backward()
        opt.step()
        opt.zero_grad()
    probe_batch = (task.val.x[:256], task.val.y[:256])
    prober = Prober(model, task.loss_fn, [g["params"] for g in groups])

    task.loss_fn(model, next(batches)).backward()
    start = prober.snapshot()  # w(t)
    opt.step()  # the live parameters now hold w(t) + u
    design = make_design("pairwise", k=2, mode="full")  # 6 points: the full model's unknowns
    losses = prober.losses(probe_batch, start, design)
    fit = fit_quadratic(design, losses, mode="full")
    x_star = solve(fit)
    current = torch.ones(2, dtype=torch.float64)
    guarded = apply_safeguards(current, fit, Safeguards(trust_ratio=2.0))  # the trust region alone

    hi = max(3.0, 1.3 * float(x_star.max()))
    axis = torch.linspace(-1.2, hi, 27, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    true = prober.losses(probe_batch, start, grid).reshape(len(axis), len(axis))
    return {"design": design, "losses": losses, "fit": fit, "x_star": x_star, "applied": guarded.lrs,
            "axis": axis, "grid": grid, "true": true, "names": [g["name"] for g in groups]}  # fmt: skip


def draw(r: dict, out: Path) -> None:
    axis, fit = r["axis"], r["fit"]
    rates = (axis * LR).numpy()
    model = fit.predict(r["grid"]).reshape(len(axis), len(axis))
    fig, ax = plt.subplots(figsize=(7.0, 6.6), dpi=110)
    # cartesian_prod varies the second coordinate fastest: rows are x_1, columns x_2; plot x_1 horizontally.
    levels = torch.quantile(r["true"].flatten(), torch.linspace(0.0, 0.9, 12, dtype=torch.float64)).numpy()
    filled = ax.contourf(rates, rates, r["true"].T.numpy(), levels=levels, cmap="Blues_r", extend="max")
    fig.colorbar(filled, ax=ax, label="validation loss measured at the point", format="%.3f")
    ax.contour(rates, rates, model.T.numpy(), levels=levels, colors="darkorange", linewidths=1.2, linestyles="--")
    d = (r["design"] * LR).numpy()
    ax.scatter(d[:, 0], d[:, 1], s=60, c="black", zorder=5, label="probe points (pairwise design, 6 forwards)")
    ax.plot([LR], [LR], "o", ms=12, mfc="none", mec="black", zorder=5, label="the step just taken (current rates)")
    xs = (r["x_star"] * LR).numpy()
    ax.plot(xs[0], xs[1], "*", ms=16, c="crimson", zorder=6, label="minimiser of the fitted quadratic")
    lo_tr, hi_tr = 0.5 * LR, 2.0 * LR
    ax.add_patch(plt.Rectangle((lo_tr, lo_tr), hi_tr - lo_tr, hi_tr - lo_tr, fill=False, ec="crimson", ls=":"))
    applied = (r["applied"] * LR).numpy()
    ax.plot(applied[0], applied[1], "P", ms=11, c="crimson", zorder=6, label="applied: clipped to the trust region")
    ax.plot([], [], ls="--", c="darkorange", label="fitted quadratic (same levels)")
    ax.set_xlabel(f"learning rate of group {r['names'][0]} (hidden layer)")
    ax.set_ylabel(f"learning rate of group {r['names'][1]} (head)")
    ax.set_title(f"One refit on digits: the fitted model over two group rates (R² on the design = {fit.r2:.2f})")
    ax.title.set_fontsize(10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "quadratic-fit.png")
    args = parser.parse_args()
    r = refit()
    draw(r, args.out)
    fit = r["fit"]
    print(f"b = {fit.b.tolist()}\nA = {fit.A.tolist()}\nminimiser (x current rate) = {r['x_star'].tolist()}")
    print(f"applied (x current rate) = {r['applied'].tolist()}\nwrote {args.out}")


if __name__ == "__main__":
    main()
