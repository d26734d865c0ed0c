"""Particles against steps, cost per step and time to 0.1 nat on the ``bench_gym`` targets.

On the targets of ``bench_gym`` (same models, scorers and family optima: run that first), NGVI's
defaults are traced with ``num_particles`` K = 4, 8 (the default), 16 and 32, every other setting
left alone. For each K: steps to stay within 0.1 nat of the family optimum (per seed, three
seeds), the cost of a step (compiled scans of the same length, the K variants interleaved in one
process, fastest of ``REPS``) and the time to 0.1 nat (the warm start's steady-state seconds plus
the median steps times the cost of a step). Where the Monte Carlo noise of the Stein precision is
what the fit waits for, steps times particles is about constant and the time to 0.1 nat hardly
depends on K; the fixed cost of a step (two passes over the model and the bookkeeping) is paid
per step, so more particles can even be faster. Prints a table and writes
benchmarks/results/gym_particles.json.

    python benchmarks/bench_particles.py [target ...]   # run (those targets), write the JSON
    python benchmarks/bench_particles.py --md            # the markdown table of the saved JSON
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import bench_gym as gym
import jax
import jax.numpy as jnp
import numpy as np

from ngvi import NGVI, MeanFieldGaussian
from ngvi.model.target import split_data
from ngvi.report.comparison import trace_ngvi
from ngvi.report.scoring import make_elbo_scorer, steps_to_within

PARTICLES = (4, 8, 16, 32)
SEEDS = (0, 1, 2)
REPS = 15  # interleaved timing rounds
RESULTS = Path(__file__).parent / "results"


def step_costs(model, args, kwargs, particles, length: int, reps: int = REPS) -> list[float]:
    """Milliseconds a step for each K: a compiled scan of ``length`` steps from the same start,
    the K variants run in turn ``reps`` times, the fastest of each."""
    dynamic, spec = split_data(args, kwargs)
    tol = jnp.asarray(-1.0)
    runs = []
    for k in particles:
        engine = NGVI(model, MeanFieldGaussian(model), num_particles=k)
        state = engine.init(jax.random.PRNGKey(0), *args, **kwargs)
        fn = engine._compiled("run", spec, length)
        jax.block_until_ready(fn(state, dynamic, tol, state.step + length))  # compile
        runs.append((fn, state))
    best = [np.inf] * len(particles)
    for _ in range(reps):
        for i, (fn, state) in enumerate(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, dynamic, tol, state.step + length))
            best[i] = min(best[i], (time.perf_counter() - t0) / length * 1e3)
    return best


def run_target(name: str, best_elbo: float) -> dict:
    steps = gym.SETTINGS[name][0]
    every = max(1, steps // 200)
    model, args, kwargs = gym.load(name)
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    scorer = gym.exact_scorer(name, target, args, kwargs) or make_elbo_scorer(target, args, kwargs)
    rows = []
    for k in PARTICLES:
        per_seed, start_s = [], []
        for seed in SEEDS:
            trace = trace_ngvi(
                model,
                args,
                kwargs,
                steps,
                every,
                scorer,
                jax.random.PRNGKey(seed),
                1,
                num_particles=k,
            )
            per_seed.append(steps_to_within(trace.elbo, best_elbo, 0.1, trace.steps))
            start_s.append(trace.start_seconds)
        rows.append({"num_particles": k, "steps_to_0.1": per_seed, "start_s": min(start_s)})
    costs = step_costs(model, args, kwargs, PARTICLES, min(200, steps))
    for row, ms in zip(rows, costs):
        reached = [s for s in row["steps_to_0.1"] if s is not None]
        row["ms_per_step"] = ms
        row["median_steps"] = float(np.median(reached)) if len(reached) == len(SEEDS) else None
        row["ms_to_0.1"] = (
            None if row["median_steps"] is None else 1e3 * row["start_s"] + row["median_steps"] * ms
        )
    return {"dim": target.dim, "best_elbo": best_elbo, "max_steps": steps, "rows": rows}


def markdown(results: dict) -> str:
    """One row per target: steps to 0.1 nat (three seeds) / ms a step / ms to 0.1 nat per K."""
    head = "| target | d | " + " | ".join(f"K = {k}" for k in PARTICLES) + " |\n|---|---|"
    lines = [head + "---|" * len(PARTICLES)]
    for name, res in results.items():
        cells = []
        for r in res["rows"]:
            seeds = "/".join("-" if s is None else str(s) for s in r["steps_to_0.1"])
            to = "-" if r["ms_to_0.1"] is None else f"{r['ms_to_0.1']:.3g} ms"
            cells.append(f"{seeds} steps, {r['ms_per_step'] * 1e3:.0f} us/step, {to}")
        lines.append(f"| {name} | {res['dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = RESULTS / "gym_particles.json"
    if "--md" in argv:
        print(markdown(json.loads(path.read_text())["targets"]))
        return
    gym_results = json.loads((RESULTS / "gym.json").read_text())["targets"]
    names = [a for a in argv if not a.startswith("--")] or list(gym.SETTINGS)
    saved = json.loads(path.read_text()) if path.exists() else {}
    out = saved.get("targets", {})
    meta = {"jax": jax.__version__, "platform": platform.platform(), "seeds": list(SEEDS)}
    meta["protocol"] = __doc__.split("\n\n")[1]
    for name in names:
        t0 = time.perf_counter()
        out[name] = run_target(name, gym_results[name]["best_elbo"])
        meta["date"] = time.strftime("%Y-%m-%d")
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        ordered = {n: out[n] for n in gym.SETTINGS if n in out}
        path.write_text(json.dumps({"meta": meta, "targets": ordered}, indent=2))
    print(markdown({n: out[n] for n in gym.SETTINGS if n in out}))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
