"""The noise floor: how few steps the Monte Carlo estimates of a natural step allow, on the
``bench_gym`` targets, whatever the rest of the method does.

Every mean-field NGVI step estimates, from K draws of its default noise (antithetic pairs,
moment-matched; plain draws for odd K), the ELBO gradient ``g = mean_k grad log p(z_k)`` and
the Stein/Price precision ``h = -mean_k grad log p(z_k) eps_k / scale``. An oracle that starts
at the family optimum ``(loc*, scale*)`` and averages T such estimates made *there*, uniformly
(the least-variance unbiased linear average of independent estimates), fits

    loc_T = loc* + (mean_t g_t - E[g]) / s*,      s_T = s* mean_t h_t / E[h],      s* = scale*^-2

(one unit natural step from the optimum on the averaged estimates; ``E[.]`` are the long-run means
of all the estimates made, so only the estimates' noise moves the oracle, not the scorer's own
error in ``(loc*, scale*)``). Its ELBO gap, measured by the scorer ``bench_gym`` uses (exact where
the target has one, else its common-random-numbers ELBO), is a floor for every method that spends
K draws a step on these estimates: a real fit starts elsewhere, weights estimates made at worse
points and cannot average uniformly without knowing where it will end. The script reports, for
each K, the oracle's mean gap over ``REPLICATES`` after 200 steps and the fewest steps on a
grid after which it is within 0.1 nat, beside what NGVI's defaults needed (``gym.json``,
``gym_particles.json``). Where the floor for K = 8 is above 200 steps, "within 0.1 nat in 200
steps with the default particles" cannot be met by averaging better: it needs more draws a step
or another estimator (issue #19). Prints a table and writes benchmarks/results/gym_noise_floor.json.

    python benchmarks/bench_noise_floor.py [target ...]   # run (those targets), write the JSON
    python benchmarks/bench_noise_floor.py --md            # the markdown table of the saved JSON
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path

import bench_gym as gym
import jax
import jax.numpy as jnp
import numpy as np

from ngvi import NGVI, MeanFieldGaussian
from ngvi.report.scoring import crn_noise, make_elbo_scorer, meanfield_optimum

PARTICLES = (1, 2, 8, 32)
GRID = (25, 50, 75, 100, 125, 150, 175, 200, 250, 300, 400, 600, 800, 1200, 1600)  # scored
REPLICATES = 8
TOL = 0.1
DRAWS_AT_ONCE = 1024  # draws whose gradients are computed in one batch
RESULTS = Path(__file__).parent / "results"


def family_optimum(name: str, model, args, kwargs, guide, scorer):
    """``(loc*, scale*, ELBO*)``: a default NGVI run polished by BFGS on the scorer (as
    ``ngvi.report.comparison.compare_vi`` polishes the best of its runs)."""
    steps = gym.SETTINGS[name][0] * 4
    with warnings.catch_warnings():  # a fit stopped by its budget: BFGS finishes it
        warnings.simplefilter("ignore")
        fit = NGVI(model, guide).run(
            jax.random.PRNGKey(0), steps, *args, progress_bar=False, **kwargs
        )
    return meanfield_optimum(scorer, fit.params["loc"], fit.params["scale"])


def estimates(guide, args, kwargs, loc, scale, k: int, steps: int, key) -> tuple:
    """``(g, h)``, each (REPLICATES, steps, d): one step's estimates per replicate and step, all
    made at ``(loc, scale)`` on fresh noise."""
    target = guide.target
    grad = jax.vmap(jax.grad(lambda z: target.log_density(z, args, kwargs)))

    def one(key):
        eps = guide.base_noise(key, k)
        g = grad(loc + scale * eps)
        return jnp.mean(g, 0), -jnp.mean(g * eps, 0) / scale

    # steps estimated at once (a divisor of steps), to bound memory
    chunk = max(c for c in range(1, steps + 1) if steps % c == 0 and c * k <= DRAWS_AT_ONCE)
    keys = jax.random.split(key, REPLICATES * steps).reshape(-1, chunk, 2)
    g, h = jax.jit(lambda ks: jax.lax.map(jax.vmap(one), ks))(keys)
    return g.reshape(REPLICATES, steps, -1), h.reshape(REPLICATES, steps, -1)


def oracle_gaps(scorer, loc, scale, g, h, best: float) -> dict[int, list[float]]:
    """Gap of the oracle fit after T steps, per replicate, for T in GRID."""
    s = scale**-2.0
    g_bar, h_bar = jnp.mean(g, (0, 1)), jnp.mean(h, (0, 1))
    out = {}
    for t in GRID:
        locs = loc + (jnp.mean(g[:, :t], 1) - g_bar) / s
        scales = (s * jnp.mean(h[:, :t], 1) / h_bar) ** -0.5
        out[t] = [best - float(e) for e in np.asarray(scorer(locs, scales))]
    return out


def run_target(name: str) -> dict:
    model, args, kwargs = gym.load(name)
    guide = MeanFieldGaussian(model)
    target = guide.setup(jax.random.PRNGKey(0), args, kwargs)
    scorer = gym.exact_scorer(name, target, args, kwargs) or make_elbo_scorer(
        target, args, kwargs, crn_noise(target.dim)
    )
    loc, scale, best = family_optimum(name, model, args, kwargs, guide, scorer)
    rows = []
    for i, k in enumerate(PARTICLES):
        g, h = estimates(guide, args, kwargs, loc, scale, k, GRID[-1], jax.random.PRNGKey(i))
        gaps = oracle_gaps(scorer, loc, scale, g, h, best)
        mean = {t: float(np.mean(v)) for t, v in gaps.items()}  # NaN: a negative precision
        mean = {t: m if np.isfinite(m) else None for t, m in mean.items()}
        ok = {t: m is not None and m <= TOL for t, m in mean.items()}
        within = [t for t in GRID if all(ok[u] for u in GRID if u >= t)]
        rows.append(
            {
                "num_particles": k,
                "mean_gap": mean,
                "gap_at_200": mean[200],
                "floor_steps": within[0] if within else None,  # None: above the grid
            }
        )
    return {"dim": target.dim, "best_elbo": best, "rows": rows}


def _ngvi_steps(name: str) -> dict[int, object]:
    """Median steps to 0.1 nat of NGVI's defaults per K, from the saved benchmarks."""
    out: dict[int, object] = {}
    gym_json, particles = RESULTS / "gym.json", RESULTS / "gym_particles.json"
    if particles.exists():
        for row in json.loads(particles.read_text())["targets"].get(name, {}).get("rows", []):
            out[row["num_particles"]] = row["median_steps"]
    if gym_json.exists():
        summary = {r["target"]: r for r in json.loads(gym_json.read_text())["summary"]}
        if name in summary:
            out[8] = summary[name]["ngvi_steps"]
    return out


