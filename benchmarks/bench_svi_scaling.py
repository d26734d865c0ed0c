"""How stochastic VI (Hoffman et al. 2013) scales with data size, against full-batch CAVI.

For N in --sizes (default 1e4, 1e5, 1e6) synthetic points from ``models.bayes_gmm.synthetic``
(K = 3, D = 2), on one CPU thread, float64:

* full-batch CAVI (``ngvi.em.fit_cavi_gmm``) run to convergence: time per iteration and time
  to converge (first iteration whose ELBO change is below 1e-9 relative);
* SVI (``ngvi.em.fit_svi_gmm``, B = --batch, rho_t = (t + 1)^-0.7) with minibatches drawn by
  the model's ``numpyro.plate("data", N, subsample_size=B)`` ("numpyro") and i.i.d. indices
  ("uniform"): time per iteration and time until the SVI iterate is within --tol of the
  converged CAVI solution (``ngvi.em.vb_distance``: max abs error of E[mu] and E[pi]).

Both start from the same initialisation (``init_bayes_gmm`` on 2000 points, scaled to N).
Times exclude compilation (each jitted loop is run once before timing). Prints a table and
writes benchmarks/results/svi_scaling.json.

    python benchmarks/bench_svi_scaling.py [--sizes 10000 100000 1000000] [--batch 500]
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from ngvi import em  # noqa: E402
from ngvi.models import bayes_gmm  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "svi_scaling.json"


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of a second call (the first compiles)."""
    jax.block_until_ready(fn(*args, **kwargs))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def first_index(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def run_size(n: int, args) -> dict:
    X = np.asarray(bayes_gmm.synthetic(n, jax.random.PRNGKey(0)))
    sub = X[np.random.default_rng(1).choice(n, min(n, 2000), replace=False)]
    init = em.init_bayes_gmm(sub, 3, bayes_gmm.PRIOR, jax.random.PRNGKey(2), n / len(sub))
    cavi, t_cavi = timed(
        em.fit_cavi_gmm,
        X,
        3,
        args.cavi_iters,
        init=init,
        prior=bayes_gmm.PRIOR,
        keep_responsibilities=False,
    )
    elbo = np.asarray(cavi.elbo)
    conv = first_index(np.abs(np.diff(elbo)) <= 1e-9 * np.abs(elbo[1:]))
    vb = jax.tree_util.tree_map(lambda v: np.asarray(v[-1]), cavi.params)
    row = {
        "N": n,
        "cavi_s_per_iter": t_cavi / args.cavi_iters,
        "cavi_iters_to_converge": None if conv is None else conv + 1,
        "cavi_s_to_converge": None if conv is None else (conv + 1) * t_cavi / args.cavi_iters,
    }
    for mode in ("numpyro", "uniform"):
        res, t_svi = timed(
            em.fit_svi_gmm,
            X,
            3,
            args.svi_iters,
            args.batch,
            init=init,
            prior=bayes_gmm.PRIOR,
            subsample=mode,
        )
        params = jax.tree_util.tree_map(np.asarray, res.params)
        dist = np.array(
            [
                em.vb_distance(vb, jax.tree_util.tree_map(lambda v, i=i: v[i], params))
                for i in range(args.svi_iters + 1)
            ]
        )
        hit = first_index(dist <= args.tol)
        per_iter = t_svi / args.svi_iters
        row[f"svi_{mode}_s_per_iter"] = per_iter
        row[f"svi_{mode}_iters_to_tol"] = hit
        row[f"svi_{mode}_s_to_tol"] = None if hit is None else hit * per_iter
        row[f"svi_{mode}_final_distance"] = float(dist[-1])
        row["plate_scale"] = res.plate_scale
    return row


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--svi-iters", type=int, default=1000)
    p.add_argument("--cavi-iters", type=int, default=60)
    p.add_argument("--tol", type=float, default=0.05)
    args = p.parse_args()
    rows = [run_size(n, args) for n in args.sizes]
    head = (
        f"{'N':>9} | {'CAVI s/it':>9} {'it':>4} {'s conv':>7} | "
        f"{'SVI-np s/it':>11} {'it':>5} {'s tol':>7} | {'SVI-iid s/it':>12} {'it':>5} "
        f"{'s tol':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['N']:>9} | {r['cavi_s_per_iter']:>9.2e} {fmt(r['cavi_iters_to_converge'], '>4')}"
            f" {fmt(r['cavi_s_to_converge'], '>7.3f')} | {r['svi_numpyro_s_per_iter']:>11.2e}"
            f" {fmt(r['svi_numpyro_iters_to_tol'], '>5')} {fmt(r['svi_numpyro_s_to_tol'], '>7.3f')}"
            f" | {r['svi_uniform_s_per_iter']:>12.2e} {fmt(r['svi_uniform_iters_to_tol'], '>5')}"
            f" {fmt(r['svi_uniform_s_to_tol'], '>7.3f')}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "batch_size": args.batch,
        "svi_iters": args.svi_iters,
        "cavi_iters": args.cavi_iters,
        "tol": args.tol,
        "step_size": "rho_t = (t + 1)^-0.7",
        "K": 3,
        "D": 2,
        "threads": "1 (XLA_FLAGS)",
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "load_avg_1m": os.getloadavg()[0],
    }
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
