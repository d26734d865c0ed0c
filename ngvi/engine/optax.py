r"""The natural step as an optax transformation, for users who write their own training loop.

``NGVI`` proposes ``theta' = guide.natural_step(theta, g, lr, damping, step, ctx)``: the guide's
closed-form inverse Fisher applied to the ELBO gradient ``g`` (for a step linear in ``lr``,
``theta' = theta - lr (F + damping)^-1 g``). Here that step is an
``optax.GradientTransformationExtraArgs``, with ``damping`` (and, for guides whose curvature needs
the step's noise and data, ``ctx``) as extra arguments of ``update``:

* ``natural_gradient(guide, learning_rate)``: ``updates = natural_step(theta, g, lr_t, damping,
  t, ctx) - theta``, so ``optax.apply_updates(theta, updates)`` is the engine's proposal for any
  ``lr_t`` (a float or an optax schedule of the update count ``t``). Chain gradient transforms
  (``optax.clip_by_global_norm``) before it; ``optax.scale_by_schedule`` after it scales the
  step.
* ``precondition(guide)``: the preconditioned gradient ``theta - natural_step(theta, g, 1,
  damping, t, ctx)`` (``(F + damping)^-1 g`` for a linear step), signed like a gradient, so
  ``optax.chain(precondition(guide), optax.scale_by_learning_rate(schedule))`` is the step with
  the learning rate applied outside (equal to ``natural_gradient`` when the guide's step is
  linear in ``lr``, as ``MeanFieldGaussian(coords="meanscale")``'s is).

There is no accept test, damping adaptation or iterate averaging: those are ``NGVI``'s. Natural
gradients after Amari (1998); the guides' closed forms cite their own papers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ngvi.errors import ConfigError
from ngvi.guides.base import Guide

__all__ = ["NaturalGradientState", "natural_gradient", "neg_elbo", "precondition"]


class NaturalGradientState(NamedTuple):
    count: jax.Array  # () int32, updates taken: the ``step`` given to ``guide.natural_step``


def natural_gradient(
    guide: Guide, learning_rate: optax.ScalarOrSchedule = 1.0
) -> optax.GradientTransformationExtraArgs:
    """``updates = guide.natural_step(params, grads, lr_t, damping, t, ctx) - params``.

    ``update(grads, state, params, *, damping=0.0, ctx=None)``; ``lr_t = learning_rate(t)`` for
    a schedule. With ``learning_rate=1`` and nothing chained, ``updates`` is exactly
    ``natural_step(params, grads, 1, damping, t, ctx) - params`` (``NGVI``'s unit step).
    """
    _check_guide(guide, "natural_gradient")
    lr_of = _schedule(learning_rate)
    return _transform(guide, "natural_gradient", lambda p, new: _sub(new, p), lr_of)


def precondition(guide: Guide) -> optax.GradientTransformationExtraArgs:
    """``updates = params - guide.natural_step(params, grads, 1, damping, t, ctx)``.

    The natural gradient ``(F + damping)^-1 grads`` in the guide's closed form (for a step
    linear in ``lr``), signed like a gradient: follow it with
    ``optax.scale_by_learning_rate(lr_or_schedule)``.
    """
    _check_guide(guide, "precondition")
    return _transform(guide, "precondition", _sub, lambda count: 1.0)


def _transform(guide, name, output, lr_of) -> optax.GradientTransformationExtraArgs:
    def init(params) -> NaturalGradientState:
        del params
        return NaturalGradientState(jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, *, damping=0.0, ctx=None, **extra_args):
        del extra_args  # meant for other members of an optax.chain
        _check_call(name, grads, params, damping)
        new = guide.natural_step(params, grads, lr_of(state.count), damping, state.count, ctx)
        cast = lambda u, p: u.astype(jnp.result_type(p))  # optax: updates in the params' dtype
        updates = jax.tree.map(cast, output(params, new), params)
        return updates, NaturalGradientState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def neg_elbo(
    guide: Guide, params: Any, rng_key: jax.Array, *args, num_particles: int = 8, **kwargs
) -> jax.Array:
    """``-ELBO = -(mean_k log p(x, z_k) + H[q])``, ``z_k = guide.reparam(params, eps_k)``: the
    engine's estimator (antithetic ``guide.base_noise``), for ``jax.value_and_grad`` in a loop.
    The guide must be set up (``guide.setup(rng_key, args, kwargs)``)."""
    target = guide.target
    k_eps, k_model = jax.random.split(rng_key)
    z = guide.reparam(params, guide.base_noise(k_eps, num_particles))
    model_key = k_model if target.has_subsample else None
    logp = jax.vmap(lambda zi: target.log_density(zi, args, kwargs, model_key))(z)
    return -(jnp.mean(logp) + guide.entropy(params))


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def _schedule(learning_rate: optax.ScalarOrSchedule) -> Callable:
    if callable(learning_rate):
        return learning_rate
    ok = isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool)
    if not (ok and math.isfinite(learning_rate) and learning_rate > 0):
        raise ConfigError(
            "learning_rate must be a positive finite number (1.0 is the unit natural step) or "
            f"an optax schedule (count -> rate), got {learning_rate!r}."
        )
    return lambda count: learning_rate


def _check_guide(guide: Any, name: str) -> None:
    if not isinstance(guide, Guide):
        raise ConfigError(
            f"{name} needs an ngvi guide (e.g. ngvi.MeanFieldGaussian(model)), got "
            f"{type(guide).__name__}."
        )


def _check_call(name: str, grads: Any, params: Any, damping: Any) -> None:
    """Named errors for what would otherwise fail deep inside the guide's step."""
    if params is None:
        raise ConfigError(
            f"{name} needs the current parameters: call tx.update(grads, state, params)."
        )
    if jax.tree.structure(grads) != jax.tree.structure(params):
        raise ConfigError(
            f"{name}: grads and params differ in structure ({jax.tree.structure(grads)} vs "
            f"{jax.tree.structure(params)}): differentiate the loss with respect to params."
        )
    if isinstance(damping, numbers.Real) and not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping!r}.")
