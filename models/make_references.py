"""Write ``models/references.json``: NUTS posterior moments for the bundled models.

Run as ``python -m ngvi.models.make_references [model ...]`` (default: all of ``REFERENCE_MODELS``).
NumPyro NUTS, 4 chains (``chain_method="sequential"``), 1000 warmup + 2000 samples each,
fixed seed.  For every latent site (constrained space) and deterministic site, the JSON
holds flattened lists of the posterior mean, sd and Monte Carlo standard error of the
mean, plus per-site max r_hat and min bulk/tail ESS (ArviZ), and per model the number
of divergences; the top level records numpyro/jax/arviz versions and the seed.
Naming models on the command line updates only those entries of an existing file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import arviz as az
import jax
import numpy as np
import numpyro
from numpyro.infer import MCMC, NUTS

from . import BUNDLED, REFERENCES_PATH

SEED = 0
NUM_CHAINS = 4
NUM_WARMUP = 1000
NUM_SAMPLES = 2000
#: models with NUTS references, and the target acceptance probability used for each
REFERENCE_MODELS = {
    "eight_schools": 0.95,
    "logistic_regression": 0.8,
    "hierarchical_linear": 0.8,
    "beta_bernoulli": 0.8,
    "normal_normal": 0.8,
    "gamma_poisson": 0.8,
    "dirichlet_categorical": 0.8,
}


def _r(x: np.ndarray, digits: int = 6) -> list:
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64).ravel()]


def run_model(name: str, target_accept: float, seed: int = SEED) -> dict:
    module = importlib.import_module(BUNDLED[name])
    args, kwargs = module.data()
    kernel = NUTS(module.model, target_accept_prob=target_accept)
    mcmc = MCMC(
        kernel,
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        num_chains=NUM_CHAINS,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("diverging",), **kwargs)
    elapsed = time.perf_counter() - t0
    samples = mcmc.get_samples(group_by_chain=True)
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    posterior = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    idata = az.from_dict(posterior=posterior)
    rhat = az.rhat(idata)
    ess_bulk = az.ess(idata, method="bulk")
    ess_tail = az.ess(idata, method="tail")
    mcse = az.mcse(idata, method="mean")

    trace = numpyro.handlers.trace(numpyro.handlers.seed(module.model, 0)).get_trace(
        *args, **kwargs
    )
    latent = [k for k, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    deterministic = [k for k, s in trace.items() if s["type"] == "deterministic"]

    def site(k: str) -> dict:
        draws = posterior[k].reshape(NUM_CHAINS * NUM_SAMPLES, -1)
        return {
            "shape": list(posterior[k].shape[2:]),
            "mean": _r(draws.mean(0)),
            "sd": _r(draws.std(0, ddof=1)),
            "mcse_mean": _r(np.asarray(mcse[k]), 3),
            "r_hat_max": round(float(np.max(rhat[k])), 4),
            "ess_bulk_min": round(float(np.min(ess_bulk[k])), 1),
            "ess_tail_min": round(float(np.min(ess_tail[k])), 1),
        }

    sites = {k: site(k) for k in latent}
    det = {k: site(k) for k in deterministic}
    return {
        "target_accept_prob": target_accept,
        "divergences": divergences,
        "r_hat_max": max(s["r_hat_max"] for s in sites.values()),
        "ess_bulk_min": min(s["ess_bulk_min"] for s in sites.values()),
        "ess_tail_min": min(s["ess_tail_min"] for s in sites.values()),
        "seconds": round(elapsed, 1),
        "sites": sites,
        "deterministic": det,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help=f"subset of {', '.join(REFERENCE_MODELS)}")
    p.add_argument("--out", default=str(REFERENCES_PATH))
    ns = p.parse_args(argv)
    unknown = [m for m in ns.models if m not in REFERENCE_MODELS]
    if unknown:
        p.error(f"no NUTS reference for {unknown}; choose from {list(REFERENCE_MODELS)}")
    names = ns.models or list(REFERENCE_MODELS)

    out = {"models": {}}
    if ns.models:
        try:
            with open(ns.out) as f:
                out = json.load(f)
        except FileNotFoundError:
            pass
    out.update(
        {
            "numpyro_version": numpyro.__version__,
            "jax_version": jax.__version__,
            "arviz_version": az.__version__,
            "seed": SEED,
            "num_chains": NUM_CHAINS,
            "num_warmup": NUM_WARMUP,
            "num_samples": NUM_SAMPLES,
            "chain_method": "sequential",
        }
    )
    for name in names:
        res = run_model(name, REFERENCE_MODELS[name])
        out["models"][name] = res
        print(
            f"{name:24s} r_hat_max={res['r_hat_max']:.4f} ess_bulk_min={res['ess_bulk_min']:.0f} "
            f"ess_tail_min={res['ess_tail_min']:.0f} divergences={res['divergences']} "
            f"({res['seconds']:.0f}s)",
            file=sys.stderr,
        )
    out["models"] = {k: out["models"][k] for k in REFERENCE_MODELS if k in out["models"]}
    with open(ns.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
