"""Bad input gets an error naming the site or argument, the value and the fix; faults during a
fit (overflow, a failed Cholesky) reject the step, keep the last good state and raise the
damping; K rejections in a row raise FitError with that state; Ctrl-C keeps the fit; a fit is
deterministic. (NaN/inf and out-of-support data, discrete/improper/no latent sites, a NaN log
density, NaN steps and NGVI's own hyperparameters are tested in tests/test_infer.py.)

Runs in the session's default dtype (float32 unless ``JAX_ENABLE_X64=1``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import init_to_value

from ngvi import (
    NGVI,
    ConfigError,
    DataError,
    ExpFamilyGuide,
    FitError,
    FullRankGaussian,
    KFACGuide,
    MeanFieldGaussian,
    ModelError,
)

KEY = jax.random.PRNGKey(0)


def _same(a, b) -> bool:
    """Bitwise equal pytrees (a NaN equal to a NaN: the check's fields without ``tol``)."""
    eq = lambda x, y: np.array_equal(x, y, equal_nan=np.issubdtype(np.asarray(x).dtype, np.inexact))
    return all(eq(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- shapes of the data ------------------------------------------------------------------------
def plate8(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", 8):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def vector3(y):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


@pytest.mark.parametrize(
    "model,shape,match",
    [
        (plate8, (10,), r"'y' has data of shape \(10,\) but its Normal .* shape \(8,\).*plate"),
        (vector3, (4,), r"'y' has data of shape \(4,\) .* shape \(3,\).*do not broadcast"),
        (vector3, (4, 1), r"'y' .* \(4, 1\) .* broadcast to \(4, 3\) and count each .* 3 times"),
    ],
)
def test_data_shape_mismatch_names_site_and_shapes(model, shape, match):
    """A plate or event shape that disagrees with the data is an error; so is data that would
    be broadcast up and scored several times (NumPyro would do so silently)."""
    with pytest.raises(DataError, match=match):
        MeanFieldGaussian(model).setup(KEY, (jnp.ones(shape),))


def test_data_with_extra_leading_dims_is_allowed():
    """Data larger than its distribution on the left is an ordinary NumPyro pattern."""
    target = MeanFieldGaussian(plate8).setup(KEY, (jnp.ones((2, 8)),))
    assert target.dim == 1


def _scaled_normal(sigma, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


@pytest.mark.parametrize(
    "sigma,match",
    [
        (0.0, r"site 'y': its Normal distribution got scale = 0\.0, outside .*Positive"),
        (jnp.array([1.0, -2.0, 1.0]), r"site 'y': .* scale = -2\.0 at index \(1,\), outside"),
    ],
)
def test_invalid_distribution_parameter_names_site_value_and_fix(sigma, match):
    """NumPyro's own message ("Normal distribution got invalid scale parameter") names neither
    the site nor the value; ngvi's names both and the fix."""
    with pytest.raises(ModelError, match=match) as err:
        MeanFieldGaussian(_scaled_normal).setup(KEY, (sigma, jnp.ones(3)))
    assert "softplus" in str(err.value)


def test_invalid_parameter_in_a_bnn_model_names_the_site():
    """KFACGuide lays the model out with one compiled trace (``fast_target``): same message."""
    from ngvi.nn import dense

    def bnn(X, y):
        h = dense("l0", X, 2)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(h[:, 0], 0.0), obs=y)

    with pytest.raises(ModelError, match=r"site 'y': its Normal distribution got scale = 0\.0 at"):
        KFACGuide(bnn).setup(KEY, (jnp.ones((4, 3)), jnp.zeros(4)))


def test_data_plate_with_given_rows_and_no_size_scales_by_n_over_b():
    """``data_plate(N, None, idx)`` is a plate over the rows of ``idx`` scaled by N / len(idx),
    as NumPyro's trace shows it; a size that contradicts ``idx`` is an error."""
    from ngvi.nn import data_plate

    y = jnp.arange(10.0)

    def model(batch_idx, size=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with data_plate(10, size, batch_idx):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[batch_idx])

    idx = jnp.array([1, 4, 7, 8])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(idx)
    assert tr["data"]["args"][0] == 4 and tr["y"]["scale"] == pytest.approx(10 / 4)
    assert tr["y"]["fn"].batch_shape == (4,)
    with pytest.raises(ConfigError, match=r"size=3 but batch_idx holds 4 rows"):
        numpyro.handlers.seed(model, 0)(idx, size=3)


# -- guide options -------------------------------------------------------------------------------
def two_sites():
    numpyro.sample("a", dist.Normal(0.0, 1.0))
    numpyro.sample("b", dist.HalfNormal(1.0))


@pytest.mark.parametrize("option", ["families", "estimator"])
def test_unknown_site_in_per_site_options_names_the_sites(option):
    """ExpFamilyGuide's ``families`` and ``estimator`` dicts are the per-site options of ngvi's
    guides (the others take none)."""
    value = {"families": "gamma", "estimator": "pathwise"}[option]
    guide = ExpFamilyGuide(two_sites, **{option: {"c": value}})
    with pytest.raises(ConfigError, match=rf"{option} names site\(s\) \['c'\] .*\['a', 'b'\]"):
        guide.setup(KEY)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "guide,kw,match",
    [
        *[
            (g, {"init_scale": v}, "init_scale must be a positive finite number")
            for g in (MeanFieldGaussian, FullRankGaussian, ExpFamilyGuide, KFACGuide)
            for v in (0.0, -1.0, NAN, INF, "0.1")
        ],
        (MeanFieldGaussian, {"coords": "polar"}, "coords must be 'natural' or 'meanscale'"),
        (MeanFieldGaussian, {"precision_schedule": 0.5}, "precision_schedule must be .*call"),
        (FullRankGaussian, {"precision_schedule": 0.5}, "precision_schedule must be .*call"),
        (FullRankGaussian, {"hessian": "bfgs"}, "hessian must be one of"),
        (ExpFamilyGuide, {"estimator": "reinforce"}, "estimator must be one of"),
        (ExpFamilyGuide, {"estimator": {"a": "rf"}}, "estimator for site 'a' must be one of"),
        (ExpFamilyGuide, {"families": ["a"]}, r"families must be a dict"),
        (ExpFamilyGuide, {"families": {"a": "wishart"}}, "unknown family 'wishart'"),
        (KFACGuide, {"structure": "block"}, "structure must be 'kfac' or 'diagonal'"),
        (KFACGuide, {"fisher": "fake"}, "fisher must be 'true' or 'empirical'"),
        (KFACGuide, {"inverse_every": 0}, "inverse_every must be an integer >= 1"),
        (KFACGuide, {"stat_decay": 0.0}, r"stat_decay must be in \(0, 1\]"),
        (KFACGuide, {"stat_decay": "fast"}, r"stat_decay must be in \(0, 1\]"),
        (KFACGuide, {"num_data": 0}, "num_data must be None or an integer >= 1"),
        (KFACGuide, {"stats_batch": 0}, "stats_batch must be None or an integer >= 1"),
        *[
            (g, {"init_strategy": "median"}, "init_strategy must be None or a callable")
            for g in (MeanFieldGaussian, FullRankGaussian, ExpFamilyGuide, KFACGuide)
        ],
    ],
)
def test_invalid_guide_hyperparameters_raise_at_construction(guide, kw, match):
    with pytest.raises(ConfigError, match=match):
        guide(two_sites, **kw)


def test_guide_for_another_model_names_both_models():
    def model_a():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    def model_b():
        numpyro.sample("b", dist.Normal(0.0, 1.0))

    with pytest.raises(ConfigError, match=r"MeanFieldGaussian .*'.*model_a'.*'.*model_b'"):
        NGVI(model_b, MeanFieldGaussian(model_a))


def test_guide_set_up_for_other_data_shapes_refuses_a_new_layout():
    """One guide object, the same model function, data that change the latent layout."""

    def model(y):
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    guide = MeanFieldGaussian(model)
    guide.setup(KEY, (jnp.ones(3),))
    with pytest.raises(ModelError, match=r"set up for .*z\(3,\).* now given .*z\(4,\).*new guide"):
        guide.setup(KEY, (jnp.ones(4),))

    engine = NGVI(model, MeanFieldGaussian(model))
    state = engine.init(KEY, jnp.ones(3))
    state, _ = engine.update(state, jnp.zeros(3))  # same shapes: no new set-up, no error
    for call in (engine.update, engine.evaluate):
        with pytest.raises(ModelError, match=r"now given .*z\(4,\).*new guide"):
            call(state, jnp.ones(4))


# -- faults during a fit -----------------------------------------------------------------------
def _log_max() -> float:
    return math.log(jnp.finfo(jnp.result_type(float)).max)


def overflow_model():
    """Posterior near z = M + log 2M (M = log of the largest float), behind the wall
    exp(z - M), which overflows to inf beyond z = 2M; the unit natural step from 0 lands on
    z = 3M, in the overflow."""
    m = _log_max()
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.factor("pull", 3.0 * m * z)
    numpyro.factor("wall", -jnp.exp(z - m))


def test_float_overflow_is_rejected_and_the_fit_recovers():
    guide = MeanFieldGaussian(
        overflow_model, init_scale=1.0, init_strategy=init_to_value(values={"z": 0.0})
    )
    r = NGVI(overflow_model, guide).run(KEY, 60, progress_bar=False)
    accepted, damping = np.asarray(r.info.accepted), np.asarray(r.info.damping)
    assert not accepted[0] and damping[1] > damping[0], "the overflowing unit step is rejected"
    assert int(r.info.reason[0]) == 3 and int(r.info.reason[-1]) in (0, 4), "reason recorded"
    loc = float(r.params["loc"][0])
    assert np.isfinite(loc) and _log_max() < loc < 2 * _log_max()
    assert np.all(np.isfinite(r.losses)) and accepted.mean() > 0.5


def saddle():
    """A saddle whose curvature c = max^(3/4) makes every precision update overflow:
    S + b (H - S) is indefinite and the fallback's G S^-1 G is c^2 = inf, so the Cholesky fails."""
    c = jnp.finfo(jnp.result_type(float)).max ** 0.75
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.factor("saddle", 0.5 * c * (z[0] ** 2 - z[1] ** 2))


def test_failed_cholesky_is_rejected_then_fit_error_keeps_the_last_good_state():
    guide = FullRankGaussian(saddle, init_strategy=init_to_value(values={"z": jnp.zeros(2)}))
    engine = NGVI(saddle, guide, max_rejections=3)
    with pytest.raises(FitError, match="3 consecutive steps were rejected at step 3") as err:
        engine.run(KEY, 50, progress_bar=False)
    assert "proposal is not finite" in str(err.value), "names the cause: the step, not the loss"
    res = err.value.result
    assert np.all(np.asarray(res.info.reason) == 2)
    assert np.all(np.isfinite(res.losses)), "the loss and gradient are finite: only the step fails"
    assert res.num_rejected == 3 and not np.any(np.asarray(res.info.accepted))
    assert np.all(np.diff(np.asarray(res.info.damping)) > 0) and float(res.state.damping) > 1.0
    init = engine.init(KEY)
    assert _same(res.state.params, init.params), "the last good state is the initial one"


# -- interruption and determinism -----------------------------------------------------------------
def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_ctrl_c_returns_the_partial_fit_and_same_seed_is_bit_identical():
    y = jnp.array([0.3, -1.2, 2.0, 0.7])
    engine = NGVI(normal_model, MeanFieldGaussian(normal_model))
    # tol=None: all 40 steps (the warm start puts this conjugate fit within tol of its optimum
    # before step 20, where the default check would end it)
    run = dict(progress_bar=False, chunk_size=10, tol=None)
    full = engine.run(KEY, 40, y, **run)
    again = engine.run(KEY, 40, y, **run)
    assert _same(full.params, again.params) and _same(full.state, again.state)

    def interrupt(state):
        if int(state.step) >= 20:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        part = engine.run(KEY, 40, y, callback=interrupt, **run)
    assert part.interrupted and int(part.state.step) == 20 and part.num_steps == 20
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(part.params))
    rest = engine.run(None, 20, y, init_state=part.state, **run)
    assert _same(rest.state, full.state), "resuming the interrupted state finishes the same fit"


def _docstring_bnn():
    """The example model of ``fit_bnn``'s docstring, executed from the docstring itself."""
    import textwrap

    from ngvi.nn import fit_bnn

    doc = fit_bnn.__doc__
    block = doc[doc.index("import jax\n") : doc.index("res = fit_bnn(")]
    namespace: dict = {}
    exec(textwrap.dedent("        " + block), namespace)  # noqa: S102 - our own docstring
    return namespace["model"]


def test_fit_bnn_docstring_model_follows_the_contract():
    """Traced with NumPyro's handlers as ``fit_bnn`` calls it: the rows of ``batch_idx``, the
    likelihood scaled by N / B; without ``batch_idx`` every row, unscaled."""
    model = _docstring_bnn()
    X = jax.random.normal(KEY, (64, 5))
    y = (X[:, 0] > 0).astype(jnp.int32)
    site = {}

    @jax.jit  # one compile instead of op-by-op dispatch of every layer
    def run(X, y, batch_idx):
        tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(X, y, batch_idx)
        site.update(shape=tr["y"]["fn"].batch_shape, scale=tr["y"]["scale"])
        return tr["y"]["value"]

    np.testing.assert_array_equal(run(X, y, jnp.arange(16)), y[:16])
    assert site == {"shape": (16,), "scale": pytest.approx(4.0)}
    np.testing.assert_array_equal(run(X, y, None), y)
    assert site == {"shape": (64,), "scale": None}


@pytest.mark.slow  # ~15 s on an idle CPU (a K-FAC BNN compile), 80 s on the shared machine
def test_fit_bnn_docstring_model_trains():
    """The docstring's example trains with ``fit_bnn`` and a K-FAC guide, as written there."""
    import ngvi
    from ngvi.nn import fit_bnn

    X = jax.random.normal(KEY, (64, 5))
    y = (X[:, 0] > 0).astype(jnp.int32)
    res = fit_bnn(
        ngvi.KFACGuide(_docstring_bnn()),
        X,
        y,
        epochs=2,
        batch_size=16,
        eval_data=(X[:32], y[:32]),
        progress_bar=False,
    )
    assert res.losses.shape == (2,) and np.all(np.isfinite(res.losses))
    assert 0.0 <= res.history[-1].accuracy <= 1.0
