"""NGVI beside ADVI on one model, measured honestly (see ``ngvi.scoring``).

Every method is run in jitted scanned chunks of ``every`` steps; after each chunk its variational
parameters are scored by ONE common-random-numbers ELBO. The reference is the mean-field family
optimum (BFGS on the same scorer), and a method "reaches" it at the first checkpoint after which
every later one stays within ``tol`` nats. Seconds exclude compilation: the first chunk's extra
time is reported apart as compile time.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from ngvi.baselines import advi_flat
from ngvi.guides import MeanFieldGaussian
from ngvi.infer import NGVI, _join_data, _split_data
from ngvi.scoring import first_touch, make_elbo_scorer, meanfield_optimum, steps_to_within

__all__ = ["MethodTrace", "trace_ngvi", "trace_advi", "compare_vi"]


class MethodTrace(NamedTuple):
    method: str
    settings: dict
    steps: np.ndarray  # (C,) step count at each checkpoint
    elbo: np.ndarray  # (C,) common-random-numbers ELBO of the parameters there
    step_seconds: float  # wall-clock per step, compile excluded (median over chunks)
    compile_seconds: float
    grad_evals_per_step: int  # gradient evaluations of log p per step
    loc: Any  # final flat (loc, scale)
    scale: Any


def _time_chunks(run_chunk: Callable, state, num_chunks: int, read: Callable):
    """Run ``num_chunks`` chunks, reading (loc, scale) after each; returns the per-chunk times."""
    locs, scales, times = [], [], []
    for _ in range(num_chunks):
        t0 = time.perf_counter()
        state = jax.block_until_ready(run_chunk(state))
        times.append(time.perf_counter() - t0)
        loc, scale = read(state)
        locs.append(loc)
        scales.append(scale)
    return state, jnp.stack(locs), jnp.stack(scales), np.asarray(times)


def _finish(method, settings, every, times, locs, scales, scorer, grad_evals) -> MethodTrace:
    steady = float(np.median(times[1:])) if len(times) > 1 else float(times[0])
    elbo = np.asarray(scorer(locs, scales))
    steps = every * np.arange(1, len(times) + 1)
    return MethodTrace(
        method,
        settings,
        steps,
        elbo,
        steady / every,
        max(float(times[0]) - steady, 0.0),
        grad_evals,
        locs[-1],
        scales[-1],
    )


def trace_ngvi(model, args, kwargs, num_steps: int, every: int, scorer, rng_key=None, **engine_kw):
    """Mean-field NGVI with its defaults (or ``engine_kw``), checkpointed every ``every`` steps."""
    guide = MeanFieldGaussian(model)
    engine = NGVI(model, guide, **engine_kw)
    state = engine.init(jax.random.PRNGKey(0) if rng_key is None else rng_key, *args, **kwargs)
    dynamic, spec = _split_data(args, kwargs)
    fn = engine._compiled("run", spec, every)
    tol = jnp.asarray(-1.0)

    def run_chunk(s):
        return fn(s, dynamic, tol, s.step + every)[0]

    def read(s):
        p = engine.get_params(s)
        return p["loc"], p["scale"]

    state, locs, scales, times = _time_chunks(run_chunk, state, num_steps // every, read)
    p = engine.num_particles
    return _finish(
        "ngvi", {"lr": engine.lr, "num_particles": p}, every, times, locs, scales, scorer, 2 * p
    )


def trace_advi(
    model, args, kwargs, num_steps, every, scorer, target, lr=0.01, num_particles=1, rng_key=None
):
    """NumPyro ADVI (AutoNormal + optax Adam + Trace_ELBO), checkpointed every ``every`` steps."""
    svi = SVI(
        model,
        AutoNormal(model, init_scale=0.1),
        optax.adam(lr),
        Trace_ELBO(num_particles=num_particles),
    )
    state = svi.init(jax.random.PRNGKey(0) if rng_key is None else rng_key, *args, **kwargs)
    dynamic, spec = _split_data(args, kwargs)

    @jax.jit
    def chunk(s, dyn):
        a, k = _join_data(dyn, spec)
        return jax.lax.scan(lambda st, _: (svi.update(st, *a, **k)[0], None), s, None, every)[0]

    def read(s):
        return advi_flat(target, svi.get_params(s))

    state, locs, scales, times = _time_chunks(
        lambda s: chunk(s, dynamic), state, num_steps // every, read
    )
    return _finish(
        "advi",
        {"lr": lr, "num_particles": num_particles},
        every,
        times,
        locs,
        scales,
        scorer,
        num_particles,
    )


def summarize(trace: MethodTrace, best: float, tol: float = 0.1) -> dict:
    """One table row: final ELBO, steps / seconds / gradient evaluations to stay within tol."""
    stay = steps_to_within(trace.elbo, best, tol, trace.steps)
    touch = first_touch(trace.elbo, best, tol, trace.steps)
    return {
        "method": trace.method,
        **{k: v for k, v in trace.settings.items()},
        "final_elbo": float(trace.elbo[-1]),
        "gap_nats": float(best - trace.elbo[-1]),
        f"steps_to_{tol}": stay,
        "first_touch": touch,
        f"seconds_to_{tol}": None if stay is None else stay * trace.step_seconds,
        f"grad_evals_to_{tol}": None if stay is None else stay * trace.grad_evals_per_step,
        "ms_per_step": 1e3 * trace.step_seconds,
        "compile_s": trace.compile_seconds,
    }


def compare_vi(
    model: Callable,
    *args,
    ngvi_steps: int = 1000,
    advi_steps: int = 10000,
    advi_lrs: tuple = (0.01,),
    advi_particles: tuple = (1,),
    every: int = 10,
    tol: float = 0.1,
    rng_key=None,
    **kwargs,
) -> tuple[list[dict], dict]:
    """NGVI (defaults, no tuning) against ADVI over a grid of learning rates x particles.

    Returns (rows, extras): one summary row per run, the best ADVI configuration flagged, and
    extras with the traces and the family optimum used as the reference."""
    guide = MeanFieldGaussian(model)
    target = guide.setup(jax.random.PRNGKey(0), args, kwargs)
    scorer = make_elbo_scorer(target, args, kwargs)
    traces = [trace_ngvi(model, args, kwargs, ngvi_steps, every, scorer, rng_key)]
    advi_every = max(every, advi_steps // 400)
    for lr in advi_lrs:
        for p in advi_particles:
            traces.append(
                trace_advi(
                    model, args, kwargs, advi_steps, advi_every, scorer, target, lr, p, rng_key
                )
            )
    start = max(traces, key=lambda t: t.elbo[-1] if np.isfinite(t.elbo[-1]) else -np.inf)
    _, _, opt = meanfield_optimum(scorer, start.loc, start.scale)
    best = max([opt] + [float(np.nanmax(t.elbo)) for t in traces])
    rows = [summarize(t, best, tol) for t in traces]
    _flag_best_advi(rows, tol)
    return rows, {"traces": traces, "best_elbo": best, "dim": target.dim}


def _flag_best_advi(rows: list[dict], tol: float) -> None:
    key = f"steps_to_{tol}"
    advi = [r for r in rows if r["method"] == "advi"]
    for r in rows:
        r["best_advi"] = False
    done = [r for r in advi if r[key] is not None]
    pick = (
        min(done, key=lambda r: r[f"seconds_to_{tol}"])
        if done
        else (max(advi, key=lambda r: r["final_elbo"]) if advi else None)
    )
    if pick is not None:
        pick["best_advi"] = True


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (no extra dependency)."""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, "-" * len(line), *body])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
