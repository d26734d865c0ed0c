"""Minibatch training of Bayesian neural networks over epochs, for NGVI engines and NumPyro SVI.

``fit_bnn`` runs each epoch as one compiled ``lax.scan`` over its shuffled minibatches (the
engine's ``update`` traced once, no host round trip per step), evaluates the Monte Carlo
predictive on held-out data and shows loss and accuracy on a tqdm bar.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ngvi.engine.infer import NGVI
from ngvi.errors import ConfigError
from ngvi.guides.base import Guide
from ngvi.nn.metrics import evaluate_bnn

__all__ = ["FitResult", "bnn_engine", "fit_bnn", "minibatches"]


class FitResult(NamedTuple):
    state: Any  # NGVIState or numpyro SVIState
    params: Any  # the fit to predict with (NGVI: averaged iterate)
    losses: np.ndarray  # (epochs,) mean minibatch loss per epoch
    epoch_times: np.ndarray  # (epochs,) seconds of the compiled epoch (the first compiles)
    history: list  # per-epoch Metrics on the evaluation data


def minibatches(n: int, batch_size: int, rng: np.random.Generator):
    """Index arrays of one epoch: a fresh permutation cut into full batches (the rest dropped,
    so every step has the same shape and one compiled step serves the run)."""
    perm = rng.permutation(n)
    for i in range(n // batch_size):
        yield jnp.asarray(perm[i * batch_size : (i + 1) * batch_size])


def bnn_engine(guide: Guide, **kwargs):
    """``NGVI(guide.model, guide, **kwargs)``: the guide's own engine defaults
    (``Guide.engine_defaults``; ``KFACGuide``: ``lr=0.1``, one weight sample per step, the
    settings of minibatch BNN training) unless ``kwargs`` override them."""
    return NGVI(guide.model, guide, **kwargs)


def _driver(engine):
    """(engine, init, update, get_params, sampler) for an NGVI engine or a NumPyro SVI object."""
    from numpyro.infer import SVI

    if isinstance(engine, Guide):
        engine = bnn_engine(engine)
    if isinstance(engine, NGVI):
        guide = engine.guide
        return engine, engine.init, engine.update, engine.get_params, guide.sample_posterior
    if isinstance(engine, SVI):  # jitted init: NumPyro's eager setup compiles op by op
        init = jax.jit(engine.init)
        return engine, init, engine.update, engine.get_params, engine.guide.sample_posterior
    raise ConfigError(f"fit_bnn needs an NGVI engine, ngvi guide or numpyro SVI, got {engine!r}")


def _epoch_fn(update):
    """One compiled epoch: ``lax.scan`` of ``update(state, X, y=y, batch_idx=idx)`` over the
    rows of ``idx`` (steps, B); returns the state and the summed loss."""

    def epoch(state, X, y, idx):
        def body(s, i):
            s, loss = update(s, X, y=y, batch_idx=i)
            return s, loss

        state, losses = lax.scan(body, state, idx)
        return state, jnp.sum(losses)

    return jax.jit(epoch)


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
    batch_idx=idx)`` per batch.

    ``engine`` is an ``NGVI`` (a bare ngvi guide gets ``bnn_engine(guide)``) or a NumPyro ``SVI``
    (ADVI, MAP with ``AutoDelta``). Each epoch is one compiled scan over its minibatches. With
    ``eval_data=(X_test, y_test)`` the predictive metrics are computed every ``eval_every`` epochs
    and shown with the loss on a tqdm bar.

    The model contract: ``model(X, y=None, batch_idx=None)``.

    * Training calls ``model(X, y=y, batch_idx=idx)`` with the *whole* ``X`` (N, ...) and ``y``
      (N, ...) and ``idx`` an int array of ``batch_size`` rows (the same length every step, so
      one compiled step serves the run). The model uses the rows ``X[idx]``, ``y[idx]`` and
      scales their log-likelihood by ``N / B`` so the ELBO estimates the full-data one:
      ``ngvi.nn.data_plate(N, None, batch_idx)`` does that.
    * Evaluation calls ``model(X_test, y=y_test)`` (``batch_idx`` left at ``None``: every row);
      the first observed site is the predictive (``Categorical`` logits give accuracy and
      calibration, any other distribution its mean for the RMSE).

    A minimal classifier (``ngvi.nn.dense`` declares the layers a ``KFACGuide`` sees)::

        import jax
        import numpyro
        import numpyro.distributions as dist
        from ngvi.nn import data_plate, dense

        def model(X, y=None, batch_idx=None):
            n = X.shape[0]
            if batch_idx is not None:  # this step's rows
                X, y = X[batch_idx], None if y is None else y[batch_idx]
            h = jax.nn.relu(dense("hidden", X, 32))
            logits = dense("out", h, 10)
            with data_plate(n, None, batch_idx):  # log-likelihood times N / B
                numpyro.sample("y", dist.Categorical(logits=logits), obs=y)

        res = fit_bnn(ngvi.KFACGuide(model), X, y, epochs=10, batch_size=128,
                      eval_data=(X_test, y_test))

    ``ngvi.nn.minibatch`` adds NumPyro's random subsampling (``subsample_size``) to this; the
    bundled ``bnn_classifier`` and ``bnn_regressor`` models follow the same contract.
    """
    if not (isinstance(batch_size, int) and 1 <= batch_size <= X.shape[0]):
        raise ConfigError(
            f"batch_size must be an integer in [1, {X.shape[0]}] (the rows of X), got "
            f"{batch_size!r}."
        )
    engine, init, update, get_params, sampler = _driver(engine)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    k_init, k_eval = jax.random.split(rng_key)
    rng = np.random.default_rng(int(jax.random.randint(k_init, (), 0, 2**31 - 1)))
    if state is None:
        state = init(k_init, X, y=y, batch_idx=jnp.arange(batch_size))
    draw = jax.jit(lambda k, p: sampler(k, p, sample_shape=(num_samples,)))
    run_epoch = _epoch_fn(update)
    bar = _epoch_bar(epochs, progress_bar)
    losses, times, history = [], [], []
    for epoch in range(epochs):
        idx = jax.block_until_ready(jnp.stack(list(minibatches(X.shape[0], batch_size, rng))))
        t0 = time.perf_counter()  # the epoch's compute only: building idx took ~2 ms on the host
        state, total = run_epoch(state, X, y, idx)
        losses.append(float(total) / idx.shape[0])  # float() blocks: the epoch is done
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
