"""The model zoo (``benchmarks/zoo``) and the rule of issue 17 on its fastest cells.

The rule: a default fit (``NGVI(model, Guide(model)).run(key, num_steps, ...)``, nothing else)
that reports ``converged=True`` is within 0.1 nat of its family optimum; a fit that is not within
0.1 nat says so (a warning or a ``FitError``). The cells below go through the same harness
function as ``python benchmarks/zoo.py`` (``run_cell``: fit in float32, the test session's dtype,
then judged in float64 against the committed optimum): the four are the ones the issue and the
first zoo runs found breaking it (a float32 Gamma-Poisson ExpFamilyGuide fit called converged
~2e4 nats off; AR, Poisson GLM and change-point fits called converged short of the optimum).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the zoo lives in benchmarks/

from benchmarks.zoo import REGISTRY, guides_for  # noqa: E402
from benchmarks.zoo.assess import load_optima, load_references  # noqa: E402
from benchmarks.zoo.harness import TOL_NAT, run_cell  # noqa: E402
from benchmarks.zoo.registry import RHAT_MAX, traced_layout  # noqa: E402

REFS, OPTIMA = load_references(), load_optima()


def test_references_cover_every_model():
    missing = sorted(set(REGISTRY) - set(REFS))
    assert not missing, f"no NUTS reference for {missing}: run benchmarks/zoo/make_references.py"
    for name, entry in REGISTRY.items():
        ref = REFS[name]
        nuts = ref["nuts"]
        assert nuts["num_chains"] >= 2 and nuts["num_samples"] >= 1000, name
        assert nuts["dtype"] == "float64", name
        sound = nuts["divergences"] == 0 and nuts["r_hat_max"] <= RHAT_MAX
        assert ref["reliable"] == (sound and not entry.multimodal), name
        assert len(ref["start"]["loc"]) == entry.dim, name
        for site in ref["sites"].values():
            size = math.prod(site["shape"])
            assert len(site["mean"]) == len(site["sd"]) == size, name
            assert np.all(np.asarray(site["sd"]) > 0), name


#: family optima not computed yet (L-BFGS on 4096 fixed draws takes 5-30 min each on two busy
#: cores); their cells show as "unscored" in docs/zoo.md. Run
#: ``python benchmarks/zoo/make_optima.py --families F --only NAME`` and delete the entry: the
#: test below fails while an entry here has its optimum, so this list cannot go stale.
PENDING: set[tuple[str, str]] = set()  # every family optimum is computed (session 13)


def test_optima_cover_every_model_and_family():
    missing = sorted(set(REGISTRY) - set(OPTIMA))
    assert not missing, f"no family optimum for {missing}: run benchmarks/zoo/make_optima.py"
    for name, entry in REGISTRY.items():
        opt = OPTIMA[name]
        families = {g for g in entry.guides if g != "kfac"}  # K-FAC is judged by mean-field's
        pending = {f for f in families if (name, f) in PENDING}
        assert not pending & set(opt), f"{name}: {pending & set(opt)} computed: drop from PENDING"
        families -= pending
        assert "meanfield" in families, name  # the reference every other family starts from
        assert families <= set(opt), (name, families - set(opt))
        assert all(math.isfinite(opt[f]["elbo"]) for f in families), name
        if "fullrank" in families:  # a richer family: not worse beyond the scorers' noise
            assert opt["fullrank"]["elbo"] >= opt["meanfield"]["elbo"] - 0.05, name


@pytest.mark.parametrize("name", list(REGISTRY))
def test_model_data_and_declared_layout(name):
    """data() runs, and the declared dimension and guides match the traced model."""
    entry = REGISTRY[name]
    dim, expfam, layers = traced_layout(entry)
    assert dim == entry.dim
    assert entry.guides == guides_for(dim, expfam, layers)


_NO_WARNING = "the engine ends short of the family optimum with converged=False and no warning"
RULE_CELLS = [
    pytest.param("ar1", "meanfield", id="ar1-meanfield"),
    pytest.param("poisson_regression", "meanfield", id="poisson_regression-meanfield"),
    # slow: ~20 s
    pytest.param("change_point", "expfam", id="change_point-expfam", marks=pytest.mark.slow),
    # issue 17 item 2; slow: ~60 s (an exp-family guide and its 4096-draw float64 scorer compile)
    pytest.param("pumps", "expfam", id="pumps-expfam", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "guide"), RULE_CELLS)
def test_default_fit_is_right_or_says_so(name, guide):
    cell = run_cell(REGISTRY[name], guide, refs=REFS, optima=OPTIMA, diagnostics=False)
    gap, said = cell["gap"], bool(cell["warnings"] or cell["error"])
    assert gap is not None, cell
    if cell["converged"]:
        assert gap <= TOL_NAT, f"converged=True {gap:.3g} nat from the family optimum"
    else:
        assert gap <= TOL_NAT or said, f"{gap:.3g} nat off and no warning: {_NO_WARNING}"
    assert cell["verdict"] in ("ok", "miss (warned)")


def test_a_held_out_gap_decides_only_against_the_lbfgs_optimum():
    """``heldout``: a near miss rechecked on other draws is judged by its held-out gap, unless a
    better cell has replaced the L-BFGS optimum (the held-out gap was measured against it)."""
    from benchmarks.zoo.harness import judge_cell
    from benchmarks.zoo.heldout import due

    name = "stochastic_volatility_noncentered"
    elbo = OPTIMA[name]["expfam"]["elbo"] - 0.12
    cell = {"model": name, "guide": "expfam", "dtype": "float64", "converged": True}
    cell.update(elbo=elbo, warnings=[], error=None, post_mean=None, steps=1956)
    judged = judge_cell(cell, REFS, OPTIMA)
    assert judged["verdict"] == "SILENT MISS" and due(judged, OPTIMA)
    rechecked = judge_cell({**cell, "heldout_gap": -0.03}, REFS, OPTIMA)
    assert rechecked["verdict"] == "ok" and rechecked["fixed_gap"] == pytest.approx(0.12)
    assert not due(rechecked, OPTIMA)
    beaten = {name: {**OPTIMA[name], "expfam": {"elbo": elbo + 1.0, "beaten_by": "expfam f32"}}}
    assert judge_cell({**cell, "heldout_gap": -0.03}, REFS, beaten)["verdict"] == "SILENT MISS"
    far = judge_cell({**cell, "elbo": elbo - 5.0}, REFS, OPTIMA)
    assert not due(far, OPTIMA), "a gap beyond any measured scorer bias is not rechecked"


def test_the_committed_table_holds_the_rule_on_every_cell():
    """``benchmarks/results/zoo.json`` as committed (``python benchmarks/zoo.py``), re-judged
    against the committed references and optima: every model x guide x dtype cell is scored,
    none is a silent miss, at least 90% reach their family optimum, and every miss carries the
    warning or error that names its cause."""
    import json

    from benchmarks.zoo.cli import best_known
    from benchmarks.zoo.harness import judge_cell

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo.json"
    table = json.loads(path.read_text())
    dtypes = ("float32", "float64")
    expected = {(n, g, d) for n, e in REGISTRY.items() for g in e.guides for d in dtypes}
    assert {(c["model"], c["guide"], c["dtype"]) for c in table["cells"]} == expected
    optima = best_known(OPTIMA, table["cells"])
    cells = [judge_cell(c, REFS, optima) for c in table["cells"]]
    verdicts = [c["verdict"] for c in cells]
    assert verdicts == [c["verdict"] for c in table["cells"]]  # the table is today's judgement
    assert "SILENT MISS" not in verdicts and "unscored" not in verdicts
    assert verdicts.count("ok") >= 0.9 * len(cells)
    for c in cells:
        if c["verdict"] != "ok":
            assert c["warnings"] or c["error"], (c["model"], c["guide"], c["dtype"])
