"""Full-rank NGVI against NumPyro AutoMultivariateNormal + Adam (best of a learning-rate grid),
and the cost of each family's natural step against a plain gradient step.

Part 1 (logistic regression, hierarchical linear), the protocol of ../shared/PERFORMANCE-NOTES.md
carried to the full-rank family: every checkpoint of every method is scored by one fixed-noise
full-rank ELBO, ``ELBO(mu, A) = mean_k log p(mu + A eps_k) + log|det A| + d/2 log(2 pi e)`` with
one antithetic ``eps`` (4096 x d) and any square root ``A`` of the covariance (``L^-T`` for ngvi's
precision factor, the scale_tril for NumPyro). The reference is the full-rank family optimum: BFGS
over ``(mu, tril A)`` from the best checkpoint, run on a second, independent fixed-noise scorer
(1024 draws) and then scored on the first, so that BFGS's fit to its own noise (measured: 0.7 nat
in-sample on logistic regression) is not counted; the best checkpoint if that is higher, and alone
where ``(mu, tril A)`` has more than ``BFGS_MAX_PARAMS`` entries (hierarchical: 5670; the dense
BFGS update is O(n^3)). "Steps/seconds to 0.1 nat" is the first checkpoint after which every later
one stays within 0.1 nat of it (``ngvi.compare.summarize``). ADVI (AutoMultivariateNormal, optax
Adam, Trace_ELBO, last iterate) runs the grid lr in ``GRID_LR`` x particles in ``GRID_PARTICLES``
(bench_meanfield's grid less lr = 0.1) and the best configuration by seconds is flagged
(``ngvi.report.comparison``'s rule). NGVI runs its defaults with each Hessian estimator
(``"stein"``, ``"exact"``; ``"auto"`` picks one of them by dimension). Compile time is excluded
(a warm-up run first) and reported apart; seconds are wall-clock over the checkpointed chunks.

Part 2: jitted ``eta - lr F^-1 g`` (closed-form ``fisher_inverse``) vs ``eta - lr g`` for a batch
of 1000 factors of every family (median of repeated calls).

    python benchmarks/bench_guides.py [--quick]

Prints tables and writes benchmarks/results/guides.json.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.optimize import minimize

jax.config.update("jax_enable_x64", True)

from timing import seconds  # noqa: E402

import ngvi.families as fam  # noqa: E402
from ngvi import NGVI, models  # noqa: E402
from ngvi.guides.fullrank import FullRankGaussian  # noqa: E402
from ngvi.report.baselines import advi  # noqa: E402
from ngvi.report.comparison import MethodTrace, _flag_best_advi, summarize  # noqa: E402
from ngvi.report.scoring import crn_noise  # noqa: E402

SETTINGS = {  # model: (ngvi steps, ngvi checkpoint every, advi steps, advi checkpoint every)
    "logistic_regression": (600, 20, 20000, 200),
    "hierarchical_linear": (600, 20, 20000, 200),
}
GRID_LR = (0.001, 0.01, 0.05)  # bench_meanfield's grid less lr=0.1 (never best, ~10 min budget)
GRID_PARTICLES = (1, 8)
HESSIANS = ("stein", "exact")
BFGS_MAX_PARAMS = 2000  # above: the reference is the best checkpoint (no BFGS polish)
OUT = Path(__file__).resolve().parent / "results" / "guides.json"


def make_fullrank_scorer(target, args, kwargs, num_samples: int = 4096, seed: int = 0):
    """Jitted ``score(loc, sqrt_cov) -> ELBO`` with fixed antithetic noise (module docstring)."""
    eps = crn_noise(target.dim, num_samples, seed)
    d = target.dim

    def score(loc, root):
        z = loc + eps @ root.T
        lp = jax.vmap(lambda zi: target.log_density(zi, args, kwargs))(z)
        logdet = jnp.linalg.slogdet(root)[1]
        return jnp.mean(lp) + logdet + 0.5 * d * math.log(2 * math.pi * math.e)

    return jax.jit(score)


def fullrank_optimum(fit_score, score, loc, root, maxiter: int = 300) -> float:
    """BFGS on ``fit_score`` over (loc, lower-triangular root with log diagonal) from
    (loc, root); returns ``score`` (independent noise) of the start and of the solution."""
    d = loc.shape[0]
    rows, cols = np.tril_indices(d)
    diag = rows == cols

    def unpack(x):
        vals = x[d:]
        vals = jnp.where(diag, jnp.exp(vals), vals)
        return x[:d], jnp.zeros((d, d), x.dtype).at[rows, cols].set(vals)

    tril = jnp.linalg.cholesky(root @ root.T)  # same covariance, lower triangular
    start = tril[rows, cols]
    start = jnp.where(diag, jnp.log(jnp.where(diag, start, 1.0)), start)
    x0 = jnp.concatenate([loc, start])
    obj = jax.jit(lambda x: -fit_score(*unpack(x)))
    res = minimize(obj, x0, method="BFGS", options={"maxiter": maxiter})
    return float(score(loc, root)), float(score(*unpack(res.x)))


def _trace(method, settings, tr, score, compile_s, grad_evals) -> MethodTrace:
    steps = np.array([s for s, *_ in tr])
    secs = np.array([t for _, t, *_ in tr])
    locs, roots = jnp.stack([t[2] for t in tr]), jnp.stack([t[3] for t in tr])
    elbo = np.asarray(jax.lax.map(lambda lr: score(*lr), (locs, roots)))
    loc, root = tr[-1][2], tr[-1][3]
    per_step = float(secs[-1] / steps[-1])
    return MethodTrace(method, settings, steps, elbo, per_step, compile_s, grad_evals, loc, root)


def _ngvi_trace(model, args, kwargs, steps, every, options):
    """(target, [(step, seconds, loc, sqrt_cov)], compile seconds) of one scanned run."""
    guide = FullRankGaussian(model, **options)
    engine = NGVI(model, guide)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    engine.run(key, every, *args, progress_bar=False, chunk_size=every, tol=None, **kwargs)
    compile_s = time.perf_counter() - t0
    state, trace = engine.init(key, *args, **kwargs), []

    def record(st):  # after every chunk: the averaged parameters, i.e. the reported fit
        tril = jax.block_until_ready(st.avg_params["prec_tril"])
        root = solve_triangular(tril, jnp.eye(tril.shape[0]), lower=True).T  # L^-T
        trace.append((int(st.step), time.perf_counter() - t_start, st.avg_params["loc"], root))

    t_start = time.perf_counter()
    # a trace of fixed length: no convergence check
    engine.run(None, steps, *args, init_state=state, progress_bar=False, chunk_size=every,
               callback=record, tol=None, **kwargs)  # fmt: skip
    return guide.target, trace, compile_s


def _advi_trace(model, args, kwargs, target, steps, every, lr, particles):
    """[(step, seconds, loc, scale_tril)] of AutoMultivariateNormal + Adam(lr), in the Target's
    latent order (NumPyro orders its latent vector by trace order, ngvi by site name)."""
    svi = advi(model, *args, num_steps=1, guide="fullrank", lr=lr, num_particles=particles,
               progress_bar=False, **kwargs).svi  # fmt: skip

    def chunk(state):
        return jax.lax.fori_loop(0, every, lambda _, s: svi.update(s, *args, **kwargs)[0], state)

    chunk = jax.jit(chunk)
    state = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
    t0 = time.perf_counter()
    jax.block_until_ready(chunk(state))
    compile_s = time.perf_counter() - t0
    where = svi.guide._unpack_latent(jnp.arange(target.dim, dtype=jnp.float64))
    perm = np.concatenate([np.asarray(where[s.name]).ravel() for s in target.sites]).astype(int)
    trace, elapsed = [], 0.0
    for i in range(steps // every):
        t0 = time.perf_counter()
        state = jax.block_until_ready(chunk(state))
        elapsed += time.perf_counter() - t0
        p = svi.get_params(state)
        root = p["auto_scale_tril"][perm][:, perm]
        trace.append(((i + 1) * every, elapsed, p["auto_loc"][perm], root))
    return trace, compile_s


def compare_fullrank(name: str, quick: bool) -> dict:
    model, args, kwargs = models.load(name)
    n_steps, n_every, a_steps, a_every = SETTINGS[name]
    if quick:
        n_steps, a_steps = n_steps // 2, a_steps // 4
    traces, target, score, fit_score = [], None, None, None
    for hessian in HESSIANS:
        target, tr, comp = _ngvi_trace(model, args, kwargs, n_steps, n_every, {"hessian": hessian})
        if score is None:
            score = make_fullrank_scorer(target, args, kwargs)
            fit_score = make_fullrank_scorer(target, args, kwargs, 1024, seed=1)
        p = 8  # NGVI's default particles; "exact" adds d HVPs per particle
        evals = 2 * p if hessian == "stein" else p * (target.dim + 1)
        traces.append(_trace("ngvi", {"hessian": hessian}, tr, score, comp, evals))
    for lr in GRID_LR:
        for p in GRID_PARTICLES:
            tr, comp = _advi_trace(model, args, kwargs, target, a_steps, a_every, lr, p)
            traces.append(_trace("advi", {"lr": lr, "num_particles": p}, tr, score, comp, p))
    top = max(traces, key=lambda t: t.elbo[-1] if np.isfinite(t.elbo[-1]) else -np.inf)
    best_ckpt = max(float(np.nanmax(t.elbo)) for t in traces)
    d = target.dim
    if d + d * (d + 1) // 2 <= BFGS_MAX_PARAMS:
        start, bfgs = fullrank_optimum(fit_score, score, top.loc, top.scale)
    else:  # jax.scipy's BFGS update is O(n^3) per iteration: hours at n = 5670
        start, bfgs = float(top.elbo[-1]), -np.inf
    best = max(best_ckpt, bfgs)
    rows = [summarize(t, best) for t in traces]
    _flag_best_advi(rows, 0.1)
    out = {"dim": target.dim, "best_elbo": best, "best_checkpoint_elbo": best_ckpt}
    bfgs = None if not np.isfinite(bfgs) else bfgs
    return out | {"bfgs_elbo": bfgs, "bfgs_start_elbo": start, "rows": rows}


def _valid_params(family, batch: int, key):
    """A random valid eta for ``batch`` factors of ``family``."""
    u = jax.random.uniform(key, (batch,), minval=0.5, maxval=3.0)
    if isinstance(family, fam.DiagGaussian):
        return family.from_standard(u - 1.5, u)
    if isinstance(family, fam.Gamma):
        return family.from_standard(u, 1.0 / u)
    if isinstance(family, fam.Beta):
        return family.from_standard(u, 4.0 - u)
    if isinstance(family, fam.Dirichlet):
        return family.from_standard(u[:, None] * jnp.arange(1.0, family.dim + 1.0))
    if isinstance(family, fam.FullRankGaussian):
        eye = jnp.broadcast_to(jnp.eye(family.dim), (batch, family.dim, family.dim))
        return family.from_precision_tril(jnp.zeros((batch, family.dim)), eye * u[:, None, None])
    if isinstance(family, fam.Categorical):
        return (jnp.log(u[:, None] * jnp.arange(1.0, family._k + 1.0)),)
    if isinstance(family, fam.Exponential):
        return family.from_standard(u)
    return family.from_standard(u / 4.0) if isinstance(family, fam.Bernoulli) else (jnp.log(u),)


def _median_seconds(fn, *a, repeat: int = 50) -> float:
    return float(np.median(seconds(fn, *a, repeats=repeat)))


def family_step_costs(batch: int = 1000) -> dict:
    families = {
        "DiagGaussian": fam.DiagGaussian(),
        "Gamma": fam.Gamma(),
        "Exponential": fam.Exponential(),
        "Beta": fam.Beta(),
        "Dirichlet(K=4)": fam.Dirichlet(4),
        "Bernoulli": fam.Bernoulli(),
        "Categorical(K=4)": fam.Categorical(4),
        "Poisson": fam.Poisson(),
        "FullRankGaussian(d=10)": fam.FullRankGaussian(10),
    }
    out = {}
    for i, (name, f) in enumerate(families.items()):
        eta = _valid_params(f, batch, jax.random.PRNGKey(i))
        g = tuple(0.01 * jnp.ones_like(e) for e in eta)
        natural = jax.jit(
            lambda e, g, f=f: tuple(a - 0.1 * b for a, b in zip(e, f.fisher_inverse(e, g)))
        )
        plain = jax.jit(lambda e, g: tuple(a - 0.1 * b for a, b in zip(e, g)))
        tn, tp = _median_seconds(natural, eta, g), _median_seconds(plain, eta, g)
        out[name] = {"natural_us": tn * 1e6, "plain_us": tp * 1e6, "ratio": tn / tp}
    return out


def _print_fullrank(name: str, r: dict) -> None:
    print(f"-- {name}: d = {r['dim']}, family optimum {r['best_elbo']:.4f}")
    for m in r["rows"]:
        cfg = (
            f"hessian={m['hessian']}"
            if m["method"] == "ngvi"
            else f"lr={m['lr']},P={m['num_particles']}" + (" *" if m["best_advi"] else "")
        )
        sec = m["seconds_to_0.1"]
        print(
            f"{m['method']:6s} {cfg:20s} {str(m['steps_to_0.1']):>10s} "
            f"{'never' if sec is None else f'{sec:.2f}':>9s} {m['gap_nats']:9.3f} "
            f"{m['ms_per_step']:8.3f} {m['compile_s']:9.1f}"
        )


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    t_all = time.perf_counter()
    results = {"fullrank_vs_automvn": {}, "family_step_cost": {}}
    print("== full-rank NGVI vs AutoMultivariateNormal + Adam, best of lr x particles grid")
    print(
        f"{'method':6s} {'config (* best ADVI)':20s} {'steps->0.1':>10s} {'sec->0.1':>9s} "
        f"{'final gap':>9s} {'ms/step':>8s} {'compile s':>9s}"
    )
    for name in SETTINGS:
        t0 = time.perf_counter()
        r = compare_fullrank(name, quick)
        results["fullrank_vs_automvn"][name] = r
        _print_fullrank(name, r)
        print(f"   ({time.perf_counter() - t0:.0f} s)")
    print("\n== natural step (closed-form F^-1) vs plain gradient step, 1000 factors, jitted")
    print(f"{'family':24s} {'natural us':>10s} {'plain us':>9s} {'ratio':>6s}")
    for name, c in family_step_costs().items():
        results["family_step_cost"][name] = c
        print(f"{name:24s} {c['natural_us']:10.1f} {c['plain_us']:9.1f} {c['ratio']:6.1f}")
    results["machine"] = {"platform": platform.platform(), "cpus": _cpus(), "jax": jax.__version__}
    results["protocol"] = __doc__.split("\n\n")[1]
    results["grid"] = {"lr": GRID_LR, "particles": GRID_PARTICLES, "quick": quick}
    results["total_seconds"] = time.perf_counter() - t_all
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT} ({results['total_seconds']:.0f} s in all)")


def _cpus() -> int:
    try:
        import os

        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return 0


if __name__ == "__main__":
    main(sys.argv[1:])
