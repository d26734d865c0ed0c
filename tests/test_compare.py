"""ADVI baseline, the honest comparison and the CLI, on small models."""

import json

import jax
import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

import models
from ngvi import MeanFieldGaussian
from ngvi.baselines import advi, advi_flat
from ngvi.cli import main
from ngvi.compare import compare, compare_vi, format_table, verdicts
from ngvi.scoring import first_touch, steps_to_within


def test_advi_result_matches_ngvi_fields_and_flat_layout():
    model, args, kwargs = models.load("eight_schools")
    res = advi(model, *args, num_steps=50, progress_bar=False, **kwargs)
    assert res.losses.shape == (50,) and res.num_steps == 50
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    loc, scale = advi_flat(target, res.params)
    assert loc.shape == (target.dim,) and np.all(scale > 0)
    sl = target.site_slices()["theta_tilde"]
    np.testing.assert_array_equal(loc[sl], res.params["theta_tilde_auto_loc"])


def test_stays_within_is_not_first_touch():
    elbo = np.array([-5.0, -1.05, -2.0, -1.08, -1.02, -1.01])
    assert first_touch(elbo, -1.0, 0.1) == 1
    assert steps_to_within(elbo, -1.0, 0.1) == 3
    assert steps_to_within(elbo[:3], -1.0, 0.1) is None


def test_compare_on_a_conjugate_model_ngvi_reaches_the_optimum_first():
    model, args, kwargs = models.load("normal_normal")
    rows, extras = compare_vi(model, *args, ngvi_steps=60, advi_steps=600, every=10, **kwargs)
    ngvi_row, advi_row = rows
    assert ngvi_row["method"] == "ngvi" and ngvi_row["gap_nats"] < 0.01
    assert ngvi_row["steps_to_0.1"] is not None
    assert advi_row["steps_to_0.1"] is None or advi_row["steps_to_0.1"] > ngvi_row["steps_to_0.1"]
    assert "ngvi" in format_table(rows)


def test_compare_with_nuts_on_a_conjugate_model_reports_small_errors():
    model, args, kwargs = models.load("normal_normal")
    table, extras = compare(
        model,
        *args,
        methods=("ngvi", "nuts"),
        ngvi_steps=60,
        nuts_warmup=300,
        nuts_samples=1000,
        num_chains=2,
        **kwargs,
    )
    rows = table.set_index("method")
    assert list(rows.index) == ["ngvi", "nuts"]
    assert rows.loc["ngvi", "err:mu"] < 0.1  # NUTS' own Monte Carlo error is ~0.03 sd here
    assert abs(rows.loc["ngvi", "sd_ratio:mu"] - 1) < 0.1
    assert rows.loc["ngvi", "khat"] < 0.5 and rows.loc["nuts", "r_hat_max"] < 1.02
    assert rows.loc["nuts", "grad_evals"] > 0
    assert any("ngvi: stayed within 0.1 nat" in line for line in verdicts(table))


def test_cli_fit_and_compare(tmp_path, capsys):
    assert main(["fit", "normal_normal", "--steps", "50", "--no-progress", "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "mean-field NGVI: 50 steps" in out and "mu" in out
    path = tmp_path / "cmp.json"
    assert (
        main(
            [
                "compare",
                "models/normal_normal.py:model",
                "--steps",
                "40",
                "--advi-steps",
                "400",
                "--advi-lr",
                "0.05",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    table = json.loads(path.read_text())
    assert [r["method"] for r in table["rows"]] == ["ngvi", "advi"]
    with pytest.raises(SystemExit, match="no_such_model"):
        main(["fit", "no_such_model"])
