"""The quasi-Newton warm start: an L-BFGS path on log p from the chosen start, every point of it
scored as a mean-field Gaussian start, the best kept.

This is Pathfinder's idea (Zhang, Carpenter, Gelman and Vehtari 2022) with a diagonal Gaussian:
at each L-BFGS iterate ``z_k`` the start ``q_k = N(z_k, diag(B_k)^-1)`` takes its scale from the
diagonal of the L-BFGS Hessian approximation ``B_k`` (the mean-field optimum of a Gaussian target
has precision ``diag(H)``), and its ELBO on one fixed set of draws (common random numbers) picks
the best ``q_k``. The start itself is ``q_0``: the path is kept only where it is better and
ended at a mode of log p (``WarmStart.at_mode``); a path that runs off into a funnel's neck or a
centred hierarchy's ``tau -> 0`` is not used, and stops after ``patience`` points without a
better one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ngvi.numerics.fusion import unfused

__all__ = ["WarmStart", "lbfgs_direction", "lbfgs_hessian_diag", "warm_start"]


class WarmStart(NamedTuple):
    """What ``warm_start`` found: the best point of the path and its scale, with its ELBO and the
    start's on the same draws, and what it cost (gradient evaluations include the line search's)."""

    z: jax.Array  # (d,) the best point of the path (the start when none was better)
    scale: jax.Array  # (d,) its scale, diag(B)^-1/2 (the start's scale when the start was best)
    elbo: float  # fixed-noise ELBO of N(z, diag(scale^2))
    start_elbo: float  # the start's, on the same draws
    #: -log p the L-BFGS model predicts is left to gain at the path's last point,
    #: ``g^T H g / 2`` (the Newton decrement's half square)
    left: float
    #: the path ended at a mode of log p: ``left``, the last step's gain and the diagonal
    #: decrement ``sum (g s)^2 / 2`` all below ``mode_tol`` (the last two guard against an ``H``
    #: scaled down by a neck's sharp curvature)
    at_mode: bool
    iterations: int
    grad_evals: int  # of log p's gradient, the line search's included
    forward_evals: int  # of log p alone, by the scoring (draws x points scored, the start's too)
    seconds: float  # the path's wall-clock, compile excluded
    compile_seconds: float


def _valid(n, m: int) -> jax.Array:
    return jnp.arange(m) >= m - n  # pairs are kept oldest first, the newest in the last row


def lbfgs_direction(g: jax.Array, S: jax.Array, Y: jax.Array, n: jax.Array) -> jax.Array:
    """``H g`` by the two-loop recursion (Nocedal and Wright, Alg. 7.4), ``H`` the L-BFGS inverse
    Hessian of the last ``n`` pairs ``(s_i, y_i)`` (rows of ``S``, ``Y``, newest last) with
    ``H_0 = (s^T y / y^T y) I`` of the newest pair; with no pair, ``H_0 = I / max(|g|, 1)``."""
    S, Y = jnp.asarray(S), jnp.asarray(Y)
    m = S.shape[0]
    valid = _valid(n, m)
    sy = jnp.sum(S * Y, axis=1)
    rho = jnp.where(valid, 1.0 / jnp.where(valid, sy, 1.0), 0.0)
    yy = jnp.sum(Y[-1] ** 2)
    first = 1.0 / jnp.maximum(jnp.linalg.norm(g), 1.0)  # no pair yet
    gamma = jnp.where(n > 0, sy[-1] / jnp.where(n > 0, yy, 1.0), first)

    def newest_first(q, i):
        a = rho[i] * jnp.dot(S[i], q)
        return q - a * Y[i], a

    q, alpha = jax.lax.scan(newest_first, g, jnp.arange(m)[::-1])
    alpha = alpha[::-1]

    def oldest_first(r, i):
        return r + S[i] * (alpha[i] - rho[i] * jnp.dot(Y[i], r)), None

    r, _ = jax.lax.scan(oldest_first, gamma * q, jnp.arange(m))
    return r


def lbfgs_hessian_diag(S: jax.Array, Y: jax.Array, n: jax.Array) -> jax.Array:
    """``diag(B)`` of the L-BFGS Hessian approximation in compact form (Byrd, Nocedal and
    Schnabel 1994): ``B = s I - W M^-1 W^T`` with ``W = [s S, Y]``,
    ``M = [[s S^T S, L], [L^T, -D]]``, ``L`` the strictly lower part of ``S^T Y``,
    ``D = diag(s_i^T y_i)`` and ``s = y^T y / s^T y`` of the newest pair. O(d m^2)."""
    m = S.shape[0]
    valid = _valid(n, m)
    sy = jnp.sum(S * Y, axis=1)
    sigma = jnp.where(n > 0, jnp.sum(Y[-1] ** 2) / jnp.where(n > 0, sy[-1], 1.0), 1.0)
    L = jnp.tril(S @ Y.T, -1) * (valid[:, None] & valid[None, :])
    unused = jnp.diag(jnp.where(valid, 0.0, 1.0))  # decouples the empty slots (W is 0 there)
    M = jnp.block([[sigma * (S @ S.T) + unused, L], [L.T, -jnp.diag(jnp.where(valid, sy, 1.0))]])
    W = jnp.concatenate([sigma * S, Y])  # (2m, d)
    return sigma - jnp.sum(W * jnp.linalg.solve(M, W), axis=0)


class _Path(NamedTuple):
    z: jax.Array  # the path's current point, its -log p and gradient
    f: jax.Array
    g: jax.Array
    p: jax.Array  # the search direction and its slope g.p
    slope: jax.Array
    gain: jax.Array  # the last accepted step's decrease of -log p
    gain_diag: jax.Array  # sum (g s)^2 / 2 at the last point, s its (floored) scale
    t: jax.Array  # the step length on trial
    S: jax.Array  # (memory, d) the pairs kept, newest last
    Y: jax.Array
    n: jax.Array
    best_z: jax.Array
    best_scale: jax.Array
    best: jax.Array
    iterations: jax.Array  # accepted points (each scored)
    evals: jax.Array  # gradient evaluations, the line search's included
    since: jax.Array  # accepted points since the best
    halvings: jax.Array  # of the current line search
    done: jax.Array


def warm_start(
    log_density: Callable[[jax.Array, Any], jax.Array],
    data: Any,
    z0: jax.Array,
    scale0: jax.Array,
    eps: jax.Array,
    *,
    maxiter: int = 100,
    memory: int = 10,
    patience: int = 10,
    max_halvings: int = 20,
    mode_tol: float = 0.1,
    timing_runs: int = 0,
    cache: dict | None = None,
) -> WarmStart:
    """L-BFGS on ``-log_density(z, data)`` from ``z0`` (backtracking Armijo line search), each
    accepted point scored by ``ELBO(z, s) = mean_k log p(z + s eps_k) + sum log s + d/2 log(2 pi
    e)`` on the fixed draws ``eps`` (n, d) with ``s = max(diag(B)^-1/2, scale0)``, and the start
    with ``scale0``. The floor keeps the start no more confident than the guide's own: a natural
    step raises a precision to its Hessian estimate at once but at most halves it, less as the
    step size decays, so an overconfident start (a scale from a sharp mode, as in a centred
    hierarchy's neck) is the one that costs steps. Stops after ``maxiter`` points, ``patience``
    points without a better one, a line search of ``max_halvings`` without a finite decrease, a
    relative change of log p below 1e-7, or at a mode to ``mode_tol / 100``: the three
    ``at_mode`` measures below all under 1e-3 nat (on logistic regression, 20 gradients instead
    of 26 for the same start; further iterations move the mean by less than the ELBO resolves).
    ``at_mode`` says whether it ended at a mode: less than ``mode_tol`` nats of log p left to
    gain by the L-BFGS model, gained by the last step and promised by a diagonal Newton step in
    the scale's metric (``Guide.choose_start`` keeps the path only then: a log density without a
    mode, a funnel's neck, draws the path into a region from which mean-field steps crawl back
    along the ridge). One compiled loop: each iteration is one gradient evaluation (a trial
    point) and, when the trial is accepted, one scoring.
    ``seconds`` is the first run's wall-clock, or with ``timing_runs`` the fastest of that many
    more runs (steady state, as benchmarks time steps; the first run of a fresh executable also
    pays about 2 ms of set-up on CPU). ``cache``: a dict the caller keeps for this
    ``log_density``, holding the compiled path per argument shapes and settings, so that a
    second fit of the same model does not compile it again (``compile_seconds`` is then 0)."""
    d = z0.shape[0]
    const = 0.5 * d * math.log(2 * math.pi * math.e)
    stop_tol = 0.01 * mode_tol
    neg = lambda z, data: -log_density(z, data)

    def score(z, scale, eps, data):
        # the draws as a kernel of their own, not recomputed in each gather of the log density
        # (item-response, d = 501: the path took 4x as long)
        draws = unfused(lambda: z + scale * eps, eps)
        lp = jax.vmap(lambda zi: log_density(zi, data))(draws)
        lp = jnp.where(jnp.isfinite(lp), lp, -jnp.inf)  # a non-finite draw disqualifies q
        return jnp.mean(lp) + jnp.sum(jnp.log(scale)) + const

    def direction(g, S, Y, n):
        p = -lbfgs_direction(g, S, Y, n)
        slope = jnp.dot(g, p)
        descent = slope < 0
        return jnp.where(descent, p, -g), jnp.where(descent, slope, -jnp.dot(g, g))

    def run(z0, scale0, eps, data):
        f, g = jax.value_and_grad(neg)(z0, data)
        zeros = jnp.zeros((memory, d), z0.dtype)
        n0 = jnp.asarray(0)
        p, slope = direction(g, zeros, zeros, n0)
        start = score(z0, scale0, eps, data)
        finite = jnp.isfinite(f) & jnp.all(jnp.isfinite(g))
        one = jnp.asarray(1.0, z0.dtype)
        i0 = jnp.asarray(0)
        state = _Path(
            z0,
            f,
            g,
            p,
            slope,
            jnp.asarray(jnp.inf, z0.dtype),
            jnp.asarray(jnp.inf, z0.dtype),
            one,
            zeros,
            zeros,
            n0,
            z0,
            scale0,
            start,
            i0,
            jnp.asarray(1),
            i0,
            i0,
            ~finite,
        )

        def body(st: _Path) -> _Path:
            trial = st.z + st.t * st.p
            f1, g1 = jax.value_and_grad(neg)(trial, data)
            ok = jnp.isfinite(f1) & jnp.all(jnp.isfinite(g1))
            ok &= f1 <= st.f + 1e-4 * st.t * st.slope  # Armijo
            s, y = trial - st.z, g1 - st.g
            keep = ok & (jnp.dot(s, y) > 1e-10 * jnp.dot(y, y))  # B stays positive definite
            S = jnp.where(keep, jnp.roll(st.S, -1, axis=0).at[-1].set(s), st.S)
            Y = jnp.where(keep, jnp.roll(st.Y, -1, axis=0).at[-1].set(y), st.Y)
            n = jnp.where(keep, jnp.minimum(st.n + 1, memory), st.n)
            prec = lbfgs_hessian_diag(S, Y, n)
            good = jnp.isfinite(prec) & (prec > 0)
            scale = jnp.maximum(jnp.where(good, jnp.where(good, prec, 1.0) ** -0.5, 0.0), scale0)
            value = jax.lax.cond(ok, score, lambda *_: -jnp.inf * one, trial, scale, eps, data)
            better = ok & (value > st.best)
            since = jnp.where(ok, jnp.where(better, 0, st.since + 1), st.since)
            z, f, g = (jnp.where(ok, a, b) for a, b in ((trial, st.z), (f1, st.f), (g1, st.g)))
            p, slope = direction(g, S, Y, n)
            halvings = jnp.where(ok, 0, st.halvings + 1)
            flat = ok & (jnp.abs(st.f - f1) <= 1e-7 * (1.0 + jnp.abs(st.f)))
            # at a mode to far below the ELBO's resolution: nothing left to gain by the L-BFGS
            # model, by the last step or by a diagonal Newton step (the at_mode tests, x 1/100)
            gain_diag = 0.5 * jnp.sum((g1 * scale) ** 2)
            settled = ok & (jnp.maximum(jnp.maximum(-0.5 * slope, st.f - f1), gain_diag) < stop_tol)
            iterations = st.iterations + ok
            done = flat | settled | (halvings > max_halvings) | (iterations >= maxiter)
            done |= since >= patience
            return _Path(
                z,
                f,
                g,
                jnp.where(ok, p, st.p),
                jnp.where(ok, slope, st.slope),
                jnp.where(ok, st.f - f1, st.gain),
                jnp.where(ok, gain_diag, st.gain_diag),
                jnp.where(ok, one, 0.5 * st.t),
                S,
                Y,
                n,
                jnp.where(better, trial, st.best_z),
                jnp.where(better, scale, st.best_scale),
                jnp.where(better, value, st.best),
                iterations,
                st.evals + 1,
                since,
                halvings,
                done,
            )

        out = jax.lax.while_loop(lambda st: ~st.done, body, state)
        return out, start

    z0 = jnp.asarray(z0)
    scale0 = jnp.asarray(scale0, z0.dtype) * jnp.ones_like(z0)
    inputs = (z0, scale0, eps, data)
    leaves, tree = jax.tree.flatten(inputs)
    key = (maxiter, memory, patience, max_halvings, mode_tol, tree, *map(jax.typeof, leaves))
    compiled, compile_seconds = None if cache is None else cache.get(key), 0.0
    if compiled is None:  # compiled ahead, so that ``seconds`` is the path's own time
        t0 = time.perf_counter()
        compiled = jax.jit(run).lower(*inputs).compile()
        compile_seconds = time.perf_counter() - t0
        if cache is not None:
            cache[key] = compiled
    t1 = time.perf_counter()
    out, start = jax.block_until_ready(compiled(*inputs))
    seconds = time.perf_counter() - t1
    for _ in range(timing_runs):
        t2 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        seconds = min(seconds, time.perf_counter() - t2)
    left = -0.5 * float(out.slope)
    # log p has stopped moving, and a diagonal Newton step in the kept scale's metric would gain
    # little too (in a neck H is scaled down by the sharp curvature, and so is g^T H g)
    settled = max(float(out.gain), float(out.gain_diag)) < mode_tol
    return WarmStart(
        z=out.best_z,
        scale=out.best_scale,
        elbo=float(out.best),
        start_elbo=float(start),
        left=left,
        at_mode=bool(math.isfinite(left) and left < mode_tol and settled),
        iterations=int(out.iterations),
        grad_evals=int(out.evals),
        forward_evals=eps.shape[0] * (1 + int(out.iterations)),
        seconds=seconds,
        compile_seconds=compile_seconds,
    )
