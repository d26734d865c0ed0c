r"""K-FAC and diagonal-Fisher variational families for Bayesian neural networks (noisy natural
gradient, Zhang et al. 2018; compare VOGN, Khan et al. 2018, and IVON, Shen et al. 2024).

Every ``ngvi.nn.dense`` layer with augmented weights ``W = [W; b]`` (``n_in = in + 1`` rows with a
bias, ``out`` columns) gets a matrix-variate Gaussian

    q(W) = MN(M, Sigma_in, Sigma_out),   cov(vec_row W) = Sigma_in (x) Sigma_out
    Sigma_in = (N (A + pi sqrt(gamma) I))^-1,  Sigma_out = (G + sqrt(gamma)/pi I)^-1,

the Kronecker-factored inverse of the damped per-example Fisher ``F + gamma I ~ A (x) G``
(``A = E[a a^T]`` over layer inputs with a column of ones for the bias, ``G = E[g g^T]`` over
gradients of the log-likelihood with respect to the pre-activations), scaled by the data size
``N``: the posterior precision ``N F + prior_precision``. The intrinsic damping
``gamma = prior_precision / N`` is the prior precision per datum and the pi-correction
``pi = sqrt((tr A / n_in) / (tr G / out))`` splits it between the factors (Martens & Grosse 2015,
sec. 6.3). The mean takes the natural step with that same covariance as preconditioner (with
row-major vectorisation ``kron(A, G)^-1 vec(V) = vec(A^-1 V G^-1)``),

    M' = M - lr / (N (1 + damping)) * (A + pi c I)^-1 dL/dM (G + c/pi I)^-1,  c = sqrt(gamma),

where ``damping`` is the engine's Levenberg-Marquardt damping, Marquardt-scaled as in
``MeanFieldGaussian`` (``(F + damping F)^-1``: Tikhonov damping in the whitened coordinates of
the current curvature). Because the damping only scales the step, the damped factors need no
refactorization when it changes: they are inverted (``ngvi.curvature.spd_inverse_root``, a
Cholesky and a triangular solve) every ``inverse_every`` steps and reused in between (Martens &
Grosse 2015, sec. 8), except while the running factors are young (their first ``1 / stat_decay``
updates), when every update is inverted. The running factors ``A``, ``G`` (decay
``stat_decay``) are updated every ``stats_every`` steps from the engine's own forward pass
(``value_and_grad``): an update costs one more backward pass, for the sampled targets. The
covariance is stored as lower-triangular roots ``S_A = chol(Sigma_in)``,
``S_G = chol(Sigma_out)``, ``W = M + S_A E S_G^T``: sampling is two matmuls (reused by the
engine's accept test between refreshes), the entropy ``O(n + m)``, and the roots stay valid under
the engine's iterate averaging (a convex combination of lower-triangular factors with positive
diagonal is one; only the distribution is averaged, not the running statistics). At a refresh
the roots move a fraction ``1 / (1 + damping)`` toward their new value (a rejected step, which
raises the damping, shrinks the move). All carried statistics live in ``params`` behind
``stop_gradient``; the weight noise is resampled every step (per minibatch). True vs empirical
Fisher (``fisher=``): ``ngvi.guides.curvature``'s module docs.

``structure="diagonal"`` (``DiagonalFisherGuide``) keeps one Fisher entry per weight,
``F_ij = E[a_i^2 g_j^2]`` (the per-example squared gradients of VOGN), and a diagonal Gaussian
``sigma_ij^2 = 1 / (N F_ij + prior_precision)``. Latent sites outside any layer (a noise scale)
get a mean-field Gaussian with ``MeanFieldGaussian``'s natural step. Curvature estimation lives
in ``ngvi.guides.curvature``, minibatch training in ``ngvi.nn.train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.scipy.linalg import solve_triangular

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide, GuideDistribution
from ngvi.guides.curvature import (
    amortized,
    damped_factors,
    fold_fisher_stats,
    initial_factors,
    kfac_precondition,
    layer_fisher_stats,
    layer_gradients,
    loss_and_preactivation_grads,
    matrix_normal_kl,
    preactivation_zeros,
    refresh_due,
    refresh_factors,
    stat_weight,
    tri_logdet,
)
from ngvi.guides.meanfield import MeanFieldGaussian
from ngvi.model.layers import FisherLogLik, Layer, LayerTap, fast_target, find_layers
from ngvi.model.target import Target

__all__ = [
    "DiagonalFisherGuide",
    "KFACGuide",
    "Layer",
    "damped_factors",
    "fast_target",
    "kfac_precondition",
    "layer_fisher_stats",
]

_LOG_2PIE = math.log(2 * math.pi * math.e)
sg = lax.stop_gradient


class KFACGuide(Guide):
    """Per-layer matrix-variate Gaussian with Kronecker-factored natural steps (module docs).

    :param structure: ``"kfac"`` (default) or ``"diagonal"`` (one Fisher entry per weight).
    :param fisher: ``"true"`` (targets from the model's predictive, default) or ``"empirical"``.
    :param inverse_every: steps between inversions of the damped ``A``, ``G`` (and covariance
        refreshes) once the running factors have seen ``1 / stat_decay`` updates (before, every
        update is inverted); a rejected refresh is retried on the next step.
    :param stats_every: steps between updates of the running ``A``, ``G`` (each one more
        backward pass of the model, for the sampled targets).
    :param stat_decay: weight of a new minibatch in the running ``A``, ``G`` (the first updates
        average uniformly: ``beta_k = max(1 / (k + 1), stat_decay)``).
    :param stats_batch: estimate ``A``, ``G`` on the first ``stats_batch`` examples of each
        minibatch (``None``: all). ``a^T a`` costs ``O(B n_in^2)`` per layer, more than the
        gradient itself on a wide layer at a large batch; a subset estimates the same running
        expectation with more noise (Martens & Grosse 2015, sec. 8, use 1/8 of the batch).
    :param num_data: ``N``; default the observations' count times their scale (N/B * B).
    :param init_scale: initial weight standard deviation (before the first curvature estimate).
    :param init_seed: seed of the fan-in scaled initial means ``N(0, 1 / in)`` (biases 0).
    :param fast_setup: lay the model out with one compiled trace (``fast_target``, which
        checks the observed data as ``make_target`` does) instead of ``ngvi.make_target``'s
        op-by-op trace and initialization search, which compile hundreds of tiny programs (about
        a minute on a busy CPU for a BNN); ``False`` runs the full checks.
    """

    chooses_start = False  # the layers start from their own draws (Guide.chooses_start)

    def __init__(
        self,
        model: Callable,
        *,
        structure: str = "kfac",
        fisher: str = "true",
        inverse_every: int = 10,
        stats_every: int = 1,
        stat_decay: float = 0.05,
        stats_batch: int | None = None,
        num_data: int | None = None,
        init_scale: float = 0.01,
        init_seed: int = 0,
        init_strategy: Callable | None = None,
        fast_setup: bool = True,
    ):
        super().__init__(model, init_strategy=init_strategy)
        self.fast_setup = bool(fast_setup)
        if structure not in ("kfac", "diagonal"):
            raise ConfigError(f"structure must be 'kfac' or 'diagonal', got {structure!r}.")
        if fisher not in ("true", "empirical"):
            raise ConfigError(f"fisher must be 'true' or 'empirical', got {fisher!r}.")
        for name, v in (("inverse_every", inverse_every), ("stats_every", stats_every)):
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}.")
        if not (isinstance(stat_decay, (int, float)) and 0 < stat_decay <= 1):
            raise ConfigError(f"stat_decay must be in (0, 1], got {stat_decay!r}.")
        for name, v in (("num_data", num_data), ("stats_batch", stats_batch)):
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be None or an integer >= 1, got {v!r}.")
        self.structure, self.fisher = structure, fisher
        self.inverse_every, self.stats_every = inverse_every, stats_every
        self.stat_decay, self.stats_batch = float(stat_decay), stats_batch
        self._num_data, self.init_scale, self.init_seed = num_data, float(init_scale), init_seed
        self._mf = MeanFieldGaussian(model, init_scale=init_scale)

    @property
    def engine_defaults(self) -> dict:
        """``lr=0.1, num_particles=1``, the settings of minibatch BNN training (VOGN, Khan et al.
        2018; IVON, Shen et al. 2024), used by ``NGVI(model, KFACGuide(model))`` unless given.
        One weight sample: its Monte Carlo noise is small next to the minibatch's (the factors and
        the mean gradient average over the batch and, by the running and iterate averages, over
        steps), and each particle costs a forward and backward pass. ``lr=0.1``: a unit step
        jumps to one minibatch's optimum (measured: rejections and a damping spiral)."""
        return {"lr": 0.1, "num_particles": 1}

    # -- layout -------------------------------------------------------------------------------
    def setup(self, rng_key: jax.Array, args: tuple = (), kwargs: dict | None = None) -> Target:
        if self.fast_setup and self._target is None:
            self._target = fast_target(self.model, args, dict(kwargs or {}), rng_key)
            self._data = (tuple(args), dict(kwargs or {}))
            target = self._target
        else:
            target = super().setup(rng_key, args, kwargs)
        self.layers, n = find_layers(self.model, args, dict(kwargs or {}), target, rng_key)
        self.num_data = int(self._num_data or n)
        in_layer = {s.name for L in self.layers for s in (L.w, L.b) if s is not None}
        self.other_sites = tuple(s for s in target.sites if s.name not in in_layer)
        idx = [np.arange(s.offset, s.offset + s.size) for s in self.other_sites]
        self._mf_idx = np.concatenate(idx) if idx else np.zeros(0, int)
        return target

    def _layout_detail(self) -> str:
        return f"structure={self.structure}, layers " + ", ".join(L.name for L in self.layers)

    @property
    def diagonal(self) -> bool:
        return self.structure == "diagonal"

    def init_params(self, target: Target) -> dict:
        key = jax.random.PRNGKey(self.init_seed)
        # step of the last inversion / statistics update and the number of updates (rolled back
        # with a rejected step, so a rejected refresh is retried)
        p: dict = {"inv_step": jnp.asarray(-1e9), "stat_step": jnp.asarray(-1e9)}
        p["stat_count"] = jnp.asarray(0.0)
        for i, L in enumerate(self.layers):
            n_w = L.w.shape[0]
            M = jax.random.normal(jax.random.fold_in(key, i), (n_w, L.n_out)) / math.sqrt(n_w)
            if L.b is not None:
                M = jnp.concatenate([M, jnp.zeros((1, L.n_out))])
            p[f"{L.name}:M"] = M
            init = initial_factors(L.n_in, L.n_out, self.init_scale, self.diagonal)
            p.update({f"{L.name}:{k}": v for k, v in init.items()})
        if self._mf_idx.size:
            p["mf:loc"] = jnp.asarray(target.init_z)[self._mf_idx]
            p["mf:scale"] = jnp.full(self._mf_idx.size, self.init_scale)
        return p

    def _param_specs(self, target, init):
        pos = dist.constraints.positive
        return {
            k: (v, pos if k.endswith((":scale", ":std")) else dist.constraints.real)
            for k, v in init.items()
        }

    # -- sampling -----------------------------------------------------------------------------
    def _layer_matrix(self, e: jax.Array, L: Layer) -> jax.Array:
        """Slices of a flat vector for the layer's sites as one (n_in, out) matrix."""
        w = e[L.w.offset : L.w.offset + L.w.size].reshape(L.w.shape)
        if L.b is None:
            return w
        return jnp.concatenate([w, e[L.b.offset : L.b.offset + L.b.size][None]])

    def _layer_noise(self, params: dict, L: Layer, E: jax.Array) -> jax.Array:
        """Sigma_in^1/2 E Sigma_out^1/2 (K-FAC) or std * E (diagonal); covariance not learned by
        gradient, so stop_gradient."""
        if self.diagonal:
            return sg(params[f"{L.name}:std"]) * E
        return sg(params[f"{L.name}:SA"]) @ E @ sg(params[f"{L.name}:SG"]).T

    def _noise_terms(self, params: dict, e: jax.Array) -> dict:
        """Each layer's weight perturbation ``W - M`` for one noise vector ``e``."""
        return {L.name: self._layer_noise(params, L, self._layer_matrix(e, L)) for L in self.layers}

    def _reparam_one(self, params: dict, e: jax.Array, noise: dict | None = None) -> jax.Array:
        """The flat latent vector ``M + noise`` per layer (``noise`` default from ``e``) and the
        mean-field part."""
        noise = self._noise_terms(params, e) if noise is None else noise
        mats = {L.name: params[f"{L.name}:M"] + noise[L.name] for L in self.layers}
        zmf = params["mf:loc"] + params["mf:scale"] * e[self._mf_idx] if self._mf_idx.size else None
        return self._assemble(mats, zmf)

    def _assemble(self, mats: dict, zmf: jax.Array | None) -> jax.Array:
        """One flat vector from per-layer ``(n_in, out)`` matrices and the mean-field part."""
        pieces = {}
        for L in self.layers:
            W, n_w = mats[L.name], L.w.shape[0]
            pieces[L.w.name] = W[:n_w].ravel()
            if L.b is not None:
                pieces[L.b.name] = W[n_w]
        if zmf is not None:
            offsets = np.cumsum([0] + [s.size for s in self.other_sites])
            for s, o in zip(self.other_sites, offsets):
                pieces[s.name] = zmf[o : o + s.size]
        return jnp.concatenate([pieces[s.name] for s in self.target.sites])

    def _marginals(self, params: dict) -> tuple[jax.Array, jax.Array]:
        """Mean and marginal sd of every weight: ``sd_ij = |S_A[i]| |S_G[j]|`` (the diagonal of
        ``Sigma_in (x) Sigma_out``) or ``std`` (diagonal structure)."""
        has_mf = bool(self._mf_idx.size)
        means = {L.name: params[f"{L.name}:M"] for L in self.layers}
        loc = self._assemble(means, params["mf:loc"] if has_mf else None)
        sds = {}
        for L in self.layers:
            if self.diagonal:
                sds[L.name] = params[f"{L.name}:std"]
            else:
                row_a = jnp.linalg.norm(params[f"{L.name}:SA"], axis=1)
                row_g = jnp.linalg.norm(params[f"{L.name}:SG"], axis=1)
                sds[L.name] = row_a[:, None] * row_g[None, :]
        return loc, self._assemble(sds, params["mf:scale"] if has_mf else None)

    def log_prob_one(self, params: dict, z: jax.Array) -> jax.Array:
        """log q(z) of one flat vector: per layer ``-|E|^2 / 2 - out log|S_A| - n_in log|S_G|
        - D/2 log 2 pi`` with ``E = S_A^-1 (W - M) S_G^-T`` (``(W - M) / std`` for the diagonal
        structure), plus the mean-field part's Normal density."""
        lp = jnp.zeros((), z.dtype)
        for L in self.layers:
            D = self._layer_matrix(z, L) - params[f"{L.name}:M"]
            lp = lp - 0.5 * L.n_in * L.n_out * math.log(2 * math.pi)
            if self.diagonal:
                std = params[f"{L.name}:std"]
                lp = lp - 0.5 * jnp.sum((D / std) ** 2) - jnp.sum(jnp.log(std))
                continue
            SA, SG = params[f"{L.name}:SA"], params[f"{L.name}:SG"]
            E = solve_triangular(SA, D, lower=True)
            E = solve_triangular(SG, E.T, lower=True).T
            lp = lp - 0.5 * jnp.sum(E**2) - L.n_out * tri_logdet(SA) - L.n_in * tri_logdet(SG)
        if self._mf_idx.size:
            mf = dist.Normal(params["mf:loc"], params["mf:scale"])
            lp = lp + jnp.sum(mf.log_prob(z[self._mf_idx]))
        return lp

    def reparam(self, params: dict, eps: jax.Array) -> jax.Array:
        if eps.ndim == 1:
            return self._reparam_one(params, eps)
        return jax.vmap(partial(self._reparam_one, params))(eps)

    def entropy(self, params: dict) -> jax.Array:
        """H = sum over layers of D/2 log(2 pi e) + out log|S_A| + n_in log|S_G| (K-FAC,
        covariance S_A S_A^T (x) S_G S_G^T) or sum log std (diagonal), plus the mean-field
        part."""
        h = jnp.zeros(())
        for L in self.layers:
            h = h + 0.5 * L.n_in * L.n_out * _LOG_2PIE
            if self.diagonal:
                h = h + jnp.sum(jnp.log(sg(params[f"{L.name}:std"])))
            else:
                h = h + L.n_out * tri_logdet(sg(params[f"{L.name}:SA"]))
                h = h + L.n_in * tri_logdet(sg(params[f"{L.name}:SG"]))
        if self._mf_idx.size:
            h = h + jnp.sum(jnp.log(params["mf:scale"])) + 0.5 * self._mf_idx.size * _LOG_2PIE
        return h

    def flat_distribution(self, params: dict) -> dist.Distribution:
        return GuideDistribution(self, params)

    # -- curvature ----------------------------------------------------------------------------
    def value_and_grad(self, loss_and_logp, params: dict, step, ctx):
        """The engine's ``((-ELBO, log p per particle), grad)`` and, on a statistics step, the
        layer inputs and sampled-target pre-activation gradients of ``batch_grads``, from one
        forward pass: the first particle's log density runs through ``LayerTap`` and
        ``FisherLogLik``, and ``loss_and_preactivation_grads`` differentiates ``(-ELBO, l~)``."""
        args, kwargs, mkey = *ctx.data, ctx.model_key
        step = jnp.asarray(step)
        do_stats = (step - params["stat_step"]) >= self.stats_every
        key = self._stats_key(ctx, step)
        fisher_key = jax.random.fold_in(key, 1) if self.fisher == "true" else None
        target = self.target
        z0, dtype, names = target.init_z, ctx.eps.dtype, tuple(L.name for L in self.layers)
        run = lambda m: target._replace(model=m).log_density(z0.astype(dtype), args, kwargs, mkey)
        delta0 = preactivation_zeros(self.model, run, names, dtype)

        # the weight perturbations S_A E S_G^T (no gradient: the covariance is not learned by
        # gradient) are kept for the engine's accept test (``reparam_proposal``)
        noise = jax.vmap(partial(self._noise_terms, params))(ctx.eps)

        def f(p, delta):
            z = jax.vmap(partial(self._reparam_one, p))(ctx.eps, noise)
            fisher = FisherLogLik(self.model, fisher_key)
            tap = LayerTap(fisher, delta=delta)
            logp0 = target._replace(model=tap).log_density(z[0], args, kwargs, mkey)
            rest = jax.vmap(lambda zi: target.log_density(zi, args, kwargs, mkey))
            logp = jnp.concatenate([logp0[None], rest(z[1:])]) if z.shape[0] > 1 else logp0[None]
            loss = -(jnp.mean(logp) + self.entropy(p))
            return (loss, fisher.value), (logp, tap.inputs)

        stats = partial(amortized, self.stats_every, do_stats)
        loss, (logp, inputs), grad, grads = loss_and_preactivation_grads(f, params, delta0, stats)
        return (loss, logp), grad, (inputs, grads, noise)

    def reparam_proposal(self, params: dict, proposal: dict, eps: jax.Array, ctx) -> jax.Array:
        """The engine's samples at ``proposal`` on the step's noise. Between refreshes the
        covariance roots are unchanged, so ``W' = M' + S_A E S_G^T`` reuses the gradient pass's
        perturbations (``ctx.curvature``) instead of two more matmuls per layer (of ``O(n_in^2
        out + n_in out^2)``, most of a step on a wide layer); checked by exact equality of the
        roots, so a refresh (or a trust-region cut of one) samples afresh."""
        fresh = lambda: self.reparam(proposal, eps)
        if self.diagonal or ctx is None or ctx.curvature is None:
            return fresh()
        noise = ctx.curvature[2]
        roots = [f"{L.name}:{k}" for L in self.layers for k in ("SA", "SG")]
        same = jnp.all(jnp.stack([jnp.all(proposal[k] == params[k]) for k in roots]))
        reuse = lambda: jax.vmap(partial(self._reparam_one, proposal))(eps, noise)
        return lax.cond(same, reuse, fresh)

    def average(self, avg: dict, params: dict, w) -> dict:
        """Iterate-average the distribution only (means, covariance roots or standard deviations,
        the mean-field part); the running statistics, their inverses and the counters are not
        part of ``q`` and take their current value (no elementwise pass over them per step)."""
        dist_key = lambda k: k.endswith((":M", ":SA", ":SG", ":std")) or k.startswith("mf:")
        return {k: a + w * (params[k] - a) if dist_key(k) else params[k] for k, a in avg.items()}

    def _stats_key(self, ctx, step) -> jax.Array:
        if ctx.rng_key is not None:
            return ctx.rng_key
        return jax.random.fold_in(jax.random.PRNGKey(self.init_seed + 1), step)

    def batch_grads(self, params: dict, ctx, step) -> tuple[dict, dict]:
        """Layer inputs and per-example log-likelihood gradients w.r.t. pre-activations for one
        weight sample (``ctx.eps[0]``, the engine's first particle) on the step's minibatch
        (``ctx.model_key`` reproduces the engine's subsample); ``ngvi.guides.curvature``'s
        ``layer_gradients``, with the targets resampled from the model for the true Fisher."""
        key = self._stats_key(ctx, step)
        mkey = key if ctx.model_key is None else ctx.model_key
        values = self.constrain(sg(self._reparam_one(params, ctx.eps[0]))[None])
        values = {k: v[0] for k, v in values.items()}
        fkey = jax.random.fold_in(key, 1) if self.fisher == "true" else None
        names = tuple(L.name for L in self.layers)
        return layer_gradients(self.model, values, ctx.data, mkey, names, fkey)

    def _update_stats(self, params: dict, ctx, step) -> dict:
        """Fold this minibatch's Fisher statistics into the running ``A``, ``G`` (or ``F``)."""
        if ctx.curvature is not None:  # computed with the loss (``value_and_grad``)
            inputs, grads = ctx.curvature[:2]
        else:
            inputs, grads = self.batch_grads(params, ctx, step)
        beta = stat_weight(params["stat_count"], self.stat_decay)
        new = {"stat_step": step.astype(params["stat_step"].dtype)}
        new["stat_count"] = params["stat_count"] + 1.0
        rows = lambda x: x.reshape(-1, x.shape[-1])[: self.stats_batch]
        for L in self.layers:
            a, g = rows(inputs[L.name]), rows(grads[L.name])
            old = {k: params[f"{L.name}:{k}"] for k in self._factor_keys}
            folded = fold_fisher_stats(old, a, g, L.b is not None, self.diagonal, beta)
            new.update({f"{L.name}:{k}": v for k, v in folded.items()})
        return new

    @property
    def _factor_keys(self) -> tuple:
        """The running factors of a layer: ``F`` (diagonal) or ``A``, ``G``."""
        return ("F",) if self.diagonal else ("A", "G")

    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """Every ``stats_every`` steps update the running curvature; every ``inverse_every``
        steps invert the damped factors and move the covariance a fraction ``1 / (1 + damping)``
        toward its K-FAC value; take the Marquardt-damped Kronecker-factored step on the means."""
        if ctx is None:
            raise ConfigError("KFACGuide.natural_step needs the engine's StepContext (ctx).")
        step = jnp.asarray(step)
        new = dict(params)
        do_stats = (step - params["stat_step"]) >= self.stats_every
        keys = ["stat_step", "stat_count"] + [
            f"{L.name}:{k}" for L in self.layers for k in self._factor_keys
        ]
        old = {k: params[k] for k in keys}
        update = lambda: self._update_stats(params, ctx, step)
        new.update(amortized(self.stats_every, do_stats, update, old))
        count, last = new["stat_count"], params["inv_step"]
        redo = refresh_due(step, last, count, do_stats, self.inverse_every, self.stat_decay)
        new["inv_step"] = jnp.where(redo, step, params["inv_step"]).astype(params["inv_step"].dtype)
        t = 1.0 / (1.0 + damping)  # trust region on the covariance too: a rejected step shrinks it
        if self.diagonal:
            for L in self.layers:
                new.update(self._diag_step(L, new, grad[f"{L.name}:M"], lr, t))
        else:  # one conditional refresh for all layers
            kept = {f"{L.name}:{k}": new[f"{L.name}:{k}"] for L in self.layers for k in _ROOTS}
            refresh = lambda: {
                k: v for L in self.layers for k, v in self._refresh(L, new, t).items()
            }
            new.update(amortized(self.inverse_every, redo, refresh, kept))
            for L in self.layers:
                n = L.name
                step_M = kfac_precondition(grad[f"{n}:M"], new[f"{n}:iA"], new[f"{n}:iG"])
                new[f"{n}:M"] = new[f"{n}:M"] - (lr * t / self.num_data) * step_M
        if self._mf_idx.size:
            mf = {"loc": params["mf:loc"], "scale": params["mf:scale"]}
            g = {"loc": grad["mf:loc"], "scale": grad["mf:scale"]}
            # the precision as a running average of the Hessian estimates, whatever lr (with
            # lr = 0.1 a site's precision, started at init_scale^-2 = 1e4, kept 30% of its excess
            # after 100 steps, and the mean's steps g / s were too short to move it)
            out = self._mf.natural_step(mf, g, lr, damping, step, precision_lr=1.0)
            new["mf:loc"], new["mf:scale"] = out["loc"], out["scale"]
        return new

    def _refresh(self, L, p, t) -> dict:
        """The layer's ``iA``, ``iG``, ``SA``, ``SG`` from its running factors (``refresh_factors``
        with ``gamma = prior_precision / N``: inverses, roots moved a fraction ``t``)."""
        A, G, SA, SG = (p[f"{L.name}:{k}"] for k in ("A", "G", "SA", "SG"))
        gamma = L.prior_prec / self.num_data
        new = refresh_factors(A, G, SA, SG, gamma, self.num_data, t)
        return {f"{L.name}:{k}": v for k, v in zip(_ROOTS, new)}

    def _diag_step(self, L, p, gM, lr, t) -> dict:
        n = L.name
        prec = self.num_data * p[f"{n}:F"] + L.prior_prec  # posterior precision per weight
        std = p[f"{n}:std"] + t * (prec**-0.5 - p[f"{n}:std"])
        M = p[f"{n}:M"] - lr * t * gM / prec
        return {f"{n}:M": M, f"{n}:std": std}

    # -- divergence ---------------------------------------------------------------------------
    def kl(self, p: dict, q: dict) -> jax.Array:
        """KL(q_p || q_q): matrix-normal per layer (K-FAC) or diagonal Gaussians, closed form."""
        total = jnp.zeros(())
        for L in self.layers:
            n = L.name
            D = q[f"{n}:M"] - p[f"{n}:M"]
            if self.diagonal:
                r2 = (p[f"{n}:std"] / q[f"{n}:std"]) ** 2
                total = total + 0.5 * jnp.sum(r2 + D**2 / q[f"{n}:std"] ** 2 - 1 - jnp.log(r2))
                continue
            total = total + matrix_normal_kl(
                D, p[f"{n}:SA"], p[f"{n}:SG"], q[f"{n}:SA"], q[f"{n}:SG"]
            )
        if self._mf_idx.size:
            mf = lambda d: {"loc": d["mf:loc"], "scale": d["mf:scale"]}
            total = total + self._mf.kl(mf(p), mf(q))
        return total


_ROOTS = ("iA", "iG", "SA", "SG")


def DiagonalFisherGuide(model: Callable, **kwargs: Any) -> KFACGuide:
    """``KFACGuide(model, structure="diagonal", ...)``: one Fisher entry per weight (VOGN)."""
    return KFACGuide(model, structure="diagonal", **kwargs)
