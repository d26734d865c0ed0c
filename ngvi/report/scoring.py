"""The honest yardstick for comparing fits: a common-random-numbers ELBO and the family optimum.

    ELBO(loc, scale) = mean_k log p(x, loc + scale * eps_k) + sum log scale + d/2 log(2 pi e)

with ONE fixed noise matrix ``eps`` (K x d) for every method and checkpoint, so iterates compare
without Monte Carlo noise; the mean-field family optimum maximises the same deterministic scorer
(BFGS in float64 when enabled). "Steps to 0.1 nat" is then the first checkpoint after which every
later one stays within 0.1 nat of that optimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.optimize import minimize

from ngvi.model.target import Target
from ngvi.numerics.fusion import unfused

__all__ = [
    "crn_noise",
    "first_touch",
    "make_elbo_scorer",
    "mean_log_density",
    "meanfield_optimum",
    "steps_to_within",
]


def crn_noise(dim: int, num_samples: int = 4096, seed: int = 0) -> jax.Array:
    """The fixed antithetic noise matrix (num_samples, dim) shared by every scored fit."""
    half = jax.random.normal(jax.random.PRNGKey(seed), (num_samples // 2, dim))
    return jnp.concatenate([half, -half])


def mean_log_density(
    target: Target, args, kwargs, noise: jax.Array, draws: Callable | None = None, chunk: int = 512
) -> jax.Array:
    """``mean_k log p(z_k)`` with ``z = draws(noise)`` row by row (``noise`` itself without
    ``draws``), in chunks of ``chunk`` rows (when they divide the rows) to bound memory; each
    chunk's draws are made in a kernel of their own (``ngvi.numerics.fusion.unfused``), not copied
    into every gather of the log density."""

    def chunk_logp(e):
        z = e if draws is None else unfused(lambda: draws(e), e)
        return jax.vmap(lambda zi: target.log_density(zi, args, kwargs))(z)

    if noise.shape[0] % chunk:
        return jnp.mean(chunk_logp(noise))
    return jnp.mean(jax.lax.map(chunk_logp, noise.reshape(-1, chunk, noise.shape[-1])))


def make_elbo_scorer(
    target: Target, args=(), kwargs=None, eps: jax.Array | None = None, chunk: int = 512
) -> Callable:
    """A jitted ``score(loc, scale, noise=None) -> ELBO`` of ``N(loc, diag scale^2)``,
    ``mean_k log p(loc + scale * e_k) + sum log scale + d/2 log(2 pi e)``, on the fixed noise
    ``eps`` (``crn_noise`` by default) or on ``noise`` of the same shape (held-out draws: one
    compile serves both); vectorizes over leading dims of (loc, scale) (a trace of
    checkpoints)."""
    fixed = crn_noise(target.dim) if eps is None else eps
    d = target.dim

    def score(loc, scale, noise):
        logp = mean_log_density(target, args, kwargs, noise, lambda e: loc + scale * e, chunk)
        return logp + jnp.sum(jnp.log(scale)) + 0.5 * d * math.log(2 * math.pi * math.e)

    @jax.jit
    def batched(loc, scale, noise):
        if loc.ndim == 1:
            return score(loc, scale, noise)
        return jax.lax.map(lambda ls: score(*ls, noise), (loc, scale))

    return lambda loc, scale, noise=None: batched(loc, scale, fixed if noise is None else noise)


def meanfield_optimum(score: Callable, loc0, scale0, maxiter: int = 2000):
    """Maximise the deterministic scorer over (loc, log scale) with BFGS; returns
    (loc, scale, elbo), the ELBO that of the returned point. Where BFGS fails (``status`` not
    0: jax's line search, for one, fails at its first iteration on the 1002-parameter
    item-response ELBO of ``benchmarks/bench_gym.py`` and leaves ``x`` at its failed trial,
    2,556 nats worse than the start, beside the start's ``fun``), the better of its point and
    the start is returned."""
    d = loc0.shape[0]

    def f(x):
        return -score(x[:d], jnp.exp(x[d:]))

    x0 = jnp.concatenate([jnp.asarray(loc0), jnp.log(jnp.asarray(scale0))])
    res = minimize(f, x0, method="BFGS", options={"maxiter": maxiter})
    x, fun = res.x, float(res.fun)
    if int(res.status) != 0:
        fx, f0 = float(f(x)), float(f(x0))
        x, fun = (x, fx) if np.isfinite(fx) and fx <= f0 else (x0, f0)
    return x[:d], jnp.exp(x[d:]), -fun


def steps_to_within(elbos, best: float, tol: float = 0.1, steps=None) -> int | None:
    """First checkpoint after which every later ELBO is within ``tol`` nats of ``best``
    ("stays within"); None if the last one is not."""
    gap = best - np.asarray(elbos)
    ok = np.isfinite(gap) & (gap <= tol)
    if not ok.size or not ok[-1]:
        return None
    bad = np.nonzero(~ok)[0]
    i = 0 if bad.size == 0 else int(bad[-1]) + 1
    return int(steps[i]) if steps is not None else i


def first_touch(elbos, best: float, tol: float = 0.1, steps=None) -> int | None:
    """First checkpoint within ``tol`` nats of ``best`` (reported beside "stays within")."""
    ok = np.nonzero(np.asarray(best) - np.asarray(elbos) <= tol)[0]
    if not ok.size:
        return None
    return int(steps[ok[0]]) if steps is not None else int(ok[0])
