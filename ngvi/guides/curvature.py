r"""Curvature estimation for K-FAC: Kronecker factor statistics, true / empirical Fisher
gradients, pi-corrected damping and factor inversion (Martens & Grosse 2015).

This module knows nothing about guides or the engine: it turns a minibatch of layer inputs ``a``
(B, in) and pre-activation gradients ``g`` (B, out) into the factors

    A = a^T a / B   (a with a ones column for the bias),   G = g^T g / B,

splits a Tikhonov damping ``gamma`` between them (pi-correction), and inverts the damped factors
from their Cholesky factors, so that the Kronecker-factored inverse
``(A (x) G)^-1 vec(V) = vec(A^-1 V G^-1)`` (row-major vec) costs two small matmuls. A guide
keeps running factors (``fold_fisher_stats``, weight ``stat_weight``) and, on a schedule
(``refresh_due``, ``amortized``), refreshes their inverses and its covariance roots from them
(``refresh_factors``).

**True vs empirical Fisher.** ``fisher="true"`` (``KFACGuide``'s default; a ``fisher_key`` here)
takes ``g`` with targets drawn from the model's own predictive ``y~ ~ p(y | x, W)``: ``E[g g^T]`` is
then the Fisher information, a curvature matrix (the Gauss-Newton matrix for these likelihoods).
``fisher="empirical"`` (``fisher_key=None``) uses the training labels: ``E[g g^T]`` over labels is
the *uncentred gradient covariance*, which differs from the Fisher whenever the model does not yet
fit the data (early in training it is dominated by the squared mean gradient, rank one per example,
and it vanishes on examples that are already fit), so it mis-scales the step and the posterior
covariance (Kunstner et al. 2019).

Cost of a 65x65 float32 factor on XLA's CPU backend (jitted, 2 idle cores, measured in a loop):
Cholesky 19 us, a triangular solve 46 us, a 65x65 matmul 17 us, LU inverse 81 us, ``eigh``
534 us; a Newton-Schulz iteration ``X <- X (2 I - P X)`` took 110 us warm-started from the last
inverse and 519 us cold, so ``spd_inverse_root`` is a Cholesky and one triangular solve, which
also give the covariance root without a second Cholesky. (An earlier version used Newton-Schulz
on the strength of a measurement -- LU 60 ms -- that did not hold up.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, substitute, trace

from ngvi.model.layers import FisherLogLik, LayerTap

__all__ = [
    "amortized",
    "damped_factors",
    "fold_fisher_stats",
    "initial_factors",
    "kfac_precondition",
    "layer_fisher_stats",
    "layer_gradients",
    "loss_and_preactivation_grads",
    "matrix_normal_kl",
    "pi_correction",
    "preactivation_zeros",
    "refresh_due",
    "refresh_factors",
    "spd_inverse",
    "spd_inverse_root",
    "stat_weight",
    "tri_logdet",
]


def layer_fisher_stats(inputs: jax.Array, grads: jax.Array, bias: bool, diagonal: bool = False):
    """Minibatch Kronecker factors ``A = a^T a / B`` (a with a ones column for the bias) and
    ``G = g^T g / B``; or with ``diagonal`` the per-weight Fisher ``(a^2)^T (g^2) / B``."""
    a = inputs.reshape(-1, inputs.shape[-1])
    g = grads.reshape(-1, grads.shape[-1])
    if bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    n = a.shape[0]
    if diagonal:
        return (a**2).T @ (g**2) / n
    return a.T @ a / n, g.T @ g / n


def initial_factors(n: int, m: int, init_scale: float, diagonal: bool = False) -> dict:
    """A layer's curvature before the first estimate, for ``n`` inputs (with the bias row) and
    ``m`` outputs: ``A = G = I`` with their inverses ``iA``, ``iG`` and covariance roots
    ``SA = init_scale I``, ``SG = I``; with ``diagonal`` the per-weight ``F = 1`` and
    ``std = 0.01``."""
    if diagonal:
        return {"F": jnp.ones((n, m)), "std": jnp.full((n, m), 0.01)}
    eye_n, eye_m = jnp.eye(n), jnp.eye(m)
    names = ("A", "G", "iA", "iG", "SA", "SG")
    return dict(zip(names, (eye_n, eye_m, eye_n, eye_m, eye_n * init_scale, eye_m)))


def stat_weight(count, stat_decay) -> jax.Array:
    """``beta_k = max(1 / (k + 1), stat_decay)``, the weight of the ``k+1``-th minibatch in the
    running factors: the first ``1 / stat_decay`` updates average uniformly, later ones decay."""
    return jnp.maximum(1.0 / (count + 1.0), stat_decay)


def fold_fisher_stats(running: dict, inputs, grads, bias: bool, diagonal: bool, beta) -> dict:
    """The running factors after one minibatch, ``X <- (1 - beta) X + beta X_batch`` for ``X``
    in ``A``, ``G`` (or with ``diagonal`` the per-weight ``F``), ``X_batch`` from
    ``layer_fisher_stats``; ``running`` and the result are keyed ``"A"``, ``"G"`` or ``"F"``."""
    stats = layer_fisher_stats(inputs, grads, bias, diagonal)
    stats = {"F": stats} if diagonal else dict(zip("AG", stats))
    return {k: (1 - beta) * running[k] + beta * s for k, s in stats.items()}


def pi_correction(A: jax.Array, G: jax.Array) -> jax.Array:
    """``pi = sqrt((tr A / n) / (tr G / m))`` (Martens & Grosse 2015, eq. 14)."""
    dA, dG = jnp.diag(A), jnp.diag(G)
    tiny = jnp.finfo(dA.dtype).tiny ** 0.5
    return jnp.sqrt((jnp.mean(dA) + tiny) / (jnp.mean(dG) + tiny))


def damped_factors(A: jax.Array, G: jax.Array, gamma) -> tuple[jax.Array, jax.Array]:
    """``A + pi sqrt(gamma) I`` and ``G + sqrt(gamma)/pi I``, the pi-corrected split of
    ``A (x) G + gamma I`` (Martens & Grosse 2015, sec. 6.3)."""
    pi, c = pi_correction(A, G), jnp.sqrt(gamma)
    eye = lambda n: jnp.eye(n, dtype=A.dtype)
    return A + pi * c * eye(A.shape[0]), G + c / pi * eye(G.shape[0])


def spd_inverse_root(P: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P^-1, R)`` for a symmetric positive-definite ``P``, with ``R`` the lower-triangular
    Cholesky factor of ``P^-1`` (``R R^T = P^-1``, positive diagonal), from one Cholesky and one
    triangular solve: with ``J`` the exchange matrix (index reversal), ``J P J = L L^T`` gives
    ``P^-1 = J L^-T L^-1 J = R R^T`` for ``R = J L^-T J``, lower triangular because ``L^-T`` is
    upper triangular. (``chol(P^-1)`` directly would need a second Cholesky.) NaN if ``P`` is
    not numerically positive definite (the engine then rejects the step)."""
    n = P.shape[0]
    L = jnp.linalg.cholesky(P[::-1, ::-1])
    Li = jax.scipy.linalg.solve_triangular(L, jnp.eye(n, dtype=P.dtype), lower=True)
    R = Li.T[::-1, ::-1]
    return R @ R.T, R


