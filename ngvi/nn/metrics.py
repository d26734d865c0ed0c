"""Predictive quality of a Bayesian neural network on held-out data: Monte Carlo NLL, accuracy,
expected calibration error (Guo et al. 2017) and RMSE over weight samples."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.handlers import seed, substitute, trace

__all__ = ["Metrics", "evaluate_bnn", "expected_calibration_error"]


class Metrics(NamedTuple):
    """Predictive quality on held-out data (Monte Carlo over weight samples)."""

    nll: float  # -mean_n log (1/S sum_s p(y_n | x_n, w_s))
    accuracy: float  # classification only (NaN otherwise)
    ece: float  # expected calibration error, 15 equal-width confidence bins (classification)
    rmse: float  # regression only (NaN otherwise)


_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)
_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)


def _observed(model, sample: dict, X, y):
    """Log-likelihood per example and the predictive mean (class probabilities, a Bernoulli's as
    two classes, or the mean) of the model's first observed site, for one weight sample."""
    tr = trace(substitute(seed(model, 0), data=sample)).get_trace(X, y=y)
    site = next(s for s in tr.values() if s["type"] == "sample" and s["is_observed"])
    fn = site["fn"]
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    if isinstance(fn, _BERNOULLI):  # two classes: probabilities (1 - p, p)
        out = jnp.stack([1.0 - fn.probs, fn.probs], axis=-1)
    else:
        out = fn.probs if isinstance(fn, _CATEGORICAL) else fn.mean
    classes = isinstance(fn, _CATEGORICAL + _BERNOULLI)
    return fn.log_prob(site["value"]), out, jnp.asarray(classes)


@functools.lru_cache(maxsize=16)
def _predictor(model: Callable):
    return jax.jit(jax.vmap(lambda s, X, y: _observed(model, s, X, y), in_axes=(0, None, None)))


def evaluate_bnn(model, samples: dict, X: jax.Array, y: jax.Array, bins: int = 15) -> Metrics:
    """Test metrics of the Monte Carlo predictive ``p(y | x) ~ 1/S sum_s p(y | x, w_s)``;
    ``samples`` maps latent site names to (S, ...) draws (``sample_posterior``)."""
    S = next(iter(samples.values())).shape[0]
    logp, out, categorical = _predictor(model)(samples, X, y)
    nll = -float(jnp.mean(jax.nn.logsumexp(logp, axis=0) - math.log(S)))
    mean = jnp.mean(out, axis=0)
    if not bool(categorical[0]):
        return Metrics(nll, math.nan, math.nan, float(jnp.sqrt(jnp.mean((mean - y) ** 2))))
    acc = float(jnp.mean(jnp.argmax(mean, -1) == y))
    return Metrics(nll, acc, expected_calibration_error(mean, y, bins), math.nan)


def expected_calibration_error(probs: jax.Array, y: jax.Array, bins: int = 15) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - confidence_b| over equal-width confidence bins
    (Guo et al. 2017)."""
    conf = np.asarray(jnp.max(probs, -1))
    correct = np.asarray(jnp.argmax(probs, -1) == y, dtype=float)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)