def markdown(results: dict) -> str:
    """Per target and K: the oracle's floor (steps) / its gap after 200 steps / NGVI's steps."""
    head = "| target | d | " + " | ".join(f"K = {k}" for k in PARTICLES) + " |\n|---|---|"
    lines = [head + "---|" * len(PARTICLES)]
    for name, res in results["targets"].items():
        ngvi = _ngvi_steps(name)
        cells = []
        for row in res["rows"]:
            floor = row["floor_steps"]
            floor = f"> {GRID[-1]}" if floor is None else f"{floor}"
            steps = ngvi.get(row["num_particles"])
            steps = "-" if steps is None else f"{steps:.0f}"
            gap = row["gap_at_200"]
            gap = "-" if gap is None else f"{gap:.3g}"
            cells.append(f"{floor} / {gap} / {steps}")
        lines.append(f"| {name} | {res['dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = RESULTS / "gym_noise_floor.json"
    if "--md" in argv:
        print(markdown(json.loads(path.read_text())))
        return
    names = [a for a in argv if not a.startswith("--")] or list(gym.SETTINGS)
    saved = json.loads(path.read_text()) if path.exists() else {}
    out = saved.get("targets", {})
    meta = {"jax": jax.__version__, "platform": platform.platform(), "grid": GRID}
    meta["replicates"] = REPLICATES
    for name in names:
        t0 = time.perf_counter()
        out[name] = run_target(name)
        out[name]["seconds"] = time.perf_counter() - t0
        meta["date"] = time.strftime("%Y-%m-%d")
        ordered = {n: out[n] for n in gym.SETTINGS if n in out}
        path.write_text(json.dumps({"meta": meta, "targets": ordered}, indent=2))
        print(f"{name}: d = {out[name]['dim']} ({out[name]['seconds']:.0f} s)", flush=True)
    print(markdown(json.loads(path.read_text())))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
