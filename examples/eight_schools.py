"""Eight schools end to end: fit with NGVI, read the fit in ArviZ, check it with PSIS, compare
with NUTS, and plot the marginals.

Run: ``python examples/eight_schools.py [OUT_DIR]`` (default ./out). Writes
``eight_schools_marginals.png`` and ``eight_schools_pair.png`` there. Takes about a minute on a
laptop CPU (most of it NUTS and compilation).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import arviz as az
import jax
import numpy as np

import ngvi
from ngvi import models
from ngvi.report.baselines import nuts
from ngvi.report.diagnostics import psis_diagnostic, to_inference_data
from ngvi.report.plots import plot_marginals, plot_pair

SITES = ["mu", "tau", "theta"]


def fit_ngvi(model, args, kwargs):
    guide = ngvi.MeanFieldGaussian(model)
    engine = ngvi.NGVI(model, guide)
    t0 = time.perf_counter()
    # stops once within the default tol (0.1 nat) of the optimum; 500 is the budget
    res = engine.run(jax.random.PRNGKey(0), 500, *args, progress_bar=False, **kwargs)
    secs = time.perf_counter() - t0
    print(
        f"NGVI: {res.num_steps} steps in {secs:.1f} s (compile included), "
        f"final -ELBO {float(res.losses[-1]):.2f}, converged={res.converged}"
    )
    settings = {"lr": engine.lr, "damping": engine.damping, "num_particles": engine.num_particles}
    return guide, res, settings


def main(out_dir: str = "out") -> None:
    out = Path(out_dir)
    model, args, kwargs = models.load("eight_schools")
    guide, res, settings = fit_ngvi(model, args, kwargs)

    idata = to_inference_data(
        guide, res.params, *args, num_samples=2000, losses=res.losses, settings=settings, **kwargs
    )
    print(idata)
    with warnings.catch_warnings():  # one chain: ArviZ cannot compute R-hat, and says so
        warnings.simplefilter("ignore")
        print(az.summary(idata, var_names=SITES, kind="stats"))
        print(az.loo(idata))

    psis = psis_diagnostic(
        guide, res.params, *args, num_samples=4000, corrected_means=True, **kwargs
    )
    print("PSIS:", psis.message)
    print(
        "PSIS-corrected means: mu {:.2f}, tau {:.2f}".format(
            float(psis.corrected_means["mu"]), float(psis.corrected_means["tau"])
        )
    )

    t0 = time.perf_counter()
    mcmc = nuts(model, *args, num_warmup=500, num_samples=500, num_chains=2, **kwargs)
    print(f"NUTS: 2 x 500 draws in {time.perf_counter() - t0:.1f} s")
    nuts_draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    ngvi_draws = {k: np.asarray(idata.posterior[k].values[0]) for k in idata.posterior.data_vars}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(az.summary(az.from_numpyro(mcmc), var_names=["mu", "tau"]))

    samples = {"ngvi (mean-field)": ngvi_draws, "nuts": nuts_draws}
    plot_marginals(samples, sites=SITES, path=out / "eight_schools_marginals.png")
    plot_pair(samples, "mu", "theta[0]", path=out / "eight_schools_pair.png")
    print(f"wrote {out / 'eight_schools_marginals.png'} and {out / 'eight_schools_pair.png'}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
