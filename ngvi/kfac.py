r"""K-FAC and diagonal-Fisher variational families for Bayesian neural networks (noisy natural
gradient, Zhang et al. 2018; compare VOGN, Khan et al. 2018, and IVON, Shen et al. 2024).

Every ``ngvi.nn.dense`` layer with augmented weights ``W = [W; b]`` (``n_in = in + 1`` rows with a
bias, ``out`` columns) gets a matrix-variate Gaussian

    q(W) = MN(M, Sigma_in, Sigma_out),   cov(vec_row W) = Sigma_in (x) Sigma_out
    Sigma_in = (N (A + pi sqrt(gamma) I))^-1,  Sigma_out = (G + sqrt(gamma)/pi I)^-1,

the Kronecker-factored inverse of the damped per-example Fisher ``F + gamma I ~ A (x) G``
(``A = E[a a^T]`` over layer inputs with a column of ones for the bias, ``G = E[g g^T]`` over
gradients of the log-likelihood with respect to the pre-activations), scaled by the data size
``N``; the intrinsic damping ``gamma = 1 / (N prior_var)`` is the prior precision per datum and
the pi-correction ``pi = sqrt((tr A / n_in) / (tr G / out))`` splits it between the factors
(Martens & Grosse 2015, sec. 6.3). With row-major vectorisation (NumPy's, and the flat latent
vector's) ``kron(A, G)^-1 vec(V) = vec(A^-1 V G^-1)``, so the natural step on the mean is

    M' = M - lr / N * (A + pi c I)^-1 dL/dM (G + c/pi I)^-1,   c = sqrt(gamma + damping),

with ``damping`` the engine's Levenberg-Marquardt (Tikhonov, per datum) damping. Inversion is by
Cholesky: every ``inverse_every`` steps (or when the damping changed) the damped factors are
refactorized; between refreshes the step reuses the stale factors (Martens & Grosse 2015, sec. 8).
The covariance is stored as triangular square roots ``S_A = L_A^-T``, ``S_G = L_G^-T`` of the
two factors (``L`` the Cholesky factors of the precisions), ``W = M + S_A E S_G^T``: sampling is
two matmuls, the entropy is ``O(n + m)``, and every leaf stays valid under the engine's iterate
averaging (a convex combination of upper-triangular factors with positive diagonal is one).
``A`` and ``G`` are running averages over minibatches (decay ``stat_decay``) and live in
``params`` behind ``stop_gradient``; the weight noise is resampled every step (per minibatch).

**True vs empirical Fisher.** ``fisher="true"`` (default) takes ``g`` with targets drawn from
the model's own predictive ``y~ ~ p(y | x, W)``: ``E[g g^T]`` is then the Fisher information, a
curvature matrix (the Gauss-Newton matrix for these likelihoods). ``fisher="empirical"`` uses the
training labels: ``E[g g^T]`` over labels is the *uncentred gradient covariance*, which differs
from the Fisher whenever the model does not yet fit the data (early in training it is dominated by
the squared mean gradient, rank one per example, and it vanishes on examples that are already
fit), so it mis-scales the step and the posterior covariance (Kunstner et al. 2019).

``structure="diagonal"`` (``DiagonalFisherGuide``) keeps one Fisher entry per weight,
``F_ij = E[a_i^2 g_j^2]`` (the per-example squared gradients of VOGN), and a diagonal Gaussian
``sigma_ij^2 = 1 / (N F_ij + prior_precision)``. Latent sites outside any layer (a noise scale)
get a mean-field Gaussian with ``MeanFieldGaussian``'s natural step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.initialization import init_to_median

from ngvi.errors import ConfigError, ModelError
from ngvi.guides import Guide, MeanFieldGaussian
from ngvi.nn import LayerTap, ObservationResampler, evaluate_bnn, layer_markers
from ngvi.target import Site, Target

__all__ = [
    "DiagonalFisherGuide",
    "fast_target",
    "FitResult",
    "KFACGuide",
    "Layer",
    "fit_bnn",
    "layer_fisher_stats",
    "minibatches",
]

_LOG_2PIE = math.log(2 * math.pi * math.e)
sg = lax.stop_gradient


class Layer(NamedTuple):
    """A ``dense`` layer as the guide sees it: its sites and augmented weight-matrix shape."""

    name: str
    w: Site  # weight site (in, out)
    b: Site | None  # bias site (out,) or None
    n_in: int  # rows of the augmented matrix: in (+1 with a bias)
    n_out: int
    prior_prec: float  # mean prior precision of the weights


def find_layers(model, args, kwargs, target: Target, rng_key) -> tuple[tuple[Layer, ...], int]:
    """The model's ``dense`` layers (from their marker messages) and the data size ``N`` (the
    number of observations times the likelihood's scale: N / B * B for a minibatch)."""
    tr = trace(seed(model, rng_key)).get_trace(*args, **kwargs)
    sites = {s.name: s for s in target.sites}
    layers = []
    for name, msg in layer_markers(tr).items():
        w = sites.get(f"{name}_w")
        b = sites.get(f"{name}_b") if msg["bias"] else None
        if w is None or len(w.shape) != 2 or w.shape != w.unconstrained_shape:
            raise ModelError(f"layer '{name}' has no real (in, out) latent site '{name}_w'.")
        prec = float(jnp.mean(1.0 / tr[w.name]["fn"].variance))
        layers.append(Layer(name, w, b, w.shape[0] + (b is not None), w.shape[1], prec))
    if not layers:
        raise ModelError("the model declares no ngvi.nn.dense layer: KFACGuide needs at least one.")
    obs = [s for s in tr.values() if s["type"] == "sample" and s["is_observed"]]
    sizes = [math.prod(s["fn"].batch_shape) * float(s["scale"] or 1.0) for s in obs]
    return tuple(layers), round(max(sizes, default=1))


