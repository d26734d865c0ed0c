"""K-FAC NGVI vs diagonal NGVI, mean-field ADVI and plain Adam (MAP) on the digits BNN, plus the
memory and step time of K-FAC on a synthetic 784-256-10 net (> 1e5 weights) at two batch sizes,
with the parts of its step.

    python benchmarks/bench_kfac.py [--epochs 10] [--batch-size 64] [--seeds 5]

Every method trains with ``fit_bnn`` (each epoch one compiled scan over its minibatches, so the
time is compute, not Python dispatch). After training, every method's compiled epoch is run
``--repeats`` times on its final state and one fixed minibatch order, round-robin with the other
methods' (``timing.interleaved``: a slow spell of the shared machine falls on all alike): the
per-epoch time is the fastest of those (other jobs only ever add time, so the minimum is the least
disturbed estimate of the method's own cost, as ``timeit`` reports); the median is kept. Ratios are
to Adam (MAP) measured in the same run. The "weight noise" row times only drawing the ``d``
standard normals a weight-perturbation method needs per step (scanned like an epoch): the floor
under every variational method here, ADVI included; the two "floor_weight_perturbation" rows time
the least such a method does per step (noise, one perturbed value-and-gradient, SGD;
``_floor_epochs``), with the noise drawn per step and, to separate the RNG's cost, per epoch. K-FAC
and diagonal NGVI use ``bnn_engine`` (one weight sample per step, lr 0.1); "kfac_ngvi_stats5" also
updates the Kronecker factors only every 5 steps. Test accuracy, NLL and ECE use 32 Monte Carlo
weight samples after the same number of epochs; "advi_same_time" is ADVI trained for as many epochs
as fit in K-FAC's training time (K-FAC's epoch time / ADVI's, times the epochs). K-FAC's and ADVI's
test metrics are also reported over ``--seeds`` fit seeds (minibatch order and noise). Writes
benchmarks/results/kfac.json.
"""

from __future__ import annotations

import argparse
import json
import math
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
from timing import interleaved, seconds

from ngvi import models
from ngvi.guides.kfac import KFACGuide
from ngvi.nn import bnn_engine, fit_bnn, minibatches, mlp
from ngvi.nn.train import _driver, _epoch_fn

RESULTS = Path(__file__).parent / "results" / "kfac.json"


def _means(guide: KFACGuide) -> dict:
    p = guide.init_params(guide.target)
    out = {}
    for L in guide.layers:
        out[L.w.name], out[L.b.name] = p[f"{L.name}:M"][:-1], p[f"{L.name}:M"][-1]
    return out


def _noise_epoch(d: int, steps: int) -> tuple:
    """(fn, args): an epoch of drawing ``d`` standard normals per step, scanned over ``steps``."""

    @jax.jit
    def run(key):
        def body(c, i):
            return c + jnp.sum(jax.random.normal(jax.random.fold_in(key, i), (d,))), None

        return lax.scan(body, jnp.zeros(()), jnp.arange(steps))[0]

    return run, (jax.random.PRNGKey(0),)


def _floor_epochs(target, X, y, idx) -> dict:
    """(fn, args) per name: an epoch of the least a weight-perturbation method does per step, on
    the same NumPyro model: ``w = mu + exp(rho) * e`` with ``e ~ N(0, I)``, one value and
    gradient of ``-log p(y_B, w) - sum(rho)`` and a plain SGD step (no Adam state, no curvature,
    no accept test). "floor_weight_perturbation" draws ``e`` every step, as every method here does;
    "floor_weight_perturbation_predrawn" draws the whole epoch's noise in one call (the RNG's
    per-call cost on CPU, where JAX lowers threefry to a rolled loop, taken out)."""
    d = target.dim
    neg = lambda w, i: -target.log_density(w, (X,), {"y": y, "batch_idx": i}, None)

    def sgd(p, e, i):
        f = lambda p: neg(p[0] + jnp.exp(p[1]) * e, i) - jnp.sum(p[1])
        loss, g = jax.value_and_grad(f)(p)
        return jax.tree.map(lambda a, b: a - 1e-5 * b, p, g), loss

    def per_step(p, key, idx):
        def body(c, i):
            k, sk = jax.random.split(c[1])
            p, loss = sgd(c[0], jax.random.normal(sk, (d,)), i)
            return (p, k), loss

        return lax.scan(body, (p, key), idx)

    def predrawn(p, key, idx):
        E = jax.random.normal(key, (idx.shape[0], d))
        return lax.scan(lambda p, ie: sgd(p, ie[1], ie[0]), p, (idx, E))

    p0 = (jnp.zeros(d), jnp.full(d, -3.0))
    key = jax.random.PRNGKey(0)
    return {
        "floor_weight_perturbation": (jax.jit(per_step), (p0, key, idx)),
        "floor_weight_perturbation_predrawn": (jax.jit(predrawn), (p0, key, idx)),
    }


