"""Write ``benchmarks/zoo/optima.json``: each zoo model's family optima of the fixed-noise ELBO.

    python benchmarks/zoo/make_optima.py [--only NAME ...]

For every family the model's entry lists (``benchmarks/zoo/scoring.py`` defines the scorers):

* ``meanfield``: L-BFGS (float64, exact gradients) over ``(loc, log scale)`` from two starts,
  chain 0 of the NUTS reference (``references.json``: its unconstrained mean with its sd, and
  with 0.3 x its sd), the better kept;
* ``fullrank`` (d <= 200): L-BFGS over ``(loc, C)`` (``C`` lower triangular, log diagonal) from
  the mean-field optimum;
* ``expfam``: L-BFGS over the natural parameters of ``ExpFamilyGuide`` (each mapped to the real
  line through its box domain), from the guide's own start placed at the mean-field optimum's
  loc, with ``init_scale`` 0.1 (and, if L-BFGS does not converge from there, 0.5: the better
  kept).

The file records each optimum's ELBO, L-BFGS iterations and status, the mean-field loc/scale and
the posterior-mean error of the mean-field optimum itself against NUTS (how far the family is
from the posterior, apart from any fit). Naming models with ``--only`` updates only those.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

if __name__ == "__main__":  # a script: the repository importable, float64 before anything is built
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    jax.config.update("jax_enable_x64", True)  # imported (heldout.py): the caller's x64 context

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.zoo import REGISTRY, ZooModel, assess, scoring  # noqa: E402
from ngvi import ExpFamilyGuide  # noqa: E402

PATH = assess.OPTIMA


def _r(x, digits: int = 8) -> list:
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64).ravel()]


FAMILIES = ("meanfield", "fullrank", "expfam")
MAXITER = {"value": 5000}  # L-BFGS iterations per start (``--maxiter``)


def meanfield(entry: ZooModel, start: dict) -> dict:
    score = assess.scorer64(entry, "meanfield")
    fun = lambda x: -score(x["loc"], jnp.exp(x["log_scale"]))
    loc0, sd0 = jnp.asarray(start["loc"]), jnp.maximum(jnp.asarray(start["scale"]), 1e-6)
    best = None
    for shrink in (1.0, 0.3):
        x, f, info = scoring.lbfgs(
            fun, {"loc": loc0, "log_scale": jnp.log(shrink * sd0)}, MAXITER["value"]
        )
        if best is None or f < best[1]:
            best = (x, f, info)
    x, f, info = best
    return {"elbo": -f, **info, "loc": _r(x["loc"]), "scale": _r(jnp.exp(x["log_scale"]))}


def fullrank(entry: ZooModel, mf: dict) -> dict:
    return fullrank_fit(entry, mf)[1]


def fullrank_fit(entry: ZooModel, mf: dict) -> tuple[dict, dict]:
    """The full-rank optimum's ``{"loc", "cov_chol"}`` and its record."""
    score = assess.scorer64(entry, "fullrank")
    d = entry.dim
    rows, cols = np.tril_indices(d, -1)

    def chol(x):
        return jnp.zeros((d, d)).at[rows, cols].set(x["off"]) + jnp.diag(jnp.exp(x["log_diag"]))

    fun = lambda x: -score(x["loc"], chol(x))
    x0 = {
        "loc": jnp.asarray(mf["loc"]),
        "off": jnp.zeros(rows.size),
        "log_diag": jnp.log(jnp.asarray(mf["scale"])),
    }
    x, f, info = scoring.lbfgs(fun, x0, MAXITER["value"])
    return {"loc": x["loc"], "cov_chol": chol(x)}, {"elbo": -f, **info, "loc": _r(x["loc"])}


def expfam(entry: ZooModel, mf: dict) -> dict:
    return expfam_fit(entry, mf)[1]