def fast_target(model, args: tuple, kwargs: dict, rng_key) -> Target:
    """A ``Target`` from one jitted trace at the prior median (``init_to_median``), without
    ``make_target``'s data and initialization checks (same layout and signature)."""
    info: dict = {}

    def latent_unc():
        init = init_to_median(num_samples=15)
        tr = trace(substitute(seed(model, rng_key), substitute_fn=init)).get_trace(*args, **kwargs)
        latent = [
            s
            for s in tr.values()
            if s["type"] == "sample"
            and not s["is_observed"]
            and not s.get("infer", {}).get("is_auxiliary", False)
        ]
        info["support"] = {s["name"]: s["fn"].support for s in latent}
        info["shape"] = {s["name"]: tuple(jnp.shape(s["value"])) for s in latent}
        plates = [s["args"] for s in tr.values() if s["type"] == "plate"]
        info["sub"] = any(a[1] is not None and a[1] != a[0] for a in plates)
        return {s["name"]: biject_to(s["fn"].support).inv(s["value"]) for s in latent}

    unc = jax.jit(latent_unc)()
    z0, unravel = ravel_pytree(unc)
    sites, offset = [], 0
    for name in sorted(unc):
        size = int(np.size(unc[name]))
        shape = info["shape"][name]
        sites.append(Site(name, shape, tuple(unc[name].shape), info["support"][name], offset, size))
        offset += size
    signature = ";".join(f"{s.name}{s.shape}{s.support}" for s in sites)
    return Target(model, tuple(sites), int(z0.size), z0, unravel, info["sub"], signature)


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


def _pi(dA: jax.Array, dG: jax.Array) -> jax.Array:
    """pi-correction sqrt((tr A / n) / (tr G / m)) (Martens & Grosse 2015, eq. 14)."""
    tiny = jnp.finfo(dA.dtype).tiny ** 0.5
    return jnp.sqrt((jnp.mean(dA) + tiny) / (jnp.mean(dG) + tiny))


def damped_factors(A: jax.Array, G: jax.Array, gamma) -> tuple[jax.Array, jax.Array]:
    """``A + pi sqrt(gamma) I`` and ``G + sqrt(gamma)/pi I``, the pi-corrected split of
    ``A (x) G + gamma I`` (Martens & Grosse 2015, sec. 6.3)."""
    pi, c = _pi(jnp.diag(A), jnp.diag(G)), jnp.sqrt(gamma)
    eye = lambda n: jnp.eye(n, dtype=A.dtype)
    return A + pi * c * eye(A.shape[0]), G + c / pi * eye(G.shape[0])


def _sym_inv(S: jax.Array) -> jax.Array:
    """Inverse of a symmetric positive-definite matrix, symmetrized (LU: XLA's CPU triangular
    solves are far slower than its LAPACK inverse)."""
    inv = jnp.linalg.inv(S)
    return 0.5 * (inv + inv.T)


