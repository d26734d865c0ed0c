"""The zoo's BNNs: ``NGVI(model, KFACGuide(model))`` with nothing else against mean-field ADVI
(``AutoNormal``, Adam 0.01, ``Trace_ELBO``) at equal epochs (issue 17: the K-FAC door the API
invites must be the good path).

    python benchmarks/zoo_bnn.py [--epochs 25 100] [--batch-size 32] [--seeds 5]

Both train with ``ngvi.nn.fit_bnn`` on the zoo's training data (``bnn_moons``: make_moons, 200
rows; ``bnn_sine``: 100 rows) from the same initial means (K-FAC's fan-in scaled draws, given
to ``AutoNormal`` through ``init_to_value``), on the same minibatch orders, and are scored on
held-out data from the same generator (2000 rows): the Monte Carlo predictive's test NLL (32
weight samples), with accuracy and ECE for the classifier and RMSE for the regression. Each row
is the mean and sd over ``--seeds`` fit seeds. Writes ``benchmarks/results/zoo_bnn.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO, init_to_value  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402

import ngvi  # noqa: E402
from benchmarks.zoo import REGISTRY  # noqa: E402
from benchmarks.zoo._data import rng  # noqa: E402
from ngvi.nn import fit_bnn  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "zoo_bnn.json"
METRICS = ("nll", "accuracy", "ece", "rmse")


def test_data(name: str, n: int = 2000) -> tuple[jax.Array, jax.Array]:
    """Held-out rows from the training data's generator (other seeds)."""
    if name == "bnn_moons":
        from sklearn.datasets import make_moons

        X, y = make_moons(n_samples=n, noise=0.2, random_state=1)
        Xtr, _ = make_moons(n_samples=200, noise=0.2, random_state=0)  # the zoo's scaling
        X = (X - Xtr.mean(0)) / Xtr.std(0)
        return jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.int32)
    r = rng(62)
    x = r.uniform(-3, 3, (n, 1))
    y = np.sin(x[:, 0]) + 0.2 * r.standard_normal(n)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def initial_means(guide: ngvi.KFACGuide) -> dict:
    """The guide's initial means per site (its median: K-FAC's q is symmetric), for
    ``init_to_value``."""
    return guide.median(guide.numpyro_params(guide.init_params(guide.target)))


def run(name: str, epochs: int, batch_size: int, seed: int) -> dict:
    entry = REGISTRY[name]
    (X,), kwargs = entry.data()
    y, test = kwargs["y"], test_data(name)
    common = dict(
        epochs=epochs,
        batch_size=batch_size,
        eval_data=test,
        progress_bar=False,
        rng_key=jax.random.PRNGKey(seed),
    )
    guide = ngvi.KFACGuide(entry.model, init_seed=seed)
    kfac = fit_bnn(ngvi.NGVI(entry.model, guide), X, y, **common)
    auto = AutoNormal(entry.model, init_loc_fn=init_to_value(values=initial_means(guide)))
    advi = fit_bnn(SVI(entry.model, auto, optax.adam(0.01), Trace_ELBO()), X, y, **common)
    return {
        m: {k: float(getattr(r.history[-1], k)) for k in METRICS}
        for m, r in (("kfac", kfac), ("advi", advi))
    }


def summarize(name: str, epochs: int, runs: list[dict]) -> dict:
    """Mean, sd and per-seed values of each method's metrics; seeds where K-FAC is better."""
    rows: dict = {"model": name, "epochs": epochs}
    for method in ("kfac", "advi"):
        vals = {k: np.array([r[method][k] for r in runs]) for k in METRICS}
        rows[method] = {
            k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "per_seed": v.tolist()}
            for k, v in vals.items()
        }
        cells = " ".join(f"{np.mean(v):7.4f}+-{np.std(v):6.4f}" for v in vals.values())
        print(f"{name:10s} {epochs:6d} {method:6s} {cells}", flush=True)
    rows["kfac_better_seeds"] = {
        k: int(sum(r["kfac"][k] < r["advi"][k] for r in runs)) for k in ("nll", "ece", "rmse")
    }
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[25, 100])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    ns = p.parse_args(argv)
    out = {"epochs": ns.epochs, "batch_size": ns.batch_size, "seeds": ns.seeds, "runs": []}
    print(f"{'model':10s} {'epochs':>6s} {'method':6s} " + " ".join(f"{m:>15s}" for m in METRICS))
    for epochs in ns.epochs:
        for name in ("bnn_moons", "bnn_sine"):
            out["runs"].append(
                summarize(
                    name, epochs, [run(name, epochs, ns.batch_size, s) for s in range(ns.seeds)]
                )
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
