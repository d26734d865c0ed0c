"""The command line (ngvi.cli): ``ngvi fit`` saves what it fits, offers every guide ngvi ships,
and reports bad input as one line on stderr with exit status 1."""

import textwrap

import arviz as az
import jax
import numpy as np
import pytest

import ngvi.guides
from ngvi import NGVI, MeanFieldGaussian, load_checkpoint, models
from ngvi.cli import GUIDES, main

TINY_BNN = textwrap.dedent(
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from ngvi.nn import dense

    def model(X, y=None):
        h = dense("l0", X, 1)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(h[:, 0], 0.5), obs=y)

    def data():
        X = jnp.linspace(-1.0, 1.0, 24).reshape(12, 2)
        return (X,), {"y": X[:, 0] - X[:, 1]}
    """
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error_line(capsys) -> str:
    """The one line ``main`` printed on stderr (and nothing on stdout but the fit's own lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- ngvi fit --out ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    # --tol 0: all 30 steps (by default the fit stops once converged, here at step 20)
    argv = ["fit", "normal_normal", "--steps", "30", "--tol", "0", "--samples", "200"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    return out


def test_fit_out_writes_inference_data_that_arviz_loads(saved_fit):
    idata = az.from_netcdf(saved_fit / "idata.nc")
    assert set(idata.groups()) == {
        "posterior",
        "log_likelihood",
        "posterior_predictive",
        "observed_data",
        "vi_trace",
    }
    assert idata.posterior["mu"].shape == (1, 200)
    assert idata.vi_trace["elbo"].shape == (30,) and np.isfinite(idata.vi_trace["elbo"]).all()
    attrs = idata.posterior.attrs
    assert attrs["guide"] == "meanfield" and attrs["steps"] == 30
    assert attrs["psis_verdict"] in ("exact", "good", "ok", "unreliable")
    assert np.isfinite(az.loo(idata)["elpd_loo"])


def test_fit_out_params_and_checkpoint_hold_the_fit(saved_fit):
    """``params.npz`` holds the fitted guide parameters: the draws in idata.nc come from them,
    and the saved engine state gives the same parameters back (``load_checkpoint``)."""
    params = dict(np.load(saved_fit / "params.npz"))
    assert set(params) == {"loc", "scale"}
    mu = az.from_netcdf(saved_fit / "idata.nc").posterior["mu"].values
    loc, scale = float(params["loc"][0]), float(params["scale"][0])
    assert abs(mu.mean() - loc) < 4 * scale / np.sqrt(200) and abs(mu.std() / scale - 1) < 0.2
    model, args, kwargs = models.load("normal_normal")
    guide = MeanFieldGaussian(model)
    engine = NGVI(model, guide)
    template = engine.init(jax.random.PRNGKey(0), *args, **kwargs)
    state = load_checkpoint(saved_fit / "checkpoint.npz", template, guide)
    assert int(state.step) == 30
    for name, value in engine.get_params(state).items():
        np.testing.assert_array_equal(np.asarray(value), params[name])


def test_fit_summary_on_stdout_without_out(capsys):
    argv = ["fit", "normal_normal", "--steps", "20", "--samples", "100", "--no-progress"]
    assert main([*argv, "--no-predictive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mean-field NGVI: 20 steps") and "mu" in out


# -- --guide -------------------------------------------------------------------------------------
def test_guide_choices_cover_every_guide_ngvi_ships():
    # every export but the interface and the parameter containers (DiagonalFisherGuide is a
    # factory function, so this lists by name rather than by subclass)
    shipped = set(ngvi.guides.__all__) - {"Guide", "GuideParams", "ParamLayout"}
    assert {cls for _, cls in GUIDES.values()} == shipped


@pytest.mark.parametrize(
    "guide",
    # kfac: 36 s on the shared machine (a BNN layout and K-FAC step compile)
    ["fullrank", "expfam", pytest.param("kfac", marks=pytest.mark.slow)],
)
def test_fit_with_each_guide(guide, tmp_path, capsys):
    spec = "normal_normal" if guide != "kfac" else _write(tmp_path, "bnn.py", TINY_BNN)
    argv = ["fit", spec, "--guide", guide, "--steps", "10", "--samples", "50", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{GUIDES[guide][0]} NGVI: 10 steps")


# -- errors: one line on stderr, exit status 1 ---------------------------------------------------
def test_data_error_is_one_line_with_exit_status_1(tmp_path, capsys):
    spec = _write(
        tmp_path,
        "nan_data.py",
        """
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        def model(y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            with numpyro.plate("n", 3):
                numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        def data():
            return (jnp.array([1.0, float("nan"), 2.0]),), {}
        """,
    )
    assert main(["fit", spec, "--steps", "5", "--no-progress"]) == 1
    line = _error_line(capsys)
    assert line.startswith("ngvi: error: DataError: observed site 'y' holds a non-finite value")
    assert "index (1,)" in line


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--steps", "0"], "ConfigError: num_steps must be a positive integer, got 0"),
        (["--guide", "kfac"], "ModelError: the model declares no ngvi.nn.dense layer"),
    ],
)
def test_config_and_model_errors_are_one_line(argv, match, capsys):
    assert main(["fit", "normal_normal", "--no-progress", *argv]) == 1
    assert match in _error_line(capsys)


def test_out_that_is_not_a_folder_fails_before_the_fit(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["fit", "normal_normal", "--out", str(blocker / "sub")]) == 1
    line = _error_line(capsys)
    assert line.startswith("ngvi: error: ConfigError: --out") and "not a writable folder" in line


def test_missing_model_function_lists_the_functions_the_file_defines(tmp_path, capsys):
    spec = _write(
        tmp_path,
        "two_models.py",
        """
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import Predictive  # imported: not listed

        def pooled():
            numpyro.sample("m", dist.Normal(0.0, 1.0))

        def hierarchical():
            numpyro.sample("m", dist.Normal(0.0, 1.0))

        def _helper():
            pass

        def data():
            return (), {}
        """,
    )
    assert main(["fit", spec]) == 1
    line = _error_line(capsys)
    assert "no model function 'model'" in line
    assert f"it defines pooled, hierarchical; name one as {spec}:NAME" in line
    assert main(["fit", "no_such_model"]) == 1
    assert "unknown model 'no_such_model': not a bundled model (" in _error_line(capsys)


def test_compare_verdict_when_the_start_is_already_within_tol(capsys):
    """``ngvi compare`` on a model where NGVI's warm start alone is within 0.1 nat (0 steps,
    measured on normal_normal) states that, instead of dividing by the 0 steps (it raised
    ZeroDivisionError); with steps on both sides it gives both ratios."""
    from ngvi.cli import _verdict

    ngvi_row = {"method": "ngvi", "steps_to_0.1": 0, "seconds_to_0.1": 2e-4, "start_grad_evals": 6}
    advi = {"method": "advi", "best_advi": True, "lr": 0.05, "num_particles": 1.0}
    _verdict([ngvi_row, {**advi, "steps_to_0.1": 141, "seconds_to_0.1": 6.7e-4}])
    out = capsys.readouterr().out
    assert "already within 0.1 nat" in out and "6 gradient evaluations" in out and "141" in out
    _verdict(
        [{**ngvi_row, "steps_to_0.1": 10}, {**advi, "steps_to_0.1": 100, "seconds_to_0.1": 2e-3}]
    )
    assert "10.0x fewer steps and 10.0x less time" in capsys.readouterr().out
