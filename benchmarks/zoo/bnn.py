"""Small Bayesian neural networks with one tanh hidden layer, built with ``ngvi.nn.dense``
(``models/bnn_classifier.py``'s contract: ``model(X, y=None, subsample_size=None,
batch_idx=None)``, ``minibatch`` and ``data_plate``), so ``KFACGuide`` sees their layers."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from benchmarks.zoo._data import rng, to_jax
from benchmarks.zoo.registry import register
from ngvi.nn import data_plate, dense, minibatch


@functools.lru_cache(maxsize=1)
def _moons_np():
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=200, noise=0.2, random_state=0)
    return (X - X.mean(0)) / X.std(0), y.astype(np.int32)


def bnn_moons(X, y=None, subsample_size=None, batch_idx=None, hidden=8):
    """W ~ N(0, 1) everywhere; y ~ Bernoulli(logit tanh(X W1 + b1) W2 + b2): 2-8-1."""
    xb, yb = minibatch(X, y, subsample_size, batch_idx)
    h = jnp.tanh(dense("hidden", xb, hidden))
    logits = dense("out", h, 1)[..., 0]
    with data_plate(X.shape[0], xb.shape[0], batch_idx):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=yb)


def _moons_data():
    X, y = _moons_np()
    return to_jax((X,), {"y": y})


@functools.lru_cache(maxsize=1)
def _sine_np(n=100):
    r = rng(61)
    x = r.uniform(-3, 3, (n, 1))
    return x, np.sin(x[:, 0]) + 0.2 * r.standard_normal(n)


def bnn_sine(X, y=None, subsample_size=None, batch_idx=None, hidden=16):
    """1-16-1 tanh regression: y ~ N(tanh(X W1 + b1) W2 + b2, sigma), sigma ~ HalfNormal(1)."""
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    xb, yb = minibatch(X, y, subsample_size, batch_idx)
    h = jnp.tanh(dense("hidden", xb, hidden))
    mean = dense("out", h, 1)[..., 0]
    with data_plate(X.shape[0], xb.shape[0], batch_idx):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=yb)


def _sine_data():
    X, y = _sine_np()
    return to_jax((X,), {"y": y})


register(
    "bnn_moons",
    bnn_moons,
    _moons_data,
    33,
    "BNN",
    expfam=False,
    layers=True,
    multimodal=True,
    note="scikit-learn make_moons, 200 rows",
)
register(
    "bnn_sine",
    bnn_sine,
    _sine_data,
    50,
    "BNN",
    expfam=True,
    layers=True,
    multimodal=True,
    note="100 noisy samples of sin(x)",
)
