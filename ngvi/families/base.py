"""Exponential-family base class.

A family is written in canonical form (Wainwright & Jordan 2008, Sec. 3)::

    q(x | eta) = h(x) exp(<eta, T(x)> - A(eta))

with natural parameters ``eta``, sufficient statistics ``T``, base measure ``h``
and log-partition ``A``. The mean parameters are ``m = E_q[T(x)] = grad A(eta)``
and the Fisher information in natural coordinates is
``F(eta) = hess A(eta) = Cov_q[T(x)] = d m / d eta``.

Consequences used throughout the package (Amari 1998; Khan & Lin 2017;
Khan & Rue 2023, "The Bayesian learning rule"):

* the natural gradient with respect to ``eta`` of any ``L`` equals the ordinary
  gradient of ``L`` with respect to ``m``: ``F^{-1} grad_eta L = grad_m L``;
  hence ``F(eta)^{-1} v = (d eta / d m) v``, a JVP of ``mean_to_natural``;
* the KL divergence is the Bregman divergence of ``A``::

      KL(p || q) = A(eta_q) - A(eta_p) - <grad A(eta_p), eta_q - eta_p>.

Parameter pytrees
-----------------
``eta`` and ``m`` are tuples of arrays with identical structure. Leaf ``i`` has
shape ``batch_shape + param_shapes[i]``; every method broadcasts over the leading
``batch_shape`` (a site of shape ``(3,)`` with one Gamma per element has two
natural-parameter leaves of shape ``(3,)``). ``flatten`` concatenates the leaves'
event axes (row-major) into one trailing axis of size ``num_params``; this is the
coordinate system of ``fisher`` (a dense ``(..., k, k)`` block per batch element).

Instances are immutable, hashable dataclasses holding only static configuration
(event size, parameterisation), so they may be passed as ``static_argnums``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Params = tuple[Array, ...]


def is_static_zero(x: Any) -> bool:
    """True when ``x`` is a Python/NumPy scalar equal to 0 (not a tracer)."""
    return isinstance(x, (int, float)) and x == 0


def solve_sym_2x2(a: Array, b: Array, c: Array, v: Params, damping: Array | float = 0.0) -> Params:
    """Closed-form ``([[a, b], [b, c]] + damping I)^{-1} v`` for ``v = (v1, v2)``.

    ``x1 = (c' v1 - b v2) / det``, ``x2 = (a' v2 - b v1) / det`` with
    ``a' = a + damping``, ``c' = c + damping``, ``det = a' c' - b^2``.
    """
    v1, v2 = v
    a = a + damping
    c = c + damping
    det = a * c - b * b
    return ((c * v1 - b * v2) / det, (a * v2 - b * v1) / det)


def sym_2x2(a: Array, b: Array, c: Array) -> Array:
    """Dense ``[[a, b], [b, c]]`` of shape ``(..., 2, 2)`` (broadcasting a, b, c)."""
    a, b, c = jnp.broadcast_arrays(a, b, c)
    return jnp.stack([jnp.stack([a, b], -1), jnp.stack([b, c], -1)], -2)


class ExpFamily:
    """Base class of stateless exponential families (see module docstring).

    Subclasses define the class (or property) attributes

    * ``param_shapes``: tuple of per-leaf event shapes of ``eta`` / ``m``;
    * ``event_shape``: event shape of one draw ``x``;
    * ``support``: a ``numpyro.distributions.constraints`` constraint;
    * ``reparameterized``: whether ``sample`` is differentiable w.r.t. ``eta``;

    and the closed-form maps ``log_partition``, ``natural_to_mean``,
    ``mean_to_natural``, ``sufficient_stats``, ``log_base_measure``, ``fisher``,
    ``fisher_inverse``, ``sample``, ``to_numpyro``, ``from_standard``,
    ``standard`` and ``init``. ``log_prob``, ``kl``, ``fisher_vp``, ``inner``,
    ``flatten`` and ``unflatten`` are generic.
    """

    param_shapes: tuple[tuple[int, ...], ...]
    event_shape: tuple[int, ...]
    reparameterized: bool = False

    # ------------------------------------------------------------------ pytrees
    @property
    def num_params(self) -> int:
        """Number ``k`` of flattened natural parameters per batch element."""
        return sum(math.prod(s) for s in self.param_shapes)

    def batch_shape(self, eta: Params) -> tuple[int, ...]:
        """Broadcast batch shape of the parameter pytree ``eta``."""
        shapes = [jnp.shape(leaf)[: jnp.ndim(leaf) - len(s)] for leaf, s in self._zip(eta)]
        return jnp.broadcast_shapes(*shapes)

    def _zip(self, tree: Params) -> list[tuple[Array, tuple[int, ...]]]:
        if len(tree) != len(self.param_shapes):
            raise ValueError(f"expected {len(self.param_shapes)} leaves, got {len(tree)}")
        return list(zip(tree, self.param_shapes))

    def flatten(self, tree: Params) -> Array:
        """Concatenate the leaves' event axes into one trailing axis ``(..., k)``."""
        batch = self.batch_shape(tree)
        parts = [
            jnp.broadcast_to(leaf, batch + s).reshape(batch + (math.prod(s),))
            for leaf, s in self._zip(tree)
        ]
        return jnp.concatenate(parts, axis=-1)

    def unflatten(self, vec: Array) -> Params:
        """Inverse of ``flatten``: ``(..., k)`` -> tuple of ``(..., *param_shapes[i])``."""
        batch = vec.shape[:-1]
        out, start = [], 0
        for s in self.param_shapes:
            size = math.prod(s)
            out.append(vec[..., start : start + size].reshape(batch + s))
            start += size
        return tuple(out)

    def inner(self, a: Params, b: Params) -> Array:
        """``<a, b>`` summed over each leaf's event axes; shape = batch shape."""
        total = 0.0
        for (x, s), y in zip(self._zip(a), b):
            prod = x * y
            total = total + jnp.sum(prod, axis=tuple(range(prod.ndim - len(s), prod.ndim)))
        return total

    # ------------------------------------------------------------------ generic
    def log_prob(self, x: Array, eta: Params) -> Array:
        """``log q(x) = log h(x) + <eta, T(x)> - A(eta)`` (batch-shaped)."""
        t = self.sufficient_stats(x)
        return self.log_base_measure(x) + self.inner(eta, t) - self.log_partition(eta)

    def kl(self, eta_p: Params, eta_q: Params) -> Array:
        """``KL(p || q)`` as the Bregman divergence of ``A`` (closed form).

        ``KL = A(eta_q) - A(eta_p) - <grad A(eta_p), eta_q - eta_p>``.
        """
        m_p = self.natural_to_mean(eta_p)
        diff = tuple(q - p for p, q in zip(eta_p, eta_q))
        return self.log_partition(eta_q) - self.log_partition(eta_p) - self.inner(m_p, diff)

    def fisher_vp(self, eta: Params, v: Params) -> Params:
        """``F(eta) v`` as a pytree (default: dense ``fisher`` matvec)."""
        fv = jnp.einsum("...ij,...j->...i", self.fisher(eta), self.flatten(v))
        return self.unflatten(fv)

    def natural_gradient(self, eta: Params, grad: Params, damping: Array | float = 0.0) -> Params:
        """Alias of ``fisher_inverse``: natural gradient of a loss with gradient ``grad``."""
        return self.fisher_inverse(eta, grad, damping)

    # ------------------------------------------------------------------ abstract
    def log_partition(self, eta: Params) -> Array:  # pragma: no cover - abstract
        """Log-partition ``A(eta)``; shape = batch shape."""
        raise NotImplementedError

    def natural_to_mean(self, eta: Params) -> Params:  # pragma: no cover - abstract
        """Mean parameters ``m = grad A(eta) = E[T(x)]``."""
        raise NotImplementedError

    def mean_to_natural(self, m: Params) -> Params:  # pragma: no cover - abstract
        """Inverse of ``natural_to_mean``."""
        raise NotImplementedError

    def sufficient_stats(self, x: Array) -> Params:  # pragma: no cover - abstract
        """``T(x)`` as a pytree shaped like ``eta`` (with the batch shape of ``x``)."""
        raise NotImplementedError

    def log_base_measure(self, x: Array) -> Array:  # pragma: no cover - abstract
        """``log h(x)`` (batch-shaped)."""
        raise NotImplementedError

    def fisher(self, eta: Params) -> Array:  # pragma: no cover - abstract
        """Dense Fisher ``hess A`` of shape ``(..., k, k)`` in ``flatten`` coordinates."""
        raise NotImplementedError

    def fisher_inverse(
        self, eta: Params, v: Params, damping: Array | float = 0.0
    ) -> Params:  # pragma: no cover - abstract
        """``(F(eta) + damping I)^{-1} v`` in closed form."""
        raise NotImplementedError

    def sample(
        self, key: Array, eta: Params, sample_shape: tuple[int, ...] = ()
    ) -> Array:  # pragma: no cover - abstract
        """Draws of shape ``sample_shape + batch_shape + event_shape``."""
        raise NotImplementedError

    def to_numpyro(self, eta: Params) -> Any:  # pragma: no cover - abstract
        """The equivalent ``numpyro.distributions.Distribution``."""
        raise NotImplementedError

    def marginal_icdf(self, eta: Params, q: Array) -> Array:  # pragma: no cover - abstract
        """Quantile ``q`` of each coordinate's marginal, ``q`` broadcast against
        ``batch_shape + event_shape`` (for posterior summaries, not differentiated)."""
        raise NotImplementedError


