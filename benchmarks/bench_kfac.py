"""K-FAC NGVI vs diagonal NGVI, mean-field ADVI and plain Adam (MAP) on the digits BNN, plus the
memory of K-FAC on a synthetic net with > 1e5 weights.

    python benchmarks/bench_kfac.py [--epochs 10] [--batch-size 64]

Every method trains with ``fit_bnn`` (each epoch one compiled scan over its minibatches, so the
time is compute, not Python dispatch). After training, the compiled epoch is run again
``--repeats`` times on the final state and one fixed minibatch order: the per-epoch time is the
fastest of those (on a shared machine other jobs only ever add time, so the minimum is the least
disturbed estimate of the method's own cost, as ``timeit`` reports); the median is kept too.
Ratios are to Adam (MAP) measured in the same run. The "weight noise" row times only drawing the
``d`` standard normals a weight-perturbation method needs per step (scanned like an epoch): the
floor under every variational method here, ADVI included. K-FAC and diagonal NGVI use
``bnn_engine`` (one weight sample per step, lr 0.1); "kfac_ngvi_stats5" also updates the Kronecker
factors only every 5 steps. Test accuracy, NLL and ECE use 32 Monte Carlo weight samples after the
same number of epochs; "advi_same_time" is ADVI trained for as many epochs as fit in K-FAC's
training time (K-FAC's epoch time / ADVI's, times the epochs). Writes
benchmarks/results/kfac.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import lax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
from numpyro.infer.initialization import init_to_value

import models
from ngvi.bnn import _driver, _epoch_fn
from ngvi.kfac import KFACGuide, bnn_engine, fit_bnn, minibatches
from ngvi.nn import mlp

RESULTS = Path(__file__).parent / "results" / "kfac.json"


def _means(guide: KFACGuide) -> dict:
    p = guide.init_params(guide.target)
    out = {}
    for L in guide.layers:
        out[L.w.name], out[L.b.name] = p[f"{L.name}:M"][:-1], p[f"{L.name}:M"][-1]
    return out


def _repeat_epoch(engine, state, X, y, idx, repeats: int) -> np.ndarray:
    """Seconds of ``repeats`` runs of the method's compiled epoch from ``state``."""
    update = _driver(engine)[2]
    run = _epoch_fn(update)
    jax.block_until_ready(run(state, X, y, idx))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, X, y, idx))
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def _noise_epoch(d: int, steps: int, repeats: int) -> np.ndarray:
    """Seconds per epoch of drawing ``d`` standard normals per step, scanned over ``steps``."""

    @jax.jit
    def run(key):
        def body(c, i):
            return c + jnp.sum(jax.random.normal(jax.random.fold_in(key, i), (d,))), None

        return lax.scan(body, jnp.zeros(()), jnp.arange(steps))[0]

    jax.block_until_ready(run(jax.random.PRNGKey(0)))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(jax.random.PRNGKey(r)))
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def classifier(epochs: int, batch_size: int, repeats: int) -> dict:
    mod = models.load_module("models/bnn_classifier.py")
    (X,), kw = mod.data()
    (Xt,), kt = mod.test_data()
    m = mod.model
    engines = {}
    engines["kfac_ngvi"] = bnn_engine(KFACGuide(m))
    engines["kfac_ngvi_stats5"] = bnn_engine(KFACGuide(m, stats_every=5))
    engines["diag_ngvi"] = bnn_engine(KFACGuide(m, structure="diagonal"))
    probe = KFACGuide(m)
    probe.setup(jax.random.PRNGKey(0), (X,), {"y": kw["y"], "batch_idx": jnp.arange(batch_size)})
    init = init_to_value(values=_means(probe))  # same initial means for every method
    adam = optax.adam(0.01)
    engines["advi"] = SVI(m, AutoNormal(m, init_loc_fn=init), adam, Trace_ELBO())
    engines["map_adam"] = SVI(m, AutoDelta(m, init_loc_fn=init), adam, Trace_ELBO())
    rows = {}
    idx = jnp.stack(list(minibatches(X.shape[0], batch_size, np.random.default_rng(0))))
    train = lambda engine, n: fit_bnn(
        engine,
        X,
        kw["y"],
        epochs=n,
        batch_size=batch_size,
        eval_data=(Xt, kt["y"]),
        eval_every=n,
        progress_bar=False,
    )
    for name, engine in engines.items():
        r = train(engine, epochs)
        met = r.history[-1]
        times = _repeat_epoch(engine, r.state, X, kw["y"], idx, repeats)
        rows[name] = {
            "epoch_s": float(np.min(times)),
            "epoch_s_median": float(np.median(times)),
            "step_ms": 1e3 * float(np.min(times)) / idx.shape[0],
            "first_epoch_s": float(r.epoch_times[0]),
            "training_epoch_s_min": float(np.min(r.epoch_times[1:])),
            "accuracy": met.accuracy,
            "nll": met.nll,
            "ece": met.ece,
        }
    noise = _noise_epoch(probe.target.dim, idx.shape[0], repeats)
    rows["weight_noise_only"] = {
        "epoch_s": float(np.min(noise)),
        "epoch_s_median": float(np.median(noise)),
        "step_ms": 1e3 * float(np.min(noise)) / idx.shape[0],
        "normals_per_step": probe.target.dim,
    }
    # ADVI given K-FAC's compute: as many epochs as fit in K-FAC's training time
    budget = epochs * rows["kfac_ngvi"]["epoch_s"] / rows["advi"]["epoch_s"]
    advi_epochs = max(epochs, round(budget))
    svi = SVI(m, AutoNormal(m, init_loc_fn=init), adam, Trace_ELBO())
    r = train(svi, advi_epochs)
    met = r.history[-1]
    rows["advi_same_time"] = {
        "epochs": advi_epochs,
        "epoch_s": rows["advi"]["epoch_s"],
        "epoch_s_median": rows["advi"]["epoch_s_median"],
        "accuracy": met.accuracy,
        "nll": met.nll,
        "ece": met.ece,
    }
    base = rows["map_adam"]["epoch_s"]
    base_median = rows["map_adam"]["epoch_s_median"]
    for row in rows.values():
        row["time_ratio_vs_adam"] = row["epoch_s"] / base
        row["median_time_ratio_vs_adam"] = row["epoch_s_median"] / base_median
    return rows


