"""FullRankGaussian in float32 (JAX's default) on a near-singular posterior: the precision update
keeps a positive-definite Cholesky factor, and a fit on a collinear design warns with the cause
and the fix instead of failing with an unexplained FitError."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from ngvi import NGVI
from ngvi.guides.fullrank import (
    FullRankGaussian,
    NearSingularWarning,
    ibr_precision,
    jittered_cholesky,
)

pytestmark = pytest.mark.float32  # float32 even in the float64 run (tests/conftest.py)

KEY = jax.random.PRNGKey(0)


def test_whitened_update_survives_a_condition_number_beyond_one_over_eps():
    """S = [[1e5 + 1e-4, 1e5], [1e5, 1e5 + 1e-4]] (two identical predictors under a N(0, 100)
    prior: condition number 2e9 > 1 / eps = 8e6). Its Cholesky factor is exact in float32, but
    S itself rounds to a singular matrix, so S + b (H - S) had no Cholesky factor even for H = S.
    The update in the factor's whitened coordinates returns L for H = S and stays positive
    definite for an H whose weakest curvature rounding removed."""
    s64 = np.array([[1e5 + 1e-4, 1e5], [1e5, 1e5 + 1e-4]])
    tril = jnp.asarray(np.linalg.cholesky(s64), jnp.float32)
    h = tril @ tril.T  # S in float32: its 1e-4 eigenvalue is lost to rounding
    assert not bool(jnp.all(jnp.isfinite(jnp.linalg.cholesky(h + 0.5 * (h - h)))))
    for b in (0.1, 1.0):
        new, jitter = ibr_precision(tril, h, b)
        assert bool(jnp.all(jnp.isfinite(new))) and bool(jnp.all(jnp.diagonal(new) > 0))
        assert float(jitter) == 0.0
    np.testing.assert_allclose(ibr_precision(tril, h, 0.1)[0], tril, rtol=1e-3, atol=1e-3)


def test_jittered_cholesky_keeps_a_float32_factor_under_x64():
    """A float32 matrix whose Cholesky needs jitter, with float64 switched on for the process:
    the retries' jitter ``eps 10^j`` is in the matrix's dtype, so the factor stays float32 (a
    Python ``10.0 ** j`` of a traced int is float64 there: the loop raised a TypeError)."""
    singular = jnp.asarray([[1.0, 1.0], [1.0, 1.0]], jnp.float32)
    with jax.enable_x64(True):
        chol, tau = jax.jit(jittered_cholesky)(singular, jnp.full((2, 2), jnp.nan, jnp.float32))
    assert chol.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(chol)))
    assert 0.0 < float(tau) < 1e-3
    np.testing.assert_allclose(chol @ chol.T, singular, atol=1e-3)


def collinear(X, y=None):
    """Linear regression with two identical columns: w ~ N(0, 100) (3), b ~ N(0, 100),
    sigma ~ HalfNormal(1), y ~ N(X w + b, sigma)."""
    w = numpyro.sample("w", dist.Normal(0.0, 100.0).expand([X.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 100.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(X @ w + b, sigma), obs=y)


def _collinear_data(n=1000):
    rng = np.random.default_rng(0)
    x, x2 = rng.normal(size=n), rng.normal(size=n)
    y = 1.0 + 2.0 * x - 1.0 * x2 + 0.1 * rng.normal(size=n)
    return np.stack([x, x, x2], 1), y


def test_collinear_design_fits_in_float32_and_names_the_cause():
    """Before: FitError after ~180 steps (50 non-finite proposals, damping 1e33), no cause named.
    Now: the run ends, every iterate's precision factor is finite with a positive diagonal, the
    identified directions (w1 + w2, w3, b) match least squares on the reduced design, and a
    NearSingularWarning names the near-singular posterior and the fix (float64)."""
    X, y = _collinear_data()
    guide = FullRankGaussian(collinear)
    engine = NGVI(collinear, guide)
    with pytest.warns(NearSingularWarning, match="collinear predictors.*float64"):
        result = engine.run(KEY, 200, jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32))
        jax.effects_barrier()
    tril = result.state.params["prec_tril"]
    assert bool(jnp.all(jnp.isfinite(tril))) and bool(jnp.all(jnp.diagonal(tril) > 0))
    assert bool(jnp.all(jnp.isfinite(result.losses)))
    ols = np.linalg.lstsq(np.stack([X[:, 0], X[:, 2], np.ones(len(y))], 1), y, rcond=None)[0]
    loc = guide.constrain(result.params["loc"])
    w, b = np.asarray(loc["w"]), float(loc["b"])
    np.testing.assert_allclose([w[0] + w[1], w[2], b], ols, atol=0.02)


_LGCP_FIT = """
import jax
from benchmarks.zoo import REGISTRY
import ngvi
entry = REGISTRY["lgcp"]
args, kwargs = entry.data()
guide = ngvi.FullRankGaussian(entry.model)
result = ngvi.NGVI(entry.model, guide).run(
    jax.random.PRNGKey(0), 5000, *args, progress_bar=False, **kwargs
)
print("steps", result.num_steps)
"""


@pytest.mark.slow  # ~30 s on two idle cores; a frozen fit costs the timeout
def test_full_rank_fit_does_not_wedge_xla_cpu():
    """The zoo's log-Gaussian Cox process (a 40-cell MVN field) with FullRankGaussian in float32
    froze for good in 3 of 3 runs on two cores (every XLA:CPU thread idle, the run waiting on
    them) while the accept test's draws, a triangular solve, ran inside ``step.unfused``'s
    conditional, and in 2 of 3 without that but with XLA's multi-threaded Eigen kernels; draws
    through a solve are no longer put there (``Guide.elementwise_draws``) and importing ngvi
    turns multi-threaded Eigen off (``ngvi/__init__.py``): 8 of 8 runs finished. The fit runs in
    its own process, with a timeout, since a frozen one never returns."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _LGCP_FIT], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "steps" in out.stdout, out.stderr[-2000:]
