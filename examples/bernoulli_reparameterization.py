"""Plain vs natural gradient steps on a Bernoulli, in logit and in probability coordinates.

The worked example of the natural-gradient lesson: one observation y = 1, loss
L = -log p(y | theta) = -log sigma(theta), start at theta0 = 0 (p = 1/2).

=============  ==================================  =========================================
coordinates    plain step                          natural step (Fisher F)
=============  ==================================  =========================================
logit theta    theta += lr (1 - p)                 F = p(1-p):   theta += lr / p
probability p  p += lr / p                         F = 1/(p(1-p)): p += lr (1 - p)
=============  ==================================  =========================================

Natural steps are first-order invariant: for small lr both coordinate systems move p along the
same path (the natural-gradient flow), while plain steps differ by a factor (p(1-p))^2 (16 at
p = 1/2). At lr = 1 the natural step in logits reaches p = sigma(2) = 0.881, but the unit natural
step in p-coordinates lands exactly on the boundary p = 1 (invariance holds only to first
order), and plain steps in p leave [0, 1] altogether.

Run: ``python examples/bernoulli_reparameterization.py [OUT_DIR]`` (default ./out); writes
``bernoulli_reparameterization.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ngvi.families import Bernoulli
from ngvi.report.plots import OKABE_ITO

LEARNING_RATES = (0.05, 0.25, 1.0)
NUM_STEPS = 12
FAMILY = Bernoulli()


def logit_step(theta: float, lr: float, natural: bool) -> float:
    """One step on L(theta) = -log sigma(theta): gradient p - 1, Fisher p(1 - p)."""
    grad = float(jax.nn.sigmoid(theta)) - 1.0
    if natural:  # the family's closed-form inverse Fisher
        (grad,) = FAMILY.fisher_inverse((np.asarray(theta),), (np.asarray(grad),))
    return theta - lr * float(grad)


def prob_step(p: float, lr: float, natural: bool) -> float:
    """One step on L(p) = -log p: gradient -1/p, Fisher 1/(p(1 - p))."""
    grad = -1.0 / p
    if natural:
        grad = p * (1.0 - p) * grad
    return p - lr * grad


def trajectory(coords: str, lr: float, natural: bool, num_steps: int = NUM_STEPS) -> np.ndarray:
    """p after 0..num_steps steps; NaN once an iterate leaves (0, 1) (then it is undefined)."""
    x = 0.0 if coords == "logit" else 0.5
    out = [0.5]
    for _ in range(num_steps):
        p = out[-1]
        if not 0.0 < p < 1.0:
            out.append(np.nan)
            continue
        if coords == "logit":
            x = logit_step(x, lr, natural)
            out.append(float(jax.nn.sigmoid(x)))
        else:
            x = prob_step(x, lr, natural)
            out.append(x)
    return np.asarray(out)


def plot(path: Path) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    steps = np.arange(NUM_STEPS + 1)
    for ax, natural in zip(axes, (False, True)):
        for color, lr in zip(OKABE_ITO, LEARNING_RATES):
            for coords, ls, marker in (("logit", "-", "o"), ("prob", "--", "s")):
                p = trajectory(coords, lr, natural)
                shown = np.where(np.isfinite(p), np.clip(p, 0, 1.05), np.nan)
                ax.plot(
                    steps,
                    shown,
                    ls=ls,
                    marker=marker,
                    ms=4,
                    color=color,
                    label=f"lr={lr}, {coords} coords",
                )
                escaped = np.flatnonzero(p >= 1.0)
                if escaped.size:  # where an iterate reaches or crosses the boundary
                    i = escaped[0]
                    ax.plot(steps[i], min(p[i], 1.05), "x", ms=10, mew=2, color=color)
        ax.axhline(1.0, color="0.3", lw=1)
        kind = "natural" if natural else "plain"
        ax.set(title=f"{kind} gradient steps", xlabel="step", ylim=(0.45, 1.07))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("p = P(y = 1)")
    axes[1].legend(frameon=False, fontsize="small", loc="lower right")
    fig.suptitle("Bernoulli, y = 1, from p = 0.5: x marks an iterate at or past p = 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def main(out_dir: str = "out") -> None:
    for natural in (False, True):
        kind = "natural" if natural else "plain"
        for lr in LEARNING_RATES:
            a, b = trajectory("logit", lr, natural, 1)[1], trajectory("prob", lr, natural, 1)[1]
            print(f"{kind:7s} lr={lr:<4}  one step: p = {a:.3f} (logit coords), {b:.3f} (p coords)")
    path = Path(out_dir) / "bernoulli_reparameterization.png"
    plot(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