def _synthetic_model(X, y=None, batch_idx=None):
    xb, yb = X[batch_idx], y[batch_idx]
    logits = mlp(xb, (256, 10), prior_scale=1.0)
    with numpyro.plate("data", xb.shape[0]), numpyro.handlers.scale(scale=X.shape[0] / len(xb)):
        numpyro.sample("y", dist.Categorical(logits=logits), obs=yb)


def synthetic(steps: int = 16, batch_size: int = 128, warmup: int = 24) -> dict:
    """784-256-10 MLP on random data: >2e5 weights, factors O(sum n_in^2 + out^2). K-FAC is
    timed over ``steps`` steps after ``warmup`` (the running factors are young, and inverted
    every step, for the first ``1 / stat_decay = 20``)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    X = jax.random.normal(kx, (2048, 784))
    y = jnp.argmax(X @ jax.random.normal(kw, (784, 10)), -1)
    guide = KFACGuide(_synthetic_model)
    engine = bnn_engine(guide)
    state = engine.init(jax.random.PRNGKey(1), X, y=y, batch_idx=jnp.arange(batch_size))
    rng, times = np.random.default_rng(0), []
    batches = list(minibatches(X.shape[0], batch_size, rng))
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, loss = engine.update(state, X, y=y, batch_idx=batches[i % len(batches)])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    times = times[warmup - 1 :]  # times[1:] below: the steps after the warm-up
    baselines = {}
    for name, auto in (("map_adam", AutoDelta), ("advi", AutoNormal)):
        svi = SVI(_synthetic_model, auto(_synthetic_model), optax.adam(0.01), Trace_ELBO())
        update = jax.jit(svi.update)
        s_state = jax.jit(svi.init)(jax.random.PRNGKey(1), X, y=y, batch_idx=jnp.arange(batch_size))
        s_times = []
        for idx in list(minibatches(X.shape[0], batch_size, np.random.default_rng(0)))[:steps]:
            t0 = time.perf_counter()
            s_state, _ = jax.block_until_ready(update(s_state, X, y=y, batch_idx=idx))
            s_times.append(time.perf_counter() - t0)
        baselines[name] = float(np.median(s_times[1:]))
    d = guide.target.dim
    factor_floats = sum(L.n_in**2 + L.n_out**2 for L in guide.layers)
    guide_floats = sum(int(np.size(v)) for v in state.params.values())
    # the means M (d floats) plus three copies of every factor (running A/G, their damped
    # inverses, the covariance roots) plus three scalar counters: O(d + sum of factor sizes)
    assert guide_floats == d + 3 * factor_floats + 3, (guide_floats, d, factor_floats)
    return {
        "weights": d,
        "layers": [(L.name, L.n_in, L.n_out) for L in guide.layers],
        "factor_floats_per_matrix_kind": factor_floats,
        "guide_param_floats": guide_floats,
        "guide_param_MB": guide_floats * 4 / 2**20,
        "guide_param_floats_formula": "d + 3 * sum(n_in^2 + n_out^2) + 3",
        "guide_floats_over_d2": guide_floats / d**2,
        "dense_fisher_floats": d * d,
        "dense_fisher_GB": d * d * 4 / 2**30,
        "step_s_median": float(np.median(times[1:])),
        "step_s_mean": float(np.mean(times[1:])),  # with the inversions every 10 steps
        "adam_step_s_median": baselines["map_adam"],
        "advi_step_s_median": baselines["advi"],
        "step_ratio_vs_adam": float(np.median(times[1:])) / baselines["map_adam"],
        "step_ratio_vs_advi": float(np.median(times[1:])) / baselines["advi"],
        "final_loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    out = {
        "device": str(jax.devices()[0]),
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "classifier": classifier(a.epochs, a.batch_size, a.repeats),
        "synthetic": synthetic(),
    }
    print(f"digits BNN 64-32-10, {a.epochs} epochs, batch {a.batch_size} ({out['device']})")
    cols = ("epoch s", "x Adam", "median", "acc", "NLL", "ECE")
    print(f"{'method':<17} " + " ".join(f"{c:>7}" for c in cols))
    for name, r in out["classifier"].items():
        metrics = [r.get(k, float("nan")) for k in ("accuracy", "nll", "ece")]
        print(
            f"{name:<17} {r['epoch_s']:8.4f} {r['time_ratio_vs_adam']:7.2f} "
            f"{r['median_time_ratio_vs_adam']:7.2f} " + " ".join(f"{m:6.3f}" for m in metrics)
        )
    s = out["synthetic"]
    print(
        f"synthetic 784-256-10: {s['weights']} weights, guide params {s['guide_param_MB']:.1f} MB "
        f"(dense Fisher would be {s['dense_fisher_GB']:.0f} GB), step {s['step_s_median']:.3f} s "
        f"= {s['step_ratio_vs_adam']:.2f}x Adam, {s['step_ratio_vs_advi']:.2f}x ADVI"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
