"""Command line: ``ngvi fit FILE.py[:model]`` and ``ngvi compare FILE.py[:model]``.

A model file defines a NumPyro model (``model`` unless ``:name`` says otherwise) and
``data() -> (args, kwargs)``; bundled models can be named directly (``ngvi fit eight_schools``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngvi", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a model with mean-field NGVI and print the posterior")
    fit.add_argument("model", help="FILE.py[:model] or a bundled model name")
    fit.add_argument("--guide", default="meanfield", choices=["meanfield"])
    fit.add_argument("--steps", type=int, default=1000)
    fit.add_argument(
        "--tol",
        type=float,
        default=0.1,
        help="stop once within this many nats of the optimum (default 0.1; 0 runs every step)",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--samples", type=int, default=4000)
    fit.add_argument("--no-progress", action="store_true")
    cmp_ = sub.add_parser("compare", help="NGVI against ADVI (steps and seconds to 0.1 nat)")
    cmp_.add_argument("model", help="FILE.py[:model] or a bundled model name")
    cmp_.add_argument("--steps", type=int, default=1000, help="NGVI steps")
    cmp_.add_argument("--advi-steps", type=int, default=10000)
    cmp_.add_argument("--advi-lr", default="0.01,0.05", help="comma-separated learning rates")
    cmp_.add_argument("--advi-particles", default="1", help="comma-separated particle counts")
    cmp_.add_argument(
        "--methods", default="ngvi,advi", help="comma-separated: ngvi,fullrank,advi,nuts"
    )
    cmp_.add_argument("--pair", default=None, help="two coordinates for the pair plot, e.g. mu,tau")
    cmp_.add_argument("--nuts-samples", type=int, default=1000, help="NUTS draws per chain")
    cmp_.add_argument(
        "--plot",
        default=None,
        help="save the ELBO traces here (PNG), marginals and a pair plot beside it",
    )
    cmp_.add_argument("--json", default=None, help="write the table as JSON here")
    return p


def _load(spec: str):
    from ngvi.model.loader import ModelLoadError, load

    try:
        return load(spec)
    except ModelLoadError as e:
        raise SystemExit(f"ngvi: {e}") from None


def cmd_fit(ns) -> int:
    from ngvi.engine import NGVI
    from ngvi.guides import MeanFieldGaussian

    model, args, kwargs = _load(ns.model)
    guide = MeanFieldGaussian(model)
    t0 = time.perf_counter()
    res = NGVI(model, guide).run(
        jax.random.PRNGKey(ns.seed),
        ns.steps,
        *args,
        tol=ns.tol or None,
        progress_bar=not ns.no_progress,
        **kwargs,
    )
    secs = time.perf_counter() - t0
    draws = guide.sample_posterior(
        jax.random.PRNGKey(ns.seed + 1), res.params, sample_shape=(ns.samples,)
    )
    print(
        f"mean-field NGVI: {res.num_steps} steps in {secs:.2f} s (compile included), "
        f"final -ELBO {float(np.mean(res.losses[-20:])):.4f}, "
        f"{res.num_rejected} rejected steps{', converged' if res.converged else ''}"
    )
    print(f"{'site':>16} {'mean':>10} {'sd':>10}")
    for name, v in draws.items():
        v = np.asarray(v).reshape(ns.samples, -1)
        for i in range(v.shape[1]):
            label = name if v.shape[1] == 1 else f"{name}[{i}]"
            print(f"{label:>16} {v[:, i].mean():>10.4f} {v[:, i].std():>10.4f}")
    return 0


def cmd_compare(ns) -> int:
    import pandas as pd

    from ngvi.report.comparison import compare, verdicts

    model, args, kwargs = _load(ns.model)
    lrs = tuple(float(x) for x in ns.advi_lr.split(","))
    particles = tuple(int(x) for x in ns.advi_particles.split(","))
    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    table, extras = compare(
        model,
        *args,
        methods=methods,
        ngvi_steps=ns.steps,
        advi_steps=ns.advi_steps,
        advi_lrs=lrs,
        advi_particles=particles,
        nuts_samples=ns.nuts_samples,
        nuts_warmup=ns.nuts_samples // 2,
        plot=ns.plot,
        **kwargs,
    )
    print(f"{ns.model}: d = {extras['dim']}, mean-field optimum ELBO = {extras['best_elbo']:.4f}")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.set_index("method").T.to_string(float_format=lambda v: f"{v:.4g}"))
    for line in verdicts(table):
        print("verdict", line)
    _verdict(table.to_dict("records"))
    if ns.json:
        rows = json.loads(table.to_json(orient="records"))
        with open(ns.json, "w") as f:
            json.dump(
                {"model": ns.model, "best_elbo": extras["best_elbo"], "rows": rows}, f, indent=2
            )
    return 0


def _verdict(rows) -> None:
    ngvi_row = next((r for r in rows if r["method"] == "ngvi"), None)
    best = next((r for r in rows if r.get("best_advi") is True), None)
    key = "steps_to_0.1"
    if ngvi_row is None or best is None:
        return
    if not (_num(ngvi_row.get(key)) and _num(best.get(key))):
        print("verdict: one of the methods did not stay within 0.1 nat; run longer.")
        return
    print(
        f"verdict: NGVI needed {best[key] / ngvi_row[key]:.1f}x fewer steps and "
        f"{best['seconds_to_0.1'] / ngvi_row['seconds_to_0.1']:.1f}x less time than the best "
        f"ADVI (lr={best['lr']}, particles={int(best['num_particles'])})."
    )


def _num(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    return {"fit": cmd_fit, "compare": cmd_compare}[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