def cg_solve(
    matvec: Callable[[Params], Params],
    inner: Callable[[Params, Params], Array],
    b: Params,
    num_iters: int,
) -> Params:
    """Batched conjugate gradients for an SPD operator, fixed ``num_iters``.

    ``inner`` must reduce only over event axes, so every batch element runs its
    own CG recursion (Hestenes & Stiefel 1952). Exact after ``dim`` iterations in
    exact arithmetic; used only where no closed form exists.
    """

    def axpy(alpha, x, y):  # y + alpha * x, alpha batch-shaped
        return tuple(yi + _bcast(alpha, yi) * xi for xi, yi in zip(x, y))

    def body(_, state):
        x, r, p, rs = state
        ap = matvec(p)
        pap = inner(p, ap)
        alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rs_new = inner(r, r)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        p = axpy(1.0, r, tuple(_bcast(beta, pi) * pi for pi in p))
        return x, r, p, rs_new

    x0 = tuple(jnp.zeros_like(bi) for bi in b)
    state = (x0, b, b, inner(b, b))
    return jax.lax.fori_loop(0, num_iters, body, state)[0]


def _bcast(scalar: Array, leaf: Array) -> Array:
    """Append singleton axes to a batch-shaped array so it broadcasts with ``leaf``."""
    scalar = jnp.asarray(scalar)
    return scalar.reshape(scalar.shape + (1,) * (leaf.ndim - scalar.ndim))