def refresh_factors(A, G, SA, SG, gamma, num_data: int, t) -> tuple:
    """``(iA, iG, SA', SG')``: the inverses ``iA = PA^-1``, ``iG = PG^-1`` of the damped factors
    ``PA, PG = damped_factors(A, G, gamma)`` (``spd_inverse_root``: one Cholesky each, which also
    gives the roots) and the covariance roots moved a fraction ``t`` toward their new value,
    ``S' = S + t (S* - S)`` with ``S_A* = chol((N PA)^-1) = chol(PA^-1) / sqrt(N)`` and
    ``S_G* = chol(PG^-1)``."""
    PA, PG = damped_factors(A, G, gamma)
    (iA, RA), (iG, SG_new) = spd_inverse_root(PA), spd_inverse_root(PG)
    SA_new = RA / math.sqrt(num_data)
    return iA, iG, SA + t * (SA_new - SA), SG + t * (SG_new - SG)


def refresh_due(step, last, count, stats_due, inverse_every: int, stat_decay):
    """Whether to invert the factors at ``step``: ``inverse_every`` steps after the last
    inversion (at step ``last``), and at every statistics update while the running factors are
    young (their first ``1 / stat_decay`` updates, each moving them by ``1/k``): stale inverses in
    that phase made the first steps overshoot (on the digits BNN 5 of the first 7 steps were
    rejected)."""
    young = count * stat_decay <= 1.0
    return ((step - last) >= inverse_every) | (stats_due & young)


def amortized(period: int, due, fn: Callable, kept):
    """Curvature work done every ``period`` steps (a statistics update, an inversion): ``fn()``
    if ``due`` else ``kept``; with ``period == 1`` (always due) ``fn()`` with no ``lax.cond``."""
    return fn() if period == 1 else jax.lax.cond(due, fn, lambda: kept)


def spd_inverse(P: jax.Array) -> jax.Array:
    """``P^-1`` for a symmetric positive-definite ``P`` (``spd_inverse_root``'s first item)."""
    return spd_inverse_root(P)[0]