def kfac_precondition(V: jax.Array, iA: jax.Array, iG: jax.Array) -> jax.Array:
    """``A^-1 V G^-1`` given the inverses: ``= kron(A, G)^-1 vec(V)`` (row-major vec)."""
    return iA @ V @ iG


def _tri_logdet(L: jax.Array) -> jax.Array:
    return jnp.sum(jnp.log(jnp.diag(L)))


def _cov_root(L: jax.Array) -> jax.Array:
    """``S = L^-T`` for a precision Cholesky factor L: ``S S^T = (L L^T)^-1``."""
    return jnp.linalg.inv(L).T


class KFACGuide(Guide):
    """Per-layer matrix-variate Gaussian with Kronecker-factored natural steps (module docs).

    :param structure: ``"kfac"`` (default) or ``"diagonal"`` (one Fisher entry per weight).
    :param fisher: ``"true"`` (targets from the model's predictive, default) or ``"empirical"``.
    :param inverse_every: steps between Cholesky refactorizations of the damped ``A``, ``G``.
    :param stat_decay: weight of a new minibatch in the running ``A``, ``G`` (the first steps
        average uniformly: ``beta_t = max(1 / (t + 1), stat_decay)``).
    :param num_data: ``N``; default the observations' count times their scale (N/B * B).
    :param init_scale: initial weight standard deviation (before the first curvature estimate).
    :param init_seed: seed of the fan-in scaled initial means ``N(0, 1 / in)`` (biases 0).
    :param fast_setup: lay the model out with one compiled trace (``fast_target``) instead of
        ``ngvi.make_target``'s op-by-op checks, which compile hundreds of tiny programs (about a
        minute on a busy CPU for a BNN); ``False`` runs the full checks.
    """

    def __init__(
        self,
        model: Callable,
        *,
        structure: str = "kfac",
        fisher: str = "true",
        inverse_every: int = 10,
        stat_decay: float = 0.05,
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
        if not (isinstance(inverse_every, int) and inverse_every >= 1):
            raise ConfigError(f"inverse_every must be an integer >= 1, got {inverse_every!r}.")
        if not 0 < stat_decay <= 1:
            raise ConfigError(f"stat_decay must be in (0, 1], got {stat_decay!r}.")
        self.structure, self.fisher = structure, fisher
        self.inverse_every, self.stat_decay = inverse_every, float(stat_decay)
        self._num_data, self.init_scale, self.init_seed = num_data, float(init_scale), init_seed
        self._mf = MeanFieldGaussian(model, init_scale=init_scale)

    # -- layout -------------------------------------------------------------------------------
    def setup(self, rng_key: jax.Array, args: tuple = (), kwargs: dict | None = None) -> Target:
        if self.fast_setup and self._target is None:
            self._target = fast_target(self.model, args, dict(kwargs or {}), rng_key)
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

    @property
    def diagonal(self) -> bool:
        return self.structure == "diagonal"

    def init_params(self, target: Target) -> dict:
        key = jax.random.PRNGKey(self.init_seed)
        p: dict = {"inv_step": jnp.asarray(-1e9), "inv_damping": jnp.asarray(-1.0)}
        for i, L in enumerate(self.layers):
            n_w = L.w.shape[0]
            M = jax.random.normal(jax.random.fold_in(key, i), (n_w, L.n_out)) / math.sqrt(n_w)
            if L.b is not None:
                M = jnp.concatenate([M, jnp.zeros((1, L.n_out))])
            p[f"{L.name}:M"] = M
            p.update(self._init_curvature(L))
        if self._mf_idx.size:
            p["mf:loc"] = jnp.asarray(target.init_z)[self._mf_idx]
            p["mf:scale"] = jnp.full(self._mf_idx.size, self.init_scale)
        return p

    def _init_curvature(self, L: Layer) -> dict:
        n, m = L.n_in, L.n_out
        if self.diagonal:
            return {f"{L.name}:F": jnp.ones((n, m)), f"{L.name}:std": jnp.full((n, m), 0.01)}
        eye_n, eye_m = jnp.eye(n), jnp.eye(m)
        names = ("A", "G", "iA", "iG", "SA", "SG")
        vals = (eye_n, eye_m, eye_n, eye_m, eye_n * self.init_scale, eye_m)
        return {f"{L.name}:{k}": v for k, v in zip(names, vals)}

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

    def _reparam_one(self, params: dict, e: jax.Array) -> jax.Array:
        pieces = {}
        for L in self.layers:
            W = params[f"{L.name}:M"] + self._layer_noise(params, L, self._layer_matrix(e, L))
            n_w = L.w.shape[0]
            pieces[L.w.name] = W[:n_w].ravel()
            if L.b is not None:
                pieces[L.b.name] = W[n_w]
        if self._mf_idx.size:
            zmf = params["mf:loc"] + params["mf:scale"] * e[self._mf_idx]
            offsets = np.cumsum([0] + [s.size for s in self.other_sites])
            for s, o in zip(self.other_sites, offsets):
                pieces[s.name] = zmf[o : o + s.size]
        return jnp.concatenate([pieces[s.name] for s in self.target.sites])

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
                h = h + L.n_out * _tri_logdet(sg(params[f"{L.name}:SA"]))
                h = h + L.n_in * _tri_logdet(sg(params[f"{L.name}:SG"]))
        if self._mf_idx.size:
            h = h + jnp.sum(jnp.log(params["mf:scale"])) + 0.5 * self._mf_idx.size * _LOG_2PIE
        return h

    def flat_distribution(self, params: dict) -> dist.Distribution:
        return _GuideDistribution(self, params)

    # -- curvature ----------------------------------------------------------------------------
    def batch_grads(self, params: dict, ctx, step) -> tuple[dict, dict]:
        """Layer inputs and per-example log-likelihood gradients w.r.t. pre-activations for one
        weight sample (``ctx.eps[0]``) on the step's minibatch (``ctx.model_key`` reproduces the
        engine's subsample). True Fisher: the targets are resampled from the model."""
        args, kwargs = ctx.data
        key = jax.random.fold_in(jax.random.PRNGKey(self.init_seed + 1), step)
        mkey = key if ctx.model_key is None else ctx.model_key
        values = self.constrain(sg(self._reparam_one(params, ctx.eps[0]))[None])
        values = {k: v[0] for k, v in values.items()}

        def loglik(delta):
            m = substitute(seed(self.model, mkey), data=values)
            if self.fisher == "true":
                m = ObservationResampler(m, rng_key=jax.random.fold_in(key, 1))
            tap = LayerTap(m, delta=delta)
            tr = trace(tap).get_trace(*args, **kwargs)
            obs = [s for s in tr.values() if s["type"] == "sample" and s["is_observed"]]
            ll = sum(jnp.sum(s["fn"].log_prob(s["value"])) for s in obs)
            return ll, (tap.inputs, tap.shapes)

        _, (_, shapes) = loglik({})
        delta0 = {L.name: jnp.zeros(shapes[L.name]) for L in self.layers}
        grads, (inputs, _) = jax.grad(loglik, has_aux=True)(delta0)
        return inputs, grads

    def natural_step(self, params: dict, grad: dict, lr, damping, step, ctx=None) -> dict:
        """Update the running curvature; every ``inverse_every`` steps (or after a damping change)
        refactorize the damped factors and move the covariance a fraction ``1 / (1 + damping)``
        toward its K-FAC value; take the damped Kronecker-factored step on the means."""
        if ctx is None:
            raise ConfigError("KFACGuide.natural_step needs the engine's StepContext (ctx).")
        inputs, grads = self.batch_grads(params, ctx, step)
        beta = jnp.maximum(1.0 / (step + 1.0), self.stat_decay)
        redo = ((step - params["inv_step"]) >= self.inverse_every) | (
            damping != params["inv_damping"]
        )
        new = dict(params)
        dt = params["inv_step"].dtype
        new["inv_step"] = jnp.where(redo, step, params["inv_step"]).astype(dt)
        new["inv_damping"] = jnp.where(redo, damping, params["inv_damping"]).astype(dt)
        for L in self.layers:
            bias = L.b is not None
            stats = layer_fisher_stats(inputs[L.name], grads[L.name], bias, self.diagonal)
            step_fn = self._diag_step if self.diagonal else self._kfac_step
            new.update(step_fn(L, params, grad[f"{L.name}:M"], stats, beta, lr, damping, redo))
        if self._mf_idx.size:
            mf = {"loc": params["mf:loc"], "scale": params["mf:scale"]}
            g = {"loc": grad["mf:loc"], "scale": grad["mf:scale"]}
            out = self._mf.natural_step(mf, g, lr, damping, step)
            new["mf:loc"], new["mf:scale"] = out["loc"], out["scale"]
        return new

    def _kfac_step(self, L, params, gM, stats, beta, lr, damping, redo) -> dict:
        p = {k: params[f"{L.name}:{k}"] for k in ("M", "A", "G", "iA", "iG", "SA", "SG")}
        A = (1 - beta) * p["A"] + beta * stats[0]
        G = (1 - beta) * p["G"] + beta * stats[1]
        N, gamma = self.num_data, L.prior_prec / self.num_data
        t = 1.0 / (1.0 + damping)  # trust region on the covariance too: a rejected step shrinks it

        def refresh(_):
            iA, iG = map(_sym_inv, damped_factors(A, G, gamma + damping))
            # covariance (N (A + pi c I))^-1 (x) (G + c/pi I)^-1 with intrinsic damping only
            PA, PG = damped_factors(A, G, gamma)
            SA = _cov_root(jnp.linalg.cholesky(N * PA))
            SG = _cov_root(jnp.linalg.cholesky(PG))
            return iA, iG, p["SA"] + t * (SA - p["SA"]), p["SG"] + t * (SG - p["SG"])

        keep = lambda _: (p["iA"], p["iG"], p["SA"], p["SG"])
        iA, iG, SA, SG = lax.cond(redo, refresh, keep, None)
        M = p["M"] - lr / N * kfac_precondition(gM, iA, iG)
        out = {"M": M, "A": A, "G": G, "iA": iA, "iG": iG, "SA": SA, "SG": SG}
        return {f"{L.name}:{k}": v for k, v in out.items()}

    def _diag_step(self, L, params, gM, F_batch, beta, lr, damping, redo) -> dict:
        n = L.name
        F = (1 - beta) * params[f"{n}:F"] + beta * F_batch
        prec = self.num_data * F + L.prior_prec  # posterior precision per weight
        t = 1.0 / (1.0 + damping)
        std = params[f"{n}:std"] + t * (prec**-0.5 - params[f"{n}:std"])
        M = params[f"{n}:M"] - lr * gM / (prec + self.num_data * damping)
        return {f"{n}:M": M, f"{n}:F": F, f"{n}:std": std}

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
            total = total + _matrix_normal_kl(
                D, p[f"{n}:SA"], p[f"{n}:SG"], q[f"{n}:SA"], q[f"{n}:SG"]
            )
        if self._mf_idx.size:
            mf = lambda d: {"loc": d["mf:loc"], "scale": d["mf:scale"]}
            total = total + self._mf.kl(mf(p), mf(q))
        return total


def _matrix_normal_kl(D, SAp, SGp, SAq, SGq) -> jax.Array:
    """KL(p || q) for matrix normals with covariance roots S (cov = S_A S_A^T (x) S_G S_G^T),
    D = Mq - Mp: 0.5 [|SAq^-1 SAp|^2 |SGq^-1 SGp|^2 + |SAq^-1 D SGq^-T|^2 - nm + log det ratio]."""
    n, m = D.shape
    iA, iG = jnp.linalg.inv(SAq), jnp.linalg.inv(SGq)
    tr_a, tr_g = jnp.sum((iA @ SAp) ** 2), jnp.sum((iG @ SGp) ** 2)
    maha = jnp.sum((iA @ D @ iG.T) ** 2)
    logdet = m * (_tri_logdet(SAq) - _tri_logdet(SAp)) + n * (_tri_logdet(SGq) - _tri_logdet(SGp))
    return 0.5 * (tr_a * tr_g + maha - n * m + 2.0 * logdet)


class _GuideDistribution(dist.Distribution):
    """q(z) on the flat latent vector as a NumPyro distribution (sampling only)."""

    support = dist.constraints.real_vector

    def __init__(self, guide: KFACGuide, params: dict):
        self.guide, self.params = guide, params
        super().__init__(batch_shape=(), event_shape=(guide.target.dim,))

    def sample(self, key, sample_shape=()):
        d = self.guide.target.dim
        eps = jax.random.normal(key, (int(np.prod(sample_shape)), d))
        return self.guide.reparam(self.params, eps).reshape(tuple(sample_shape) + (d,))

    def log_prob(self, value):
        raise NotImplementedError("KFACGuide's flat distribution supports sampling only.")


def DiagonalFisherGuide(model: Callable, **kwargs: Any) -> KFACGuide:
    """``KFACGuide(model, structure="diagonal", ...)``: one Fisher entry per weight (VOGN)."""
    return KFACGuide(model, structure="diagonal", **kwargs)


# -- minibatch training and Monte Carlo prediction ---------------------------------------------
class FitResult(NamedTuple):
    state: Any  # NGVIState or numpyro SVIState
    params: Any  # the fit to predict with (NGVI: averaged iterate)
    losses: np.ndarray  # (epochs,) mean minibatch loss per epoch
    epoch_times: np.ndarray  # (epochs,) seconds of training per epoch (the first compiles)
    history: list  # per-epoch Metrics on the evaluation data


def minibatches(n: int, batch_size: int, rng: np.random.Generator):
    """Index arrays of one epoch: a fresh permutation cut into full batches (the rest dropped,
    so every step has the same shape and one compiled step serves the run)."""
    perm = rng.permutation(n)
    for i in range(n // batch_size):
        yield jnp.asarray(perm[i * batch_size : (i + 1) * batch_size])


def _driver(engine):
    """(engine, init, update, params, sampler) for an NGVI engine or a NumPyro SVI object."""
    from numpyro.infer import SVI

    from ngvi.infer import NGVI

    if isinstance(engine, Guide):
        engine = NGVI(engine.model, engine, lr=0.1, num_particles=2)
    if isinstance(engine, NGVI):
        guide = engine.guide
        return engine, engine.init, engine.update, engine.get_params, guide.sample_posterior
    if isinstance(engine, SVI):  # jitted init: NumPyro's eager setup compiles op by op
        init, update = jax.jit(engine.init), jax.jit(engine.update)
        return engine, init, update, engine.get_params, engine.guide.sample_posterior
    raise ConfigError(f"fit_bnn needs an NGVI engine, ngvi guide or numpyro SVI, got {engine!r}")


def fit_bnn(
    engine,
    X: jax.Array,
    y: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    rng_key: jax.Array | None = None,
    eval_data: tuple | None = None,
    num_samples: int = 32,
    progress_bar: bool = True,
    state: Any = None,
    eval_every: int = 1,
) -> FitResult:
    """Train over ``epochs`` of shuffled minibatches, ``engine.update(state, X, y=y,
    batch_idx=idx)`` per batch (the model takes ``batch_idx``, see ``models/bnn_classifier``).

    ``engine`` is an ``NGVI`` (a bare ngvi guide gets ``NGVI(lr=0.1, num_particles=2)``) or a
    NumPyro ``SVI`` (ADVI, MAP with ``AutoDelta``). With ``eval_data=(X_test, y_test)`` the
    predictive metrics are computed every ``eval_every`` epochs and shown with the loss on a tqdm
    bar."""
    engine, init, update, get_params, sampler = _driver(engine)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    k_init, k_eval = jax.random.split(rng_key)
    rng = np.random.default_rng(int(jax.random.randint(k_init, (), 0, 2**31 - 1)))
    if state is None:
        state = init(k_init, X, y=y, batch_idx=jnp.arange(batch_size))
    draw = jax.jit(lambda k, p: sampler(k, p, sample_shape=(num_samples,)))
    bar = _epoch_bar(epochs, progress_bar)
    losses, times, history = [], [], []
    for epoch in range(epochs):
        t0, total, count = time.perf_counter(), 0.0, 0
        for idx in minibatches(X.shape[0], batch_size, rng):
            state, loss = update(state, X, y=y, batch_idx=idx)
            total, count = total + loss, count + 1
        losses.append(float(total) / max(count, 1))  # float() blocks: the epoch is done
        times.append(time.perf_counter() - t0)
        post = {"loss": f"{losses[-1]:.4g}"}
        if eval_data is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            key = jax.random.fold_in(k_eval, epoch)
            samples = draw(key, get_params(state))
            history.append(evaluate_bnn(engine.model, samples, *eval_data))
            post["acc"] = f"{history[-1].accuracy:.3f}"
        if bar is not None:
            bar.update(1)
            bar.set_postfix(post)
    if bar is not None:
        bar.close()
    return FitResult(state, get_params(state), np.asarray(losses), np.asarray(times), history)


def _epoch_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="epochs", leave=False)