def classifier(epochs: int, batch_size: int, repeats: int, seeds: int) -> tuple[dict, dict]:
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
    fresh = {  # a NumPyro autoguide keeps its first (traced) setup: a new one per fit
        "kfac_ngvi": lambda: bnn_engine(KFACGuide(m)),
        "advi": lambda: SVI(m, AutoNormal(m, init_loc_fn=init), adam, Trace_ELBO()),
    }
    engines["advi"] = fresh["advi"]()
    engines["map_adam"] = SVI(m, AutoDelta(m, init_loc_fn=init), adam, Trace_ELBO())
    rows = {}
    idx = jnp.stack(list(minibatches(X.shape[0], batch_size, np.random.default_rng(0))))
    train = lambda engine, n, seed=0: fit_bnn(
        engine,
        X,
        kw["y"],
        epochs=n,
        batch_size=batch_size,
        rng_key=jax.random.PRNGKey(seed),
        eval_data=(Xt, kt["y"]),
        eval_every=n,
        progress_bar=False,
    )
    calls = {}  # every method's compiled epoch from its trained state, timed interleaved
    for name, engine in engines.items():
        r = train(engine, epochs)
        met = r.history[-1]
        calls[name] = (_epoch_fn(_driver(engine)[2]), (r.state, X, kw["y"], idx))
        rows[name] = {
            "first_epoch_s": float(r.epoch_times[0]),
            "training_epoch_s_min": float(np.min(r.epoch_times[1:])),
            "accuracy": met.accuracy,
            "nll": met.nll,
            "ece": met.ece,
        }
    calls["weight_noise_only"] = _noise_epoch(probe.target.dim, idx.shape[0])
    calls.update(_floor_epochs(probe.target, X, kw["y"], idx))
    for name, times in interleaved(calls, repeats).items():
        rows.setdefault(name, {}).update(
            {
                "epoch_s": float(np.min(times)),
                "epoch_s_median": float(np.median(times)),
                "step_ms": 1e3 * float(np.min(times)) / idx.shape[0],
            }
        )
    rows["weight_noise_only"]["normals_per_step"] = probe.target.dim
    # ADVI given K-FAC's compute: as many epochs as fit in K-FAC's training time
    budget = epochs * rows["kfac_ngvi"]["epoch_s"] / rows["advi"]["epoch_s"]
    advi_epochs = max(epochs, round(budget))
    svi = fresh["advi"]()
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
    # test metrics over fit seeds (minibatch order, weight noise): one seed's accuracy moves by a
    # few of the 360 test images between code versions that differ only in float rounding
    over_seeds = {}
    for name in ("kfac_ngvi", "advi"):
        first = {k: rows[name][k] for k in ("accuracy", "nll", "ece")}
        mets = [first] + [
            train(fresh[name](), epochs, seed).history[-1]._asdict() for seed in range(1, seeds)
        ]
        per = {k: [float(m[k]) for m in mets] for k in ("accuracy", "nll", "ece")}
        over_seeds[name] = {"per_seed": per, "mean": {k: float(np.mean(v)) for k, v in per.items()}}
    return rows, over_seeds


def _synthetic_model(X, y=None, batch_idx=None):
    xb, yb = X[batch_idx], y[batch_idx]
    logits = mlp(xb, (256, 10), prior_scale=1.0)
    with numpyro.plate("data", xb.shape[0]), numpyro.handlers.scale(scale=X.shape[0] / len(xb)):
        numpyro.sample("y", dist.Categorical(logits=logits), obs=yb)


