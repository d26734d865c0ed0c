"""Write ``benchmarks/zoo/references.json``: NUTS posterior moments of every zoo model.

    python benchmarks/zoo/make_references.py [--only NAME ...]

NumPyro NUTS in float64, ``NUM_CHAINS`` chains run one after the other
(``chain_method="sequential"``: the machine is small), ``NUM_WARMUP`` warmup and ``NUM_SAMPLES``
draws each, fixed seed, the target acceptance the model's entry states, started by
``init_to_uniform`` (NumPyro's default) or at the entry's ``nuts_init`` values (mixtures: their
main mode, so that no chain settles in a local mode). Per model the file holds,
for every latent site in the constrained space, the posterior mean, sd and Monte Carlo standard
error of the mean (flattened), the run's settings, time, divergences, max r_hat and min bulk ESS,
and ``start``: the mean and sd of chain 0 in the flat unconstrained space of
``ngvi.make_target`` (the start of the family optima, ``make_optima.py``; one chain so that it
sits in one mode of a multimodal posterior).

A run is ``reliable`` when it has no divergence and every r_hat <= 1.01; otherwise ``flags``
says why and the harness reports no posterior-mean error against it. A model with a ``twin`` (a
reparameterisation of the same posterior, e.g. the centered eight schools) takes its reference
from its twin's draws (``twin_sites`` maps the sites), because NUTS itself is unreliable there.
Naming models with ``--only`` updates only those entries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax

jax.config.update("jax_enable_x64", True)

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from numpyro.distributions.transforms import biject_to  # noqa: E402
from numpyro.infer import MCMC, NUTS, init_to_uniform, init_to_value  # noqa: E402

from benchmarks.zoo import REGISTRY, ZooModel  # noqa: E402
from benchmarks.zoo.registry import RHAT_MAX  # noqa: E402

PATH = Path(__file__).resolve().parent / "references.json"
SEED = 0
NUM_CHAINS = 2
NUM_WARMUP = 1000
NUM_SAMPLES = 2000


def _r(x, digits: int = 6) -> list:
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64).ravel()]


def latent_supports(entry: ZooModel, args, kwargs) -> dict:
    """{latent site: support} from one trace of the model."""
    tr = numpyro.handlers.trace(numpyro.handlers.seed(entry.model, 0)).get_trace(*args, **kwargs)
    return {
        k: s["fn"].support
        for k, s in tr.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s.get("infer", {}).get("is_auxiliary", False)
    }


def unconstrained(draws: dict, supports: dict) -> np.ndarray:
    """Constrained draws {site: (n, ...)} -> flat unconstrained (n, d) in ``make_target``'s order
    (``ravel_pytree`` of the dict, keys sorted)."""

    def one(d):
        return ravel_pytree({k: biject_to(supports[k]).inv(d[k]) for k in supports})[0]

    return np.asarray(jax.vmap(one)({k: jax.numpy.asarray(draws[k]) for k in supports}))


def run_nuts(entry: ZooModel) -> tuple[dict, dict]:
    """(chain-grouped draws {site: (chains, draws, ...)}, run statistics)."""
    args, kwargs = entry.data()
    init = init_to_value(values=entry.nuts_init()) if entry.nuts_init else init_to_uniform
    kernel = NUTS(entry.model, target_accept_prob=entry.target_accept, init_strategy=init)
    mcmc = MCMC(
        kernel,
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        num_chains=NUM_CHAINS,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(SEED), *args, extra_fields=("diverging",), **kwargs)
    seconds = time.perf_counter() - t0
    draws = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    div = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    latent = latent_supports(entry, args, kwargs)
    idata = az.from_dict(posterior={k: draws[k] for k in latent})
    rhat, ess = az.rhat(idata), az.ess(idata, method="bulk")
    stats = {
        "num_chains": NUM_CHAINS,
        "num_warmup": NUM_WARMUP,
        "num_samples": NUM_SAMPLES,
        "chain_method": "sequential",
        "target_accept_prob": entry.target_accept,
        "seed": SEED,
        "dtype": "float64",
        "seconds": round(seconds, 1),
        "divergences": div,
        "r_hat_max": round(max(float(np.max(rhat[k])) for k in latent), 4),
        "ess_bulk_min": round(min(float(np.min(ess[k])) for k in latent), 1),
    }
    return draws, stats


def summarize(entry: ZooModel, draws: dict, stats: dict, source: str) -> dict:
    """The reference entry of ``entry`` from chain-grouped draws of its own latent sites."""
    args, kwargs = entry.data()
    supports = latent_supports(entry, args, kwargs)
    sites = {}
    for k in supports:
        x = draws[k]
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        mcse = az.mcse(az.from_dict(posterior={k: x}), method="mean")[k]
        sites[k] = {
            "shape": list(x.shape[2:]),
            "mean": _r(flat.mean(0)),
            "sd": _r(flat.std(0, ddof=1)),
            "mcse_mean": _r(np.asarray(mcse), 3),
        }
    start = unconstrained({k: draws[k][0] for k in supports}, supports)
    flags = []
    if stats["divergences"]:
        flags.append(f"{stats['divergences']} divergences")
    if stats["r_hat_max"] > RHAT_MAX:
        flags.append(f"r_hat {stats['r_hat_max']} > {RHAT_MAX}")
    if entry.multimodal:
        flags.append("multimodal posterior (symmetric modes): moments mix modes")
    return {
        "source": source,
        "reliable": not flags,
        "flags": flags,
        "nuts": stats,
        "sites": sites,
        "start": {"loc": _r(start.mean(0)), "scale": _r(start.std(0, ddof=1))},
    }


def twin_draws(entry: ZooModel, twin: dict) -> dict:
    """This model's latent sites from its twin's draws (``entry.twin_sites``)."""
    return {here: twin[there] for here, there in entry.twin_sites.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="update only these models")
    p.add_argument("--out", default=str(PATH))
    ns = p.parse_args(argv)
    names = ns.only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        p.error(f"unknown model(s) {unknown}; the zoo has {sorted(REGISTRY)}")
    out = json.loads(Path(ns.out).read_text()) if Path(ns.out).exists() else {"models": {}}
    out.update(
        {
            "numpyro_version": numpyro.__version__,
            "jax_version": jax.__version__,
            "rhat_max": RHAT_MAX,
            "protocol": __doc__.split("\n\n")[2],
        }
    )
    cache: dict[str, tuple[dict, dict]] = {}
    for name in names:
        entry = REGISTRY[name]
        run_name = entry.twin or name
        if run_name not in cache:
            print(f"{name:28s} NUTS on {run_name} ...", file=sys.stderr, flush=True)
            cache[run_name] = run_nuts(REGISTRY[run_name])
        draws, stats = cache[run_name]
        if entry.twin:
            ref = summarize(entry, twin_draws(entry, draws), stats, f"twin:{entry.twin}")
        else:
            ref = summarize(entry, draws, stats, "nuts")
        out["models"][name] = ref
        out["models"] = {k: out["models"][k] for k in REGISTRY if k in out["models"]}
        Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
        print(
            f"{name:28s} {stats['seconds']:7.1f} s  divergences={stats['divergences']} "
            f"r_hat_max={stats['r_hat_max']:.4f} ess_bulk_min={stats['ess_bulk_min']:.0f} "
            f"{'reliable' if ref['reliable'] else 'FLAGGED: ' + '; '.join(ref['flags'])}",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
