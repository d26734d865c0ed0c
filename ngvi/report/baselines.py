"""Baselines on the same model and data: ADVI (NumPyro SVI + AutoNormal + optax Adam) and NUTS.

``advi`` returns the same fields as ``NGVI.run`` (``params``, ``state``, ``losses``,
``num_steps``) so the two compare line by line; ``advi_flat`` maps its AutoNormal parameters onto
the flat unconstrained layout of ngvi's ``Target`` so both are scored by one function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from ngvi.errors import ConfigError
from ngvi.model.target import Target

__all__ = ["ADVIResult", "advi", "advi_flat", "nuts"]


class ADVIResult(NamedTuple):
    params: dict  # NumPyro param-store values (constrained)
    state: Any  # numpyro SVIState, pass back as init_state to continue
    losses: jax.Array  # (num_steps,) negative ELBO per step
    num_steps: int
    guide: Any
    svi: SVI


def advi(
    model: Callable,
    *args,
    num_steps: int = 5000,
    lr: float = 0.01,
    num_particles: int = 1,
    rng_key: jax.Array | None = None,
    guide: str = "meanfield",
    init_scale: float = 0.1,
    init_state: Any = None,
    progress_bar: bool = True,
    svi: SVI | None = None,
    **kwargs,
) -> ADVIResult:
    """ADVI as NumPyro users run it: ``SVI(model, AutoNormal(model), optax.adam(lr),
    Trace_ELBO(num_particles))`` (``guide="fullrank"`` gives AutoMultivariateNormal).

    Pass ``svi`` and ``init_state`` from a previous result to continue a run without
    recompiling."""
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr!r}.")
    if svi is None:
        if guide not in ("meanfield", "fullrank"):
            raise ConfigError(f"guide must be 'meanfield' or 'fullrank', got {guide!r}.")
        auto = AutoNormal if guide == "meanfield" else AutoMultivariateNormal
        svi = SVI(
            model,
            auto(model, init_scale=init_scale),
            optax.adam(lr),
            Trace_ELBO(num_particles=num_particles),
        )
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    res = svi.run(
        rng_key, num_steps, *args, progress_bar=progress_bar, init_state=init_state, **kwargs
    )
    return ADVIResult(res.params, res.state, res.losses, num_steps, svi.guide, svi)


def advi_flat(target: Target, params: dict) -> tuple[jax.Array, jax.Array]:
    """AutoNormal params -> (loc, scale) flat vectors in the Target's site order."""
    loc, _ = ravel_pytree({s.name: params[f"{s.name}_auto_loc"] for s in target.sites})
    scale, _ = ravel_pytree({s.name: params[f"{s.name}_auto_scale"] for s in target.sites})
    return jnp.asarray(loc), jnp.asarray(scale)


def nuts(
    model: Callable,
    *args,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    rng_key: jax.Array | None = None,
    target_accept_prob: float = 0.9,
    progress_bar: bool = False,
    **kwargs,
) -> MCMC:
    """NumPyro NUTS with several chains (run one after another on a CPU); returns the MCMC
    object (``get_samples()``, and ``arviz.from_numpyro`` for R-hat and ESS)."""
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    mcmc = MCMC(
        NUTS(model, target_accept_prob=target_accept_prob),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential",
        progress_bar=progress_bar,
    )
    mcmc.run(rng_key, *args, **kwargs)
    return mcmc