def _breakdown(guide, engine, state, X, y, B: int, repeats: int) -> dict:
    """Milliseconds of the parts of one K-FAC step, each jitted alone (every array an argument:
    a closed-over one is a constant XLA may fold at compile time), fastest of ``repeats``."""
    from ngvi.engine.infer import StepContext

    p = dict(state.params)
    due = p["stat_step"] + guide.stats_every  # a statistics step
    p["inv_step"] = due  # ... with no inversion (the last one at this step)
    old = dict(p, inv_step=due - guide.inverse_every)  # ... and one with an inversion
    eps = guide.base_noise(jax.random.PRNGKey(3), 1)
    idx = jnp.arange(B)

    def context(X, eps, curv=None):
        data = ((X,), {"y": y, "batch_idx": idx})
        lal = lambda q: engine._neg_elbo_and_logp(q, eps, data, None)
        ctx = StepContext(eps, data, None, lambda q: lal(q)[0], jax.random.PRNGKey(4), curv)
        return lal, ctx

    def kfac_vg(q, X, eps):
        lal, ctx = context(X, eps)
        return guide.value_and_grad(lal, q, due, ctx)

    _, grad, curv = jax.jit(kfac_vg)(p, X, eps)

    def step_at(i):
        return lambda q, X, eps, g, c: guide.natural_step(q, g, 0.1, 0.0, i, context(X, eps, c)[1])

    parts = {
        "weight_noise_draw": (lambda q, X, eps: guide.base_noise(jax.random.PRNGKey(5), 1), p),
        "sampling_M_plus_SA_E_SGt": (lambda q, X, eps: guide.reparam(q, eps), p),
        "forward_neg_elbo_incl_sampling": (lambda q, X, eps: context(X, eps)[0](q)[0], p),
        "autodiff_value_and_grad": (
            lambda q, X, eps: jax.value_and_grad(lambda r: context(X, eps)[0](r)[0])(q),
            p,
        ),
        "kfac_value_and_grad_with_stats_pass": (kfac_vg, p),
        "natural_step_no_stats": (step_at(due - 1), p),
        "natural_step_with_stats": (step_at(due), p),
        "natural_step_with_stats_and_inversion": (step_at(due), old),
    }
    out = {}
    for name, (fn, q) in parts.items():
        args = (q, X, eps) + ((grad, curv) if name.startswith("natural") else ())
        out[name] = 1e3 * float(np.min(seconds(jax.jit(fn), *args, repeats=repeats)))
    return out


