"""Command line: ``ngvi fit FILE.py[:model]`` and ``ngvi compare FILE.py[:model]``.

A model file defines a NumPyro model (``model`` unless ``:name`` says otherwise) and
``data() -> (args, kwargs)``; bundled models can be named directly (``ngvi fit eight_schools``).
``ngvi fit MODEL --guide fullrank --out DIR`` saves the fit: ``DIR/idata.nc`` (ArviZ
InferenceData: draws, log-likelihood, posterior predictive, ELBO trace, PSIS k-hat),
``DIR/params.npz`` (the fitted guide parameters, one array per parameter) and
``DIR/checkpoint.npz`` (the engine state: ``NGVI.run(..., checkpoint=...)`` continues the fit).
Errors in the model, its data or the options print as one line on stderr (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

__all__ = ["GUIDES", "main"]

#: ``--guide`` name -> (label, class name in ``ngvi.guides``): every guide ngvi ships.
GUIDES = {
    "meanfield": ("mean-field", "MeanFieldGaussian"),
    "fullrank": ("full-rank", "FullRankGaussian"),
    "expfam": ("exponential-family", "ExpFamilyGuide"),
    "kfac": ("K-FAC", "KFACGuide"),
    "diagonal": ("diagonal-Fisher", "DiagonalFisherGuide"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngvi", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a model with NGVI, print the posterior, save the fit")
    fit.add_argument("model", help="FILE.py[:model] or a bundled model name")
    fit.add_argument(
        "--guide",
        default="meanfield",
        choices=list(GUIDES),
        help="meanfield (default), fullrank, expfam (per-site Beta/Gamma/Dirichlet/...), "
        "kfac or diagonal (BNNs built with ngvi.nn.dense)",
    )
    fit.add_argument("--steps", type=int, default=1000)
    fit.add_argument(
        "--tol",
        type=float,
        default=0.1,
        help="stop once within this many nats of the optimum (default 0.1; 0 runs every step)",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--samples", type=int, default=4000)
    fit.add_argument(
        "--out", default=None, help="save idata.nc, params.npz and checkpoint.npz in this folder"
    )
    fit.add_argument(
        "--no-predictive", action="store_true", help="leave posterior_predictive out of idata.nc"
    )
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
    from ngvi.model.loader import load

    return load(spec)


def _out_dir(out: str | None) -> Path | None:
    """The output folder, created and checked writable before the fit starts."""
    from ngvi.errors import ConfigError

    if out is None:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".ngvi-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out!r} is not a writable folder ({e}).") from None
    return path


def save_params(path: str | Path, params) -> None:
    """The guide's parameters as ``.npz``, one array per leaf named by its pytree path
    (``loc``, ``scale``; ``mu.eta0``; ``layers/0/...``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    arrays = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in flat}
    np.savez(path, **arrays)


def cmd_fit(ns) -> int:
    import ngvi.guides
    from ngvi.engine import NGVI, save_checkpoint

    out = _out_dir(ns.out)
    model, args, kwargs = _load(ns.model)
    label, cls = GUIDES[ns.guide]
    guide = getattr(ngvi.guides, cls)(model)
    engine = NGVI(model, guide)
    t0 = time.perf_counter()
    res = engine.run(
        jax.random.PRNGKey(ns.seed),
        ns.steps,
        *args,
        tol=ns.tol or None,
        progress_bar=not ns.no_progress,
        **kwargs,
    )
    secs = time.perf_counter() - t0
    print(
        f"{label} NGVI: {res.num_steps} steps in {secs:.2f} s (compile included), "
        f"final -ELBO {float(np.mean(res.losses[-20:])):.4f}, "
        f"{res.num_rejected} rejected steps{', converged' if res.converged else ''}"
    )
    key = jax.random.PRNGKey(ns.seed + 1)
    if out is None:
        draws = guide.sample_posterior(key, res.params, *args, sample_shape=(ns.samples,), **kwargs)
    else:
        draws = _save_fit(out, ns, engine, res, key, args, kwargs)
        save_checkpoint(out / "checkpoint.npz", res.state, guide)
    _print_draws(draws, ns.samples)
    return 0


def _save_fit(out: Path, ns, engine, res, key, args, kwargs) -> dict:
    """Write ``idata.nc`` and ``params.npz``; print the k-hat and return the posterior draws."""
    from ngvi.report.diagnostics import to_inference_data

    settings = {"lr": engine.lr, "damping": engine.damping, "num_particles": engine.num_particles}
    idata = to_inference_data(
        engine.guide,
        res.params,
        *args,
        num_samples=ns.samples,
        rng_key=key,
        losses=res.losses,
        settings={"guide": ns.guide, "steps": res.num_steps, **settings},
        posterior_predictive=not ns.no_predictive,
        **kwargs,
    )
    idata.to_netcdf(out / "idata.nc")
    save_params(out / "params.npz", res.params)
    print(f"PSIS {idata.posterior.attrs['psis_message']}")
    print(f"wrote {out / 'idata.nc'}, {out / 'params.npz'} and {out / 'checkpoint.npz'}")
    return {k: v.values[0] for k, v in idata.posterior.items()}


def _print_draws(draws: dict, n: int) -> None:
    print(f"{'site':>16} {'mean':>10} {'sd':>10}")
    for name, v in draws.items():
        v = np.asarray(v).reshape(n, -1)
        for i in range(v.shape[1]):
            label = name if v.shape[1] == 1 else f"{name}[{i}]"
            print(f"{label:>16} {v[:, i].mean():>10.4f} {v[:, i].std():>10.4f}")


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
    config = f"lr={best['lr']}, particles={int(best['num_particles'])}"
    if ngvi_row[key] == 0:  # the warm start alone is within 0.1 nat: no step ratio to give
        print(
            f"verdict: NGVI's start was already within 0.1 nat (its warm start: "
            f"{int(ngvi_row['start_grad_evals'])} gradient evaluations, "
            f"{1e3 * ngvi_row['seconds_to_0.1']:.3g} ms); the best ADVI ({config}) needed "
            f"{int(best[key])} steps, {1e3 * best['seconds_to_0.1']:.3g} ms."
        )
        return
    print(
        f"verdict: NGVI needed {best[key] / ngvi_row[key]:.1f}x fewer steps and "
        f"{best['seconds_to_0.1'] / ngvi_row['seconds_to_0.1']:.1f}x less time than the best "
        f"ADVI ({config})."
    )


def _num(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def main(argv: list[str] | None = None) -> int:
    """Run ``ngvi fit|compare``; returns the exit status. An ngvi error (``DataError``,
    ``ModelError``, ``ConfigError``, ``FitError``, ``CheckpointError``) or a model spec that
    cannot be loaded prints ``ngvi: error: <message>`` as one line on stderr and returns 1."""
    from ngvi.errors import NGVIError
    from ngvi.model.loader import ModelLoadError

    ns = _parser().parse_args(argv)
    try:
        return {"fit": cmd_fit, "compare": cmd_compare}[ns.command](ns)
    except (NGVIError, ModelLoadError) as e:
        message = " ".join(str(e).split())  # one line, however the message was wrapped
        print(f"ngvi: error: {type(e).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
