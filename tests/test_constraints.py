"""Every continuous constraint NumPyro offers: a short mean-field NGVI fit keeps its posterior
samples in the support and finite with most steps accepted, and the log-space scoring of
Dirichlet, Beta and Gamma sites (``ngvi.numerics.logspace``) that makes sparse Dirichlets fit in
float32.

Runs in the session's default dtype: float32 in the default run, float64 under
``JAX_ENABLE_X64=1`` (``.ci/run-slow``)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints as C
from numpyro.distributions.transforms import OrderedTransform, biject_to
from numpyro.infer import init_to_uniform
from numpyro.infer.util import potential_energy

from ngvi import NGVI, MeanFieldGaussian
from ngvi.numerics.logspace import stable_potential_energy, stick_breaking_log

Y = np.array([[0.5, -0.3, 1.0], [0.1, 0.4, -0.2], [1.2, 0.8, 0.3], [-0.6, -0.9, 0.1]])


def common_constraints(y):
    """positive, interval, unit interval, simplex, ordered, corr_cholesky and a lower-triangular
    scale (HalfNormal scales times an LKJ Cholesky factor) in one model: one compile."""
    numpyro.sample("positive", dist.Gamma(2.0, 2.0))
    numpyro.sample("interval", dist.Uniform(-1.0, 3.0))
    numpyro.sample("unit_interval", dist.Beta(2.0, 3.0))
    numpyro.sample("simplex", dist.Dirichlet(jnp.ones(4)))
    base = dist.Normal(0.0, 1.0).expand([3]).to_event(1)
    numpyro.sample("ordered", dist.TransformedDistribution(base, OrderedTransform()))
    corr = numpyro.sample("corr_cholesky", dist.LKJCholesky(3, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(3)).to_event(1))
    scale_tril = numpyro.deterministic("scale_tril", sigma[:, None] * corr)
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.MultivariateNormal(0.0, scale_tril=scale_tril), obs=y)


def _improper(name, support, shape, obs):
    x = numpyro.sample(name, dist.ImproperUniform(support, (), shape))
    numpyro.sample(f"{name}_obs", dist.Normal(x, 1.0).to_event(jnp.ndim(x)), obs=obs)


def rare_constraints(y):
    """The rest of ``biject_to``'s registry (constraints without a common prior get an
    ImproperUniform prior and an observation)."""
    numpyro.sample("greater_than", dist.TruncatedNormal(0.0, 1.0, low=0.5))
    numpyro.sample("less_than", dist.TruncatedNormal(0.0, 1.0, high=-0.5))
    numpyro.sample("corr_matrix", dist.LKJ(3, 2.0))
    numpyro.sample("lower_cholesky", dist.WishartCholesky(5.0, scale_tril=jnp.eye(3)))
    numpyro.sample("positive_definite", dist.Wishart(5.0, scale_matrix=jnp.eye(3)))
    numpyro.sample("circular", dist.VonMises(0.0, 2.0))
    numpyro.sample("zero_sum", dist.ZeroSumNormal(1.0, event_shape=(4,)))
    _improper("positive_ordered", C.positive_ordered_vector, (3,), jnp.array([0.5, 1.0, 2.0]))
    _improper("l1_ball", C.l1_ball, (3,), jnp.array([0.2, -0.3, 0.1]))
    _improper("softplus_positive", C.softplus_positive, (), 1.0)
    _improper("scaled_unit_lower_cholesky", C.scaled_unit_lower_cholesky, (2, 2), jnp.eye(2))
    _improper("softplus_lower_cholesky", C.softplus_lower_cholesky, (2, 2), jnp.eye(2))
    common_constraints(y)


def _fit_and_check(model, steps, *args, max_rejected, init_strategy=init_to_uniform):
    guide = MeanFieldGaussian(model, init_strategy=init_strategy)
    r = NGVI(model, guide).run(jax.random.PRNGKey(0), steps, *args, progress_bar=False)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(r.params))
    assert r.num_rejected <= max_rejected * r.num_steps, (r.num_rejected, r.num_steps)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), r.params, sample_shape=(100,))
    for site in guide.target.sites:
        x = draws[site.name]
        assert x.shape == (100,) + site.shape and x.dtype == jnp.result_type(float)
        assert bool(jnp.all(jnp.isfinite(x))), site.name
        assert bool(jnp.all(site.support(x))), (site.name, site.support)
    return guide, r


def test_default_dtype_is_float32_unless_asked():
    """The x64 switch is per module (tests/conftest.py): this module runs in float32 unless the
    whole session asks for float64."""
    want = jnp.float64 if os.environ.get("JAX_ENABLE_X64", "0") not in ("0", "") else jnp.float32
    assert jnp.zeros(()).dtype == want


@pytest.mark.slow  # ~40 s of compiles on the 2-core machine; tests/test_properties.py covers
def test_common_constraints_fit_in_support():  # positive/interval/simplex fits in the default run
    guide, r = _fit_and_check(common_constraints, 150, Y, max_rejected=0.15)
    assert {s.name for s in guide.target.sites} >= {"simplex", "ordered", "corr_cholesky"}


@pytest.mark.slow
def test_every_registered_constraint_fits_in_support():
    """positive_ordered, l1_ball, softplus, circular, zero-sum, Wishart (positive definite and
    lower Cholesky), LKJ correlation matrix, truncated bounds, and the common ones."""
    guide, _ = _fit_and_check(rare_constraints, 200, Y, max_rejected=0.2)
    assert len(guide.target.sites) == 19


def sparse_dirichlet():
    numpyro.sample("p", dist.Dirichlet(0.01 * jnp.ones(50)))


@pytest.mark.slow  # ~20 s; the log-space tests below guard its cause in the default run
def test_sparse_dirichlet_in_float32_accepts_its_steps():
    """Dirichlet(0.01 * ones(50)) puts most components below float32's smallest number, where
    NumPyro's ``log p(x) + log |J|`` is ``inf - inf = NaN``: before ``ngvi.numerics.logspace``
    221-255 of 300 steps were rejected. Scored in log space, (nearly) every step is accepted."""
    with jax.enable_x64(False):
        _, r = _fit_and_check(sparse_dirichlet, 150, max_rejected=0.05)
        assert r.params["loc"].dtype == jnp.float32
        # the fit found the sparse region: most components' unconstrained means far below 0
        assert float(jnp.median(r.params["loc"])) < -20


def test_logspace_scoring_matches_numpyro_and_stays_finite():
    """Where NumPyro's value does not underflow both scorings agree (value and gradient);
    deep in the sparse region ours stays finite and NumPyro's does not."""
    y = jnp.asarray(1.0)

    def model(y):
        a = numpyro.sample("a", dist.Gamma(0.5, 3.0))
        with numpyro.plate("g", 2):
            b = numpyro.sample("b", dist.Beta(0.3, 2.0))
            p = numpyro.sample("p", dist.Dirichlet(jnp.array([0.3, 1.0, 2.0])))
        q = numpyro.sample("q", dist.Dirichlet(jnp.ones((2, 4))).to_event(1))
        numpyro.sample(
            "y", dist.Normal(a + b.sum() + p[..., 0].sum() + q[..., 0].sum(), 1.0), obs=y
        )

    shapes = {"a": (), "b": (2,), "p": (2, 2), "q": (2, 3)}  # unconstrained shapes
    z0, unravel = ravel_pytree({k: jnp.zeros(v) for k, v in shapes.items()})
    z = jax.random.normal(jax.random.PRNGKey(3), z0.shape)

    @jax.jit
    def ours(z):
        return jax.value_and_grad(lambda z: stable_potential_energy(model, (y,), {}, unravel(z)))(z)

    @jax.jit
    def numpyros(z):
        return jax.value_and_grad(lambda z: potential_energy(model, (y,), {}, unravel(z)))(z)

    tol = 1e-5 if z.dtype == jnp.float32 else 1e-12
    (e1, g1), (e2, g2) = ours(z), numpyros(z)
    np.testing.assert_allclose(e1, e2, rtol=tol)
    np.testing.assert_allclose(g1, g2, rtol=tol, atol=tol)
    far = jnp.full_like(z, -1000.0)  # exp(far) is below the smallest float32 and float64
    (e1, g1), (e2, _) = ours(far), numpyros(far)
    assert np.isfinite(e1) and np.all(np.isfinite(g1)) and not np.isfinite(e2)


def test_stick_breaking_log_is_log_of_numpyros_transform():
    u = jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 3.0
    t = biject_to(C.simplex)
    log_x, log_det = jax.jit(stick_breaking_log)(u)
    tol = 1e-5 if u.dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(jnp.exp(log_x), t(u), rtol=tol)
    np.testing.assert_allclose(log_det, t.log_abs_det_jacobian(u, t(u)), rtol=tol)