def synthetic(batch_sizes=(128, 2048), steps: int = 50, repeats: int = 5) -> dict:
    """784-256-10 MLP on random data (>2e5 weights): memory O(d + sum of factor sizes), and the
    steady-state step time against Adam and ADVI per batch size. Every method runs as a compiled
    scan of ``steps`` steps, warmed up past K-FAC's young-factor phase (``stats_every /
    stat_decay`` steps, in which every statistics update is inverted); the methods' epochs are
    timed interleaved, fastest of ``repeats``; a ``steps``-step epoch holds its share of
    statistics updates and inversions. "kfac_amortized" updates the factors every 10 steps and
    inverts them every 50; the "_eighth" variants estimate them on 1/8 of the minibatch
    (``stats_batch``). The amortized step's parts are timed at the largest batch."""
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    X = jax.random.normal(kx, (8192, 784))
    y = jnp.argmax(X @ jax.random.normal(kw, (784, 10)), -1)
    m = _synthetic_model
    out: dict = {"batch_sizes": {}}
    for B in batch_sizes:
        batches = list(minibatches(X.shape[0], B, np.random.default_rng(0)))
        idx = jnp.stack((batches * (steps // len(batches) + 1))[:steps])
        kfac = {
            "kfac_ngvi": KFACGuide(m),
            "kfac_amortized": KFACGuide(m, stats_every=10, inverse_every=50),
            "kfac_stats_eighth": KFACGuide(m, stats_batch=B // 8),
            "kfac_amortized_eighth": KFACGuide(
                m, stats_every=10, inverse_every=50, stats_batch=B // 8
            ),
        }
        engines = {k: bnn_engine(g) for k, g in kfac.items()}
        adam = optax.adam(0.01)
        engines["advi"] = SVI(m, AutoNormal(m), adam, Trace_ELBO())
        engines["map_adam"] = SVI(m, AutoDelta(m), adam, Trace_ELBO())
        runs, states = {}, {}
        for name, engine in engines.items():
            _, init, update, _, _ = _driver(engine)
            state = init(jax.random.PRNGKey(1), X, y=y, batch_idx=jnp.arange(B))
            runs[name] = _epoch_fn(update)
            g = kfac.get(name)
            warm = 0 if g is None else math.ceil(g.stats_every / g.stat_decay / steps) + 1
            for _ in range(warm + 1):  # the first compiles
                state, total = runs[name](state, X, y, idx)
            states[name] = jax.block_until_ready(state)
        calls = {k: (runs[k], (states[k], X, y, idx)) for k in engines}
        row = {
            k: {
                "step_ms": 1e3 * float(np.min(v)) / steps,
                "step_ms_median": 1e3 * float(np.median(v)) / steps,
            }
            for k, v in interleaved(calls, repeats).items()
        }
        for r in row.values():
            r["x_adam"] = r["step_ms"] / row["map_adam"]["step_ms"]
            r["x_advi"] = r["step_ms"] / row["advi"]["step_ms"]
        out["batch_sizes"][B] = row
    # the parts of the amortized guide's step (with stats_every=1 the statistics are computed
    # at every step, unconditionally)
    g, e, st = kfac["kfac_amortized"], engines["kfac_amortized"], states["kfac_amortized"]
    out["step_parts_ms"] = _breakdown(g, e, st, X, y, B, repeats)
    guide, state = kfac["kfac_ngvi"], states["kfac_ngvi"]
    out["step_parts_batch_size"] = B
    out["step_parts_adam_step_ms"] = row["map_adam"]["step_ms"]
    d = guide.target.dim
    factor_floats = sum(L.n_in**2 + L.n_out**2 for L in guide.layers)
    guide_floats = sum(int(np.size(v)) for v in state.params.values())
    # the means M (d floats) plus three copies of every factor (running A/G, their damped
    # inverses, the covariance roots) plus three scalar counters: O(d + sum of factor sizes)
    assert guide_floats == d + 3 * factor_floats + 3, (guide_floats, d, factor_floats)
    out.update(
        {
            "weights": d,
            "layers": [(L.name, L.n_in, L.n_out) for L in guide.layers],
            "factor_floats_per_matrix_kind": factor_floats,
            "guide_param_floats": guide_floats,
            "guide_param_MB": guide_floats * 4 / 2**20,
            "guide_param_floats_formula": "d + 3 * sum(n_in^2 + n_out^2) + 3",
            "guide_floats_over_d2": guide_floats / d**2,
            "dense_fisher_floats": d * d,
            "dense_fisher_GB": d * d * 4 / 2**30,
        }
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    out = {
        "device": str(jax.devices()[0]),
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
    }
    out["classifier"], out["classifier_over_seeds"] = classifier(
        a.epochs, a.batch_size, a.repeats, a.seeds
    )
    out["synthetic"] = synthetic()
    print(f"digits BNN 64-32-10, {a.epochs} epochs, batch {a.batch_size} ({out['device']})")
    cols = ("epoch s", "x Adam", "median", "acc", "NLL", "ECE")
    print(f"{'method':<17} " + " ".join(f"{c:>7}" for c in cols))
    for name, r in out["classifier"].items():
        metrics = [r.get(k, float("nan")) for k in ("accuracy", "nll", "ece")]
        print(
            f"{name:<17} {r['epoch_s']:8.4f} {r['time_ratio_vs_adam']:7.2f} "
            f"{r['median_time_ratio_vs_adam']:7.2f} " + " ".join(f"{m:6.3f}" for m in metrics)
        )
    for name, r in out["classifier_over_seeds"].items():
        mean = r["mean"]
        print(
            f"{name} over {a.seeds} seeds: acc {mean['accuracy']:.3f} NLL {mean['nll']:.3f} "
            f"ECE {mean['ece']:.3f} (acc per seed {np.round(r['per_seed']['accuracy'], 3)})"
        )
    s = out["synthetic"]
    print(
        f"synthetic 784-256-10: {s['weights']} weights, guide params {s['guide_param_MB']:.1f} MB "
        f"(dense Fisher would be {s['dense_fisher_GB']:.0f} GB)"
    )
    for B, row in s["batch_sizes"].items():
        print(
            f"  batch {B}: "
            + ", ".join(
                f"{k} {r['step_ms']:.1f} ms ({r['x_adam']:.2f}x Adam)" for k, r in row.items()
            )
        )
    print(
        f"  parts of a kfac_amortized step at batch {s['step_parts_batch_size']} (ms; Adam step "
        f"{s['step_parts_adam_step_ms']:.1f}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in s["step_parts_ms"].items())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
