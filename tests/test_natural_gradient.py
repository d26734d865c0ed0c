"""The worked numbers of natural-gradient theory, and exactly what is invariant and what is not.

The natural *direction* transforms as a contravariant vector (by the Jacobian) under a smooth
reparameterization, so small natural steps land on the same distribution in any coordinates to
first order in lr; a finite unit step does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ngvi import MeanFieldGaussian

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.x64  # float64 in this module only (tests/conftest.py)

sigmoid = jax.nn.sigmoid


def bernoulli_fisher_logit(theta):
    """Exact E[s s^T] of Bernoulli(sigmoid(theta)) by summing over y in {0, 1}."""

    def score(y):
        return jax.grad(lambda t: y * jax.nn.log_sigmoid(t) + (1 - y) * jax.nn.log_sigmoid(-t))(
            theta
        )

    p = sigmoid(theta)
    return p * score(1.0) ** 2 + (1 - p) * score(0.0) ** 2


def test_bernoulli_worked_example_plain_vs_natural_step():
    loss = lambda t: -jax.nn.log_sigmoid(t)
    theta0, lr = 0.0, 1.0
    g = jax.grad(loss)(theta0)
    fisher = bernoulli_fisher_logit(theta0)
    assert np.isclose(g, -0.5) and np.isclose(fisher, 0.25)
    plain = theta0 - lr * g
    natural = theta0 - lr * g / fisher
    assert np.isclose(plain, 0.5) and np.isclose(sigmoid(plain), 0.622, atol=5e-4)
    assert np.isclose(natural, 2.0) and np.isclose(sigmoid(natural), 0.881, atol=5e-4)


def test_unit_natural_step_is_not_invariant_but_the_direction_is():
    """In probability coordinates p the unit natural step from p=0.5 lands on p=1 (the boundary),
    not on sigmoid(2)=0.881; the directions agree through the Jacobian dp/dtheta."""
    p0, theta0 = 0.5, 0.0
    g_p = jax.grad(lambda p: -jnp.log(p))(p0)
    fisher_p = 1.0 / (p0 * (1 - p0))
    nat_p = g_p / fisher_p
    assert np.isclose(p0 - nat_p, 1.0)
    nat_theta = jax.grad(lambda t: -jax.nn.log_sigmoid(t))(theta0) / bernoulli_fisher_logit(theta0)
    jac = jax.grad(sigmoid)(theta0)  # dp/dtheta
    assert np.isclose(nat_p, jac * nat_theta)
    assert not np.isclose(sigmoid(theta0 - nat_theta), p0 - nat_p, atol=0.1)


def test_small_natural_steps_agree_to_first_order_plain_steps_do_not():
    p0, theta0 = 0.5, 0.0
    for lr in (1e-2, 1e-3):
        nat_theta = -0.5 / 0.25
        nat_p = (-1 / p0) * p0 * (1 - p0)
        via_theta = sigmoid(theta0 - lr * nat_theta)
        via_p = p0 - lr * nat_p
        assert abs(via_theta - via_p) < 2 * lr**2  # second order in lr
        plain_theta = sigmoid(theta0 - lr * (-0.5))
        plain_p = p0 - lr * (-1 / p0)
        assert abs(plain_theta - plain_p) > lr  # first order: a different distribution


def test_bivariate_gaussian_natural_direction():
    sigma = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    y = jnp.array([1.0, 2.0])
    g = jax.grad(lambda mu: 0.5 * jnp.sum((mu - y) ** 2))(jnp.zeros(2))
    fisher = jnp.linalg.inv(sigma)  # Fisher of N(mu, Sigma) in mu
    nat = jnp.linalg.solve(fisher, g)
    np.testing.assert_allclose(g, [-1.0, -2.0])
    np.testing.assert_allclose(nat, [-4.0, -5.0], atol=1e-12)


# -- reparameterization invariance of the natural gradient, as a property ---------------------
K = 4  # categorical with minimal logits theta in R^3 (class 0 is the reference)


def log_q(theta, x):
    logits = jnp.concatenate([jnp.zeros(1), theta])
    return jax.nn.log_softmax(logits)[x]


def exact_fisher(log_q_fn, param):
    """E[s s^T] summed exactly over the K outcomes."""
    scores = jnp.stack([jax.grad(log_q_fn)(param, x) for x in range(K)])
    probs = jnp.exp(jnp.stack([log_q_fn(param, x) for x in range(K)]))
    return jnp.einsum("k,ki,kj->ij", probs, scores, scores)


@jax.jit
def _nat_grads(A, b, theta, target):
    """(natgrad in phi coords, J natgrad in theta coords, plain grad in phi, J^-T-free plain)."""

    def g(t):
        return A @ jnp.sinh(t) + b

    def g_inv(phi):
        return jnp.arcsinh(jnp.linalg.solve(A, phi - b))

    def loss_theta(t):  # KL(target || q_theta) up to a constant
        return -jnp.sum(target * jax.nn.log_softmax(jnp.concatenate([jnp.zeros(1), t])))

    phi = g(theta)
    nat_theta = jnp.linalg.solve(exact_fisher(log_q, theta), jax.grad(loss_theta)(theta))
    fisher_phi = exact_fisher(lambda p, x: log_q(g_inv(p), x), phi)
    plain_phi = jax.grad(lambda p: loss_theta(g_inv(p)))(phi)
    nat_phi = jnp.linalg.solve(fisher_phi, plain_phi)
    J = jax.jacfwd(g)(theta)
    return nat_phi, J @ nat_theta, plain_phi, J @ jax.grad(loss_theta)(theta)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_natural_gradient_transforms_by_the_jacobian(seed):
    """phi = g(theta) = A sinh(theta) + b: natgrad_phi = J natgrad_theta, while the plain
    gradient does not transform that way, so plain steps differ between coordinates."""
    rng = np.random.default_rng(seed)
    A = jnp.asarray(rng.normal(size=(3, 3)) + 2.5 * np.eye(3))
    b = jnp.asarray(rng.normal(size=3))
    theta = jnp.asarray(rng.normal(size=3))
    target = jnp.asarray(rng.dirichlet(np.ones(K)))
    nat_phi, j_nat_theta, plain_phi, j_plain_theta = _nat_grads(A, b, theta, target)
    np.testing.assert_allclose(nat_phi, j_nat_theta, rtol=1e-7, atol=1e-9)
    assert not np.allclose(plain_phi, j_plain_theta, rtol=1e-3)


# -- the mean-field Gaussian's closed-form Fisher against autodiff ----------------------------
def test_meanfield_fisher_matches_autodiff_and_inverse():
    key = jax.random.PRNGKey(0)
    loc, scale = jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 1.3, 2.0])
    params = {"loc": loc, "scale": scale}

    def logq(theta, z):
        m, s = theta[:3], theta[3:]
        return jnp.sum(-0.5 * ((z - m) / s) ** 2 - jnp.log(s) - 0.5 * jnp.log(2 * jnp.pi))

    theta = jnp.concatenate([loc, scale])
    z = loc + scale * jax.random.normal(key, (200_000, 3))
    scores = jax.vmap(jax.grad(logq), (None, 0))(theta, z)
    fisher_mc = scores.T @ scores / z.shape[0]
    hess = jax.vmap(jax.hessian(logq), (None, 0))(theta, z[:20_000]).mean(0)
    closed = MeanFieldGaussian.fisher(params)
    dense = jnp.diag(jnp.concatenate([closed["loc"], closed["scale"]]))
    np.testing.assert_allclose(fisher_mc, dense, atol=0.03 * float(dense.max()))
    np.testing.assert_allclose(-hess, dense, atol=0.03 * float(dense.max()))
    v = {"loc": jnp.ones(3), "scale": jnp.arange(1.0, 4.0)}
    fv = {k: closed[k] * v[k] for k in v}
    back = MeanFieldGaussian.fisher_inverse(params, fv)
    for k in v:
        np.testing.assert_allclose(back[k], v[k], rtol=1e-12)
    damped = MeanFieldGaussian.fisher_inverse(params, v, damping=1e8)
    np.testing.assert_allclose(1e8 * damped["loc"], v["loc"], rtol=1e-6)
