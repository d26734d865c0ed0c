"""Mean-field NGVI (defaults, no tuning) against the best of a grid of ADVI configurations.

Protocol (../shared/PERFORMANCE-NOTES.md): one common-random-numbers ELBO scores every
checkpoint of every method; the reference is the mean-field family optimum (BFGS on that scorer);
"steps to 0.1 nat" is the first checkpoint after which every later one stays within 0.1 nat;
ADVI (NumPyro AutoNormal + optax Adam) gets a grid of learning rates x particles and the best
configuration by seconds; compile time is excluded and reported apart; every number comes from
one run on one machine. Prints a table and writes benchmarks/results/meanfield.json.

    python benchmarks/bench_meanfield.py [model ...] [--quick]
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import jax

from ngvi import models
from ngvi.report.comparison import compare_vi, format_table

SETTINGS = {  # model: (ngvi steps, advi steps)
    "eight_schools": (400, 6000),
    "logistic_regression": (1500, 20000),
    "hierarchical_linear": (600, 20000),
    "beta_bernoulli": (200, 4000),
    "gamma_poisson": (200, 4000),
    "normal_normal": (200, 4000),
}
GRID_LR = (0.001, 0.01, 0.05, 0.1)
GRID_PARTICLES = (1, 8)


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")] or list(SETTINGS)
    out, summary = {}, []
    for name in names:
        ngvi_steps, advi_steps = SETTINGS[name]
        if quick:
            ngvi_steps, advi_steps = ngvi_steps // 2, advi_steps // 4
        model, args, kwargs = models.load(name)
        t0 = time.perf_counter()
        rows, extras = compare_vi(
            model,
            *args,
            ngvi_steps=ngvi_steps,
            advi_steps=advi_steps,
            advi_lrs=GRID_LR,
            advi_particles=GRID_PARTICLES,
            **kwargs,
        )
        print(
            f"\n== {name}: d = {extras['dim']}, family optimum {extras['best_elbo']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        print(format_table(rows))
        out[name] = {"dim": extras["dim"], "best_elbo": extras["best_elbo"], "rows": rows}
        summary.append(_summary_row(name, extras["dim"], rows))
    print("\n== summary (best ADVI by seconds to stay within 0.1 nat)")
    print(format_table(summary))
    meta = {
        "jax": jax.__version__,
        "platform": platform.platform(),
        "cpu_count": _cpus(),
        "protocol": __doc__.split("\n\n")[1],
    }
    path = Path(__file__).parent / "results" / "meanfield.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "models": out, "summary": summary}, indent=2))
    print(f"\nwrote {path}")


def _summary_row(name, dim, rows) -> dict:
    ng = next(r for r in rows if r["method"] == "ngvi")
    best = next((r for r in rows if r.get("best_advi")), None)

    def ratio(key):  # None where undefined (NGVI's warm start can be within 0.1 nat at step 0)
        if best is None or best.get(key) is None or not ng.get(key):
            return None
        return best[key] / ng[key]

    return {
        "model": name,
        "d": dim,
        "ngvi_steps": ng["steps_to_0.1"],
        "advi_steps": best and best["steps_to_0.1"],
        "advi_cfg": best and f"lr={best['lr']},P={best['num_particles']}",
        "step_ratio": ratio("steps_to_0.1"),
        "time_ratio": ratio("seconds_to_0.1"),
        "ngvi_ms_step": ng["ms_per_step"],
        "advi_ms_step": best and best["ms_per_step"],
        "cost_ratio": best and ng["ms_per_step"] / best["ms_per_step"],
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main(sys.argv[1:])