def kfac_precondition(V: jax.Array, iA: jax.Array, iG: jax.Array) -> jax.Array:
    """``A^-1 V G^-1`` given the inverses: ``= kron(A, G)^-1 vec(V)`` (row-major vec)."""
    return iA @ V @ iG


def tri_logdet(L: jax.Array) -> jax.Array:
    """``log |det L|`` of a triangular factor with positive diagonal: ``sum log diag L``."""
    return jnp.sum(jnp.log(jnp.diag(L)))


def matrix_normal_kl(D, SAp, SGp, SAq, SGq) -> jax.Array:
    """KL(p || q) for matrix normals with lower-triangular covariance roots S (cov = S_A S_A^T
    (x) S_G S_G^T), D = Mq - Mp:
    0.5 [|SAq^-1 SAp|^2 |SGq^-1 SGp|^2 + |SAq^-1 D SGq^-T|^2 - nm + 2 log det ratio]."""
    n, m = D.shape
    solve = lambda L, B: jax.scipy.linalg.solve_triangular(L, B, lower=True)
    tr_a, tr_g = jnp.sum(solve(SAq, SAp) ** 2), jnp.sum(solve(SGq, SGp) ** 2)
    maha = jnp.sum(solve(SGq, solve(SAq, D).T) ** 2)
    logdet = m * (tri_logdet(SAq) - tri_logdet(SAp)) + n * (tri_logdet(SGq) - tri_logdet(SGp))
    return 0.5 * (tr_a * tr_g + maha - n * m + 2.0 * logdet)


def preactivation_zeros(model: Callable, run: Callable, layer_names: tuple, dtype=None) -> dict:
    """Zeros shaped like each named layer's pre-activation, read by ``LayerTap`` from an
    abstract run (``jax.eval_shape``, no computation) of ``run(tapped model)``."""
    tap = LayerTap(model)
    jax.eval_shape(lambda: (run(tap), None)[1])
    return {name: jnp.zeros(tap.shapes[name], dtype) for name in layer_names}


def layer_gradients(
    model: Callable,
    values: dict,
    data: tuple,
    model_key: jax.Array,
    layer_names: tuple,
    fisher_key: jax.Array | None,
) -> tuple[dict, dict]:
    """Every ``dense`` layer's input ``a`` and the per-example gradients ``g = d log p / d s`` of
    the log-likelihood with respect to its pre-activation ``s``, at latent ``values``, in one
    backward pass (a zero perturbation added to ``s`` by ``LayerTap``).

    With ``fisher_key`` the observations are replaced by draws from the model's own predictive,
    ``y~ ~ p(y | x, W)`` (``E[g g^T]`` is then the Fisher: the *true* Fisher); with ``None`` the
    training labels are used (the *empirical* Fisher, ``E[g g^T]`` the uncentred covariance of
    the per-example gradients, biased while the model does not fit the data; Kunstner et al.
    2019). ``model_key`` reproduces the engine's subsample for models that draw one."""
    args, kwargs = data

    def loglik(delta):
        fisher = FisherLogLik(substitute(seed(model, model_key), data=values), fisher_key)
        tap = LayerTap(fisher, delta=delta)
        trace(tap).get_trace(*args, **kwargs)
        return fisher.value, tap.inputs

    delta0 = preactivation_zeros(
        substitute(seed(model, model_key), data=values),
        lambda m: trace(m).get_trace(*args, **kwargs),
        layer_names,
    )
    grads, inputs = jax.grad(loglik, has_aux=True)(delta0)
    return inputs, grads


def loss_and_preactivation_grads(f: Callable, params, delta0: dict, stats: Callable) -> tuple:
    """``(loss, aux, d loss / d params, d l~ / d delta)`` from one forward pass of
    ``f(params, delta) -> ((loss, l~), aux)`` (``delta`` a zero perturbation of each layer's
    pre-activation, read by ``LayerTap``; ``l~`` the log-likelihood at the Fisher targets) and one
    ``vjp``: cotangent ``(1, 0)`` gives the gradient, ``(0, 1)`` the pre-activation gradients, a
    second backward pass run as ``stats(fn, zeros)``, which may skip it and return the zeros. A
    separate ``layer_gradients`` pass would cost another forward and backward pass."""
    (loss, _), vjp_fn, aux = jax.vjp(f, params, delta0, has_aux=True)
    one, zero = jnp.ones_like(loss), jnp.zeros_like(loss)
    grad = vjp_fn((one, zero))[0]
    zeros = jax.tree.map(jnp.zeros_like, delta0)
    return loss, aux, grad, stats(lambda: vjp_fn((zero, one))[1], zeros)
