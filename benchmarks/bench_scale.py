"""Scale: mean-field NGVI with 1e6 latent dimensions, and on 1e6 rows on 1 and 4 devices.

Cases, each in its own subprocess (so peak memory is per case and the XLA device flag can differ):

* ``means``: a hierarchical normal-means model, ``mu ~ N(0, 10)``, ``tau ~ HalfNormal(1)``,
  ``theta_i ~ N(mu, tau)``, ``y_i ~ N(theta_i, 1)``, i = 1..1e6: 1e6 + 2 latent dimensions.
* ``logistic``: Bayesian logistic regression, 1e6 rows x 10 features (+ intercept), one device.
* ``logistic_sharded``: the same data put on a 4-device mesh with ``ngvi.shard_data`` in a
  process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (four XLA CPU
  devices sharing this machine's cores: it measures the partitioning overhead, not a speed-up
  you would get from four real devices).

Per case: setup seconds (``NGVI.init``: tracing, checks, initial point), compile seconds (first
``NGVI.update`` minus one steady step), seconds per step (median of ``--steps`` further
``update`` calls, each blocked until ready; NGVI's default 8 antithetic particles, float32), and
peak resident memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the case's process at
the end, and the same right after ``import jax`` (the runtime's own share). The sharded and
one-device logistic runs start from the same seed; their parameters after the timed steps are
compared. Prints a table and writes benchmarks/results/scale.json.

    python benchmarks/bench_scale.py [--size 1000000] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale.json"
CASES = {"means": 1, "logistic": 1, "logistic_sharded": 4}  # case -> XLA CPU devices
FEATURES = 10


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _problem(case: str, n: int):
    """(model, args, kwargs) of a case, data drawn from a fixed seed."""
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    rng = np.random.default_rng(0)
    if case == "means":

        def model(y):
            mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
            tau = numpyro.sample("tau", dist.HalfNormal(1.0))
            with numpyro.plate("i", y.shape[0]):
                theta = numpyro.sample("theta", dist.Normal(mu, tau))
                numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)

        y = (1.0 + 0.5 * rng.normal(size=n) + rng.normal(size=n)).astype(np.float32)
        return model, (y,), {}

    def model(X, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)

    X = rng.normal(size=(n, FEATURES)).astype(np.float32)
    w_true = rng.normal(size=FEATURES) / np.sqrt(FEATURES)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ w_true - 0.5)))).astype(np.float32)
    return model, (X,), {"y": y}


def child(case: str, n: int, steps: int, params_out: str | None) -> dict:
    """Run one case in this process and return its measurements."""
    import jax
    import numpy as np

    rss_runtime = _rss_mb()
    import ngvi

    model, args, kwargs = _problem(case, n)
    if case.endswith("sharded"):
        args, kwargs = ngvi.shard_data(args, kwargs)
        sharded_over = len(args[0].sharding.device_set)
    else:
        sharded_over = 1
    engine = ngvi.NGVI(model, ngvi.MeanFieldGaussian(model))
    t0 = time.perf_counter()
    state = jax.block_until_ready(engine.init(jax.random.PRNGKey(0), *args, **kwargs))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, loss0 = jax.block_until_ready(engine.update(state, *args, **kwargs))
    first = time.perf_counter() - t0
    times, losses = [], [float(loss0)]
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = jax.block_until_ready(engine.update(state, *args, **kwargs))
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    cpu = (time.process_time() - cpu0) / steps
    step = float(np.median(times))
    if params_out:
        np.savez(params_out, **{k: np.asarray(v) for k, v in state.params.items()})
    return {
        "case": case,
        "devices": len(jax.devices()),
        "sharded_over": sharded_over,
        "latent_dim": int(engine.guide.target.dim),
        "rows": int(np.shape(args[0])[0]),
        "setup_s": setup,
        "compile_s": max(first - step, 0.0),
        "step_s": step,
        "step_s_min": float(np.min(times)),
        "cpu_s_per_step": cpu,
        "steps_timed": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "rejected": int(state.num_rejected),
        "peak_rss_mb": _rss_mb(),
        "rss_after_import_jax_mb": rss_runtime,
    }


def run_case(case: str, n: int, steps: int, params_out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    if CASES[case] > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={CASES[case]}"
    else:
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, __file__, "--child", case, "--size", str(n), "--steps", str(steps)]
    proc = subprocess.run(cmd + ["--params-out", params_out], env=env, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr.decode()[-3000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--child", choices=sorted(CASES))
    ap.add_argument("--params-out")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.size, a.steps, a.params_out)))
        return
    import numpy as np

    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = [run_case(c, a.size, a.steps, str(tmp / f"ngvi_scale_{c}.npz")) for c in CASES]
    one, four = (np.load(tmp / f"ngvi_scale_{c}.npz") for c in ("logistic", "logistic_sharded"))
    diff = {k: float(np.max(np.abs(one[k] - four[k]))) for k in one.files}
    by = {r["case"]: r for r in rows}
    ratio = by["logistic_sharded"]["step_s"] / by["logistic"]["step_s"]
    cpu_ratio = by["logistic_sharded"]["cpu_s_per_step"] / by["logistic"]["cpu_s_per_step"]
    print(
        f"{'case':<18}{'dim':>10}{'rows':>10}{'dev':>5}{'setup s':>9}{'compile s':>11}"
        f"{'ms/step':>10}{'cpu ms':>8}{'peak MB':>9}{'jax MB':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:<18}{r['latent_dim']:>10}{r['rows']:>10}{r['sharded_over']:>5}"
            f"{r['setup_s']:>9.2f}{r['compile_s']:>11.2f}{1e3 * r['step_s']:>10.1f}"
            f"{1e3 * r['cpu_s_per_step']:>8.0f}{r['peak_rss_mb']:>9.0f}"
            f"{r['rss_after_import_jax_mb']:>8.0f}"
        )
    print(
        f"sharded (4 devices) / one device, time per step: {ratio:.2f} (CPU time {cpu_ratio:.2f}); "
        f"max |param difference| after {a.steps + 1} steps: {max(diff.values()):.2e}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "cases": rows,
                "sharded_vs_one_device_step_ratio": ratio,
                "sharded_vs_one_device_cpu_ratio": cpu_ratio,
                "sharded_vs_one_device_max_abs_param_diff": diff,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "memory": "peak RSS = getrusage(RUSAGE_SELF).ru_maxrss of the case's own process",
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
