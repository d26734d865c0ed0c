"""Full-rank NGVI against NumPyro AutoMultivariateNormal + Adam, and the cost of each family's
natural step against a plain gradient step.

Part 1 (logistic regression, hierarchical linear): both methods are scored at checkpoints by one
fixed-noise full-rank ELBO, ``ELBO(mu, A) = mean_k log p(mu + A eps_k) + log|det A| + d/2
log(2 pi e)`` with one antithetic ``eps`` (1024 x d) and any square root ``A`` of the covariance
(``L^-T`` for ngvi's precision factor, the scale_tril for NumPyro). "Best" is the best ELBO any
checkpoint of either method reached; "steps/seconds to 0.1 nat" is the first checkpoint after
which every later one stays within 0.1 nat of it. Compile time is excluded (a warm-up run first)
and reported apart. ADVI is one configuration (Adam lr 0.01, 1 particle, NumPyro's defaults), not
a tuned grid.

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

jax.config.update("jax_enable_x64", True)

import models  # noqa: E402
import ngvi.families as fam  # noqa: E402
from ngvi import NGVI  # noqa: E402
from ngvi.baselines import advi  # noqa: E402
from ngvi.fullrank import FullRankGaussian  # noqa: E402
from ngvi.scoring import crn_noise, steps_to_within  # noqa: E402

SETTINGS = {  # model: (ngvi steps, ngvi checkpoint every, advi steps, advi checkpoint every)
    "logistic_regression": (600, 20, 8000, 200),
    "hierarchical_linear": (600, 20, 8000, 200),
}
# FullRankGaussian options per model: with d = 105 and 8 particles the Stein Hessian is too noisy
# (measured: 90 nats short after 600 steps; 32 particles: within ~2 nats), the exact one is not
GUIDE_OPTIONS = {"logistic_regression": {}, "hierarchical_linear": {"hessian": "exact"}}
OUT = Path(__file__).resolve().parent / "results" / "guides.json"


def make_fullrank_scorer(target, args, kwargs, num_samples: int = 1024):
    """Jitted ``score(loc, sqrt_cov) -> ELBO`` with fixed antithetic noise (module docstring)."""
    eps = crn_noise(target.dim, num_samples)
    d = target.dim

    def score(loc, root):
        z = loc + eps @ root.T
        lp = jax.vmap(lambda zi: target.log_density(zi, args, kwargs))(z)
        logdet = jnp.linalg.slogdet(root)[1]
        return jnp.mean(lp) + logdet + 0.5 * d * math.log(2 * math.pi * math.e)

    return jax.jit(score)


def _ngvi_trace(model, args, kwargs, steps, every, options):
    """(target, [(step, seconds, loc, sqrt_cov)], compile seconds) of one scanned run."""
    guide = FullRankGaussian(model, **options)
    engine = NGVI(model, guide)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    engine.run(key, every, *args, progress_bar=False, chunk_size=every, **kwargs)
    compile_s = time.perf_counter() - t0
    state, trace = engine.init(key, *args, **kwargs), []

    def record(st):  # after every chunk: the averaged parameters, i.e. the reported fit
        tril = jax.block_until_ready(st.avg_params["prec_tril"])
        root = solve_triangular(tril, jnp.eye(tril.shape[0]), lower=True).T  # L^-T
        trace.append((int(st.step), time.perf_counter() - t_start, st.avg_params["loc"], root))

    t_start = time.perf_counter()
    engine.run(None, steps, *args, init_state=state, progress_bar=False, chunk_size=every,
               callback=record, **kwargs)  # fmt: skip
    return guide.target, trace, compile_s


def _advi_trace(model, args, kwargs, target, steps, every):
    """[(step, seconds, loc, scale_tril)] of AutoMultivariateNormal + Adam, in the Target's
    latent order (NumPyro orders its latent vector by trace order, ngvi by site name)."""
    svi = advi(model, *args, num_steps=1, guide="fullrank", progress_bar=False, **kwargs).svi

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
        trace.append(((i + 1) * every, elapsed, p["auto_loc"][perm], p["auto_scale_tril"][perm]))
    return trace, compile_s


def compare_fullrank(name: str, quick: bool) -> dict:
    model, args, kwargs = models.load(name)
    n_steps, n_every, a_steps, a_every = SETTINGS[name]
    if quick:
        n_steps, a_steps = n_steps // 2, a_steps // 4
    target, ngvi_tr, ngvi_compile = _ngvi_trace(
        model, args, kwargs, n_steps, n_every, GUIDE_OPTIONS[name]
    )
    advi_tr, advi_compile = _advi_trace(model, args, kwargs, target, a_steps, a_every)
    score = make_fullrank_scorer(target, args, kwargs)
    elbos = {
        k: np.array([float(score(loc, root)) for _, _, loc, root in tr])
        for k, tr in (("ngvi", ngvi_tr), ("advi", advi_tr))
    }
    best = max(float(np.max(e)) for e in elbos.values())
    out = {"dim": target.dim, "best_elbo": best, "ngvi_options": GUIDE_OPTIONS[name]}
    for k, tr, comp in (("ngvi", ngvi_tr, ngvi_compile), ("advi", advi_tr, advi_compile)):
        steps = np.array([s for s, *_ in tr])
        secs = np.array([t for _, t, *_ in tr])
        i = steps_to_within(elbos[k], best, 0.1)
        out[k] = {
            "steps_to_0.1": None if i is None else int(steps[i]),
            "seconds_to_0.1": None if i is None else float(secs[i]),
            "final_gap": float(best - elbos[k][-1]),
            "steps_run": int(steps[-1]),
            "seconds_per_step": float(secs[-1] / steps[-1]),
            "compile_seconds": float(comp),
        }
    return out


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
    jax.block_until_ready(fn(*a))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    results = {"fullrank_vs_automvn": {}, "family_step_cost": {}}
    print("== full-rank NGVI vs AutoMultivariateNormal + Adam(0.01) (fixed-noise full-rank ELBO)")
    print(
        f"{'model':22s} {'method':6s} {'steps->0.1':>10s} {'sec->0.1':>9s} {'gap':>8s} "
        f"{'ms/step':>8s} {'compile s':>9s}"
    )
    for name in SETTINGS:
        r = compare_fullrank(name, quick)
        results["fullrank_vs_automvn"][name] = r
        for k in ("ngvi", "advi"):
            m = r[k]
            sec = "never" if m["seconds_to_0.1"] is None else f"{m['seconds_to_0.1']:.2f}"
            print(
                f"{name:22s} {k:6s} {str(m['steps_to_0.1']):>10s} {sec:>9s} "
                f"{m['final_gap']:8.3f} {1e3 * m['seconds_per_step']:8.3f} "
                f"{m['compile_seconds']:9.1f}"
            )
    print("\n== natural step (closed-form F^-1) vs plain gradient step, 1000 factors, jitted")
    print(f"{'family':24s} {'natural us':>10s} {'plain us':>9s} {'ratio':>6s}")
    for name, c in family_step_costs().items():
        results["family_step_cost"][name] = c
        print(f"{name:24s} {c['natural_us']:10.1f} {c['plain_us']:9.1f} {c['ratio']:6.1f}")
    results["machine"] = {"platform": platform.platform(), "cpus": _cpus(), "jax": jax.__version__}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT}")


def _cpus() -> int:
    try:
        import os

        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return 0


if __name__ == "__main__":
    main(sys.argv[1:])