def expfam_fit(entry: ZooModel, mf: dict) -> tuple[dict, dict]:
    """The exp-family optimum's natural parameters and its record."""
    score = assess.scorer64(entry, "expfam")
    guide = assess.guide64(entry, "expfam")
    best = None
    for init_scale in (0.1, 0.5):
        start_guide = ExpFamilyGuide(entry.model, init_scale=init_scale)
        start_guide._target, start_guide.factors = guide.target, guide.factors
        p0 = start_guide.init_params(guide.target._replace(init_z=jnp.asarray(mf["loc"])))
        to_u, from_u = scoring.ef_box(guide, p0)
        x, f, info = scoring.lbfgs(
            lambda u, from_u=from_u: -score(from_u(u)), to_u(p0), MAXITER["value"]
        )
        if best is None or f < best[1]:
            best = (from_u(x), f, info)
        if info["success"]:  # the second start only when the first did not converge
            break
    return best[0], {"elbo": -best[1], **best[2]}


def mf_mean_error(entry: ZooModel, mf: dict, ref: dict | None) -> float | None:
    """Posterior-mean error (NUTS sd) of the mean-field optimum itself."""
    guide = assess.guide64(entry, "meanfield")
    params = {"loc": jnp.asarray(mf["loc"]), "scale": jnp.asarray(mf["scale"])}
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(assess.NUM_DRAWS,))
    return assess.mean_error({k: np.mean(np.asarray(v), axis=0) for k, v in draws.items()}, ref)


def optimise(
    entry: ZooModel, ref: dict | None, families=FAMILIES, known: dict | None = None
) -> dict:
    """The optima of ``families`` (those the entry's guides use); the mean-field optimum, which
    the others start from, is reused from ``known`` when it is not asked for."""
    out = {}
    if known and "meanfield" in known and "meanfield" not in families:
        out["meanfield"] = known["meanfield"]
    else:
        start = ref["start"] if ref is not None else None
        if start is None:
            target = assess.target64(entry)
            start = {"loc": np.asarray(target.init_z), "scale": np.full(entry.dim, 0.1)}
        t0 = time.perf_counter()
        out["meanfield"] = meanfield(entry, start)
        out["meanfield"]["seconds"] = round(time.perf_counter() - t0, 1)
        out["meanfield"]["mean_error"] = mf_mean_error(entry, out["meanfield"], ref)
    for name, fn in (("fullrank", fullrank), ("expfam", expfam)):
        if name in families and name in entry.guides:
            t0 = time.perf_counter()
            out[name] = fn(entry, out["meanfield"])
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="update only these models")
    p.add_argument("--out", default=str(PATH))
    p.add_argument("--maxiter", type=int, default=5000, help="L-BFGS iterations per start")
    p.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="these families only (the others already in the file are kept)",
    )
    ns = p.parse_args(argv)
    MAXITER["value"] = ns.maxiter
    names = ns.only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        p.error(f"unknown model(s) {unknown}; the zoo has {sorted(REGISTRY)}")
    refs = assess.load_references()
    out = json.loads(Path(ns.out).read_text()) if Path(ns.out).exists() else {"models": {}}
    out["scorer"] = {
        "num_samples": scoring.NUM_SAMPLES,
        "seed": scoring.SEED,
        "protocol": __doc__.split("\n\n")[2],
    }
    for name in names:
        entry = REGISTRY[name]
        if name not in refs:
            print(f"{name:28s} no NUTS reference yet: starting from the model's init", flush=True)
        known = out["models"].get(name, {})
        res = optimise(entry, refs.get(name), tuple(ns.families), known)
        res["start"] = "nuts chain 0" if name in refs else "model init"
        out["models"][name] = {**known, **res}
        out["models"] = {k: out["models"][k] for k in REGISTRY if k in out["models"]}
        Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
        parts = [
            f"{k} {v['elbo']:.4f} ({v['iterations']} it, {v['seconds']} s"
            f"{'' if v['success'] else ', ' + v['message'][:40]})"
            for k, v in res.items()
            if isinstance(v, dict)
        ]
        err = res["meanfield"]["mean_error"]
        print(
            f"{name:28s} " + "; ".join(parts) + (f"; MF mean err {err:.2f} sd" if err else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
