"""NGVI beside ADVI on one model, measured honestly (see ``ngvi.report.scoring``).

Every method is run in jitted scanned chunks of ``every`` steps; after each chunk its variational
parameters are scored by ONE common-random-numbers ELBO. The reference is the mean-field family
optimum (BFGS on the same scorer), and a method "reaches" it at the first checkpoint after which
every later one stays within ``tol`` nats. Seconds exclude compilation: the first chunk's extra
time is reported apart as compile time.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from ngvi.engine.infer import NGVI
from ngvi.errors import ConfigError
from ngvi.guides.meanfield import MeanFieldGaussian
from ngvi.model.target import join_data as _join_data
from ngvi.model.target import split_data as _split_data
from ngvi.report.baselines import advi_flat
from ngvi.report.scoring import (
    crn_noise,
    first_touch,
    make_elbo_scorer,
    meanfield_optimum,
    steps_to_within,
)

__all__ = [
    "MethodTrace",
    "trace_grad_evals",
    "trace_seconds",
    "trace_ngvi",
    "trace_advi",
    "compare_vi",
    "compare",
    "verdicts",
]


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
    #: the start's cost before step 1 (NGVI's quasi-Newton warm start: gradient evaluations,
    #: line search included; forward evaluations of its scoring; seconds, compile excluded);
    #: 0 for ADVI
    start_grad_evals: int = 0
    start_forward_evals: int = 0
    start_seconds: float = 0.0


def _checkpoints(run_chunk: Callable, state, num_chunks: int, read: Callable):
    """Run ``num_chunks`` chunks, reading the flat (loc, scale) at the start and after each."""
    loc, scale = read(state)
    locs, scales = [loc], [scale]
    for _ in range(num_chunks):
        state = run_chunk(state)
        loc, scale = read(state)
        locs.append(loc)
        scales.append(scale)
    return state, jnp.stack(locs), jnp.stack(scales)


def _time_steps(make_chunk: Callable, state, length: int, reps: int = 5):
    """Seconds per step of a compiled scan of ``length`` steps (median of ``reps``) and the
    compile time (the first call's excess over the median)."""
    chunk = make_chunk(length)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(chunk(state))
        times.append(time.perf_counter() - t0)
    steady = float(np.median(times[1:]))
    return steady / length, max(times[0] - steady, 0.0)


def _finish(
    method, settings, every, locs, scales, scorer, grad_evals, timing, start=(0, 0, 0.0)
) -> MethodTrace:
    elbo = np.asarray(scorer(locs, scales))
    steps = every * np.arange(len(locs))  # 0: the start
    per_step, compile_s = timing
    return MethodTrace(
        method, settings, steps, elbo, per_step, compile_s, grad_evals, locs[-1], scales[-1], *start
    )


def trace_ngvi(
    model,
    args,
    kwargs,
    num_steps: int,
    every: int,
    scorer,
    rng_key=None,
    time_steps=200,
    **engine_kw,
):
    """Mean-field NGVI with its defaults (or ``engine_kw``), checkpointed every ``every`` steps;
    the time per step comes from a separate compiled scan of ``time_steps`` steps."""
    guide = MeanFieldGaussian(model)
    guide._start_timing_runs = 5  # the warm start timed in steady state, as the steps are
    engine = NGVI(model, guide, **engine_kw)
    state = engine.init(jax.random.PRNGKey(0) if rng_key is None else rng_key, *args, **kwargs)
    dynamic, spec = _split_data(args, kwargs)
    tol = jnp.asarray(-1.0)

    def make_chunk(length):
        fn = engine._compiled("run", spec, length)
        return lambda s: fn(s, dynamic, tol, s.step + length)[0]

    def read(s):
        p = engine.get_params(s)
        return p["loc"], p["scale"]

    timing = _time_steps(make_chunk, state, min(time_steps, num_steps))
    _, locs, scales = _checkpoints(make_chunk(every), state, num_steps // every, read)
    p = engine.num_particles
    settings = {"lr": engine.lr, "num_particles": p}
    path = guide.start_path
    start = (0, 0, 0.0) if path is None else (path.grad_evals, path.forward_evals, path.seconds)
    return _finish("ngvi", settings, every, locs, scales, scorer, 2 * p, timing, start)


def trace_advi(
    model,
    args,
    kwargs,
    num_steps,
    every,
    scorer,
    target,
    lr=0.01,
    num_particles=1,
    rng_key=None,
    time_steps=200,
):
    """NumPyro ADVI (AutoNormal + optax Adam + Trace_ELBO), checkpointed every ``every`` steps;
    timed like ``trace_ngvi``."""
    svi = SVI(
        model,
        AutoNormal(model, init_scale=0.1),
        optax.adam(lr),
        Trace_ELBO(num_particles=num_particles),
    )
    state = svi.init(jax.random.PRNGKey(0) if rng_key is None else rng_key, *args, **kwargs)
    dynamic, spec = _split_data(args, kwargs)

    def make_chunk(length):
        @jax.jit
        def chunk(s, dyn):
            a, k = _join_data(dyn, spec)
            body = lambda st, _: (svi.update(st, *a, **k)[0], None)
            return jax.lax.scan(body, s, None, length)[0]

        return lambda s: chunk(s, dynamic)

    def read(s):
        return advi_flat(target, svi.get_params(s))

    timing = _time_steps(make_chunk, state, min(time_steps, num_steps))
    _, locs, scales = _checkpoints(make_chunk(every), state, num_steps // every, read)
    settings = {"lr": lr, "num_particles": num_particles}
    return _finish("advi", settings, every, locs, scales, scorer, num_particles, timing)


def trace_seconds(trace: MethodTrace, steps: int) -> float:
    """Wall-clock of the start and ``steps`` steps (compile excluded)."""
    return trace.start_seconds + steps * trace.step_seconds


def trace_grad_evals(trace: MethodTrace, steps: int) -> int:
    """Log-density evaluations of the start and ``steps`` steps, gradients and forward ones
    alike (NGVI's accept test and its warm start's scoring are forward evaluations)."""
    start = trace.start_grad_evals + trace.start_forward_evals
    return start + steps * trace.grad_evals_per_step


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
        f"seconds_to_{tol}": None if stay is None else trace_seconds(trace, stay),
        f"grad_evals_to_{tol}": None if stay is None else trace_grad_evals(trace, stay),
        "start_grad_evals": trace.start_grad_evals,
        "start_forward_evals": trace.start_forward_evals,
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
    every: int | None = None,
    tol: float = 0.1,
    rng_key=None,
    score_draws: int = 4096,
    advi_checkpoints: int = 400,
    scorer: Callable | None = None,
    **kwargs,
) -> tuple[list[dict], dict]:
    """NGVI (defaults, no tuning) against ADVI over a grid of learning rates x particles.

    Every checkpoint (200 of NGVI's run unless ``every`` is given, ``advi_checkpoints`` of each
    ADVI run) is scored by one fixed-noise ELBO of ``score_draws`` antithetic draws, or by
    ``scorer`` (``score(loc, scale, noise=None) -> ELBO``, e.g. an exact ELBO where the target
    has one: no Monte Carlo error and no optimum fitted to the scorer's own draws). Returns
    (rows, extras): one summary row per run, the best ADVI configuration flagged, and extras with
    the traces and the family optimum used as the reference."""
    guide = MeanFieldGaussian(model)
    target = guide.setup(jax.random.PRNGKey(0), args, kwargs)
    given = scorer is not None
    if not given:
        scorer = make_elbo_scorer(target, args, kwargs, crn_noise(target.dim, score_draws))
    every = every or max(1, ngvi_steps // 200)
    traces = [trace_ngvi(model, args, kwargs, ngvi_steps, every, scorer, rng_key)]
    advi_every = max(every, advi_steps // advi_checkpoints)
    for lr in advi_lrs:
        for p in advi_particles:
            traces.append(
                trace_advi(
                    model, args, kwargs, advi_steps, advi_every, scorer, target, lr, p, rng_key
                )
            )
    start = max(traces, key=lambda t: t.elbo[-1] if np.isfinite(t.elbo[-1]) else -np.inf)
    loc, scale, opt = meanfield_optimum(scorer, start.loc, start.scale)
    best = max([opt] + [float(np.nanmax(t.elbo)) for t in traces])
    rows = [summarize(t, best, tol) for t in traces]
    _flag_best_advi(rows, tol)
    # how much the optimum fitted the scorer's own noise: its ELBO on independent draws (none
    # for a given scorer: its draws, if any, are not ours to redraw)
    noise = None
    if not given:
        noise = opt - float(scorer(loc, scale, crn_noise(target.dim, score_draws, seed=1)))
    return rows, {"traces": traces, "best_elbo": best, "dim": target.dim, "score_noise": noise}


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


# -- NGVI, ADVI and NUTS side by side (ArviZ diagnostics) -------------------------------------
def _nuts_reference(model, args, kwargs, warmup, samples, chains, rng_key):
    """NUTS with exact gradient counts (leapfrog steps of warmup and sampling)."""
    import arviz as az
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(
        NUTS(model),
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.warmup(rng_key, *args, extra_fields=("num_steps",), collect_warmup=True, **kwargs)
    grads = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    mcmc.run(mcmc.post_warmup_state.rng_key, *args, extra_fields=("num_steps",), **kwargs)
    seconds = time.perf_counter() - t0
    grads += int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    idata = az.from_numpyro(mcmc)  # with the pointwise log-likelihood, for az.compare
    summary = az.summary(idata, kind="diagnostics")
    return (
        mcmc.get_samples(),
        idata,
        {
            "seconds": seconds,
            "grad_evals": grads,
            "r_hat_max": float(summary["r_hat"].max()),
            "ess_bulk_min": float(summary["ess_bulk"].min()),
        },
    )


def _site_errors(draws: dict, ref: dict) -> dict:
    """Per site: max |mean - NUTS mean| / NUTS sd and the median ratio of sds."""
    out = {}
    for site, r in ref.items():
        if site not in draws:
            continue
        n = r.shape[0]
        a, b = np.asarray(draws[site]).reshape(-1, r[0].size), np.asarray(r).reshape(n, -1)
        sd = b.std(0)
        out[f"err:{site}"] = float(np.max(np.abs(a.mean(0) - b.mean(0)) / sd))
        out[f"sd_ratio:{site}"] = float(np.median(a.std(0) / sd))
    return out


def compare(
    model: Callable,
    *args,
    methods: tuple = ("ngvi", "advi", "nuts"),
    ngvi_steps: int = 1000,
    advi_steps: int = 10000,
    advi_lrs: tuple = (0.01,),
    advi_particles: tuple = (1,),
    nuts_warmup: int = 500,
    nuts_samples: int = 1000,
    num_chains: int = 4,
    num_draws: int = 4000,
    plot: str | None = None,
    pair: tuple[str, str] | None = None,
    rng_key=None,
    posterior_predictive: bool = True,
    **kwargs,
):
    """NGVI (mean-field; ``"fullrank"`` adds the full-rank guide), ADVI (best of ``advi_lrs`` x
    ``advi_particles``) and NUTS on one model.

    Returns ``(table, extras)``: a pandas DataFrame with one row per method (final ELBO on
    common random numbers, steps / seconds / gradient evaluations to stay within 0.1 nat of the
    mean-field optimum, compile time, PSIS k-hat, and per site ``err:<site>`` = mean error in
    NUTS-sd units and ``sd_ratio:<site>``; NUTS reports R-hat and ESS), and extras with the
    draws, the traces and ``extras["idata"]``: each method's ``arviz.InferenceData`` (with its
    pointwise log-likelihood; the VI ones with ``num_draws`` draws and k-hat in
    ``posterior.attrs``), so ``az.compare(extras["idata"])`` ranks the methods without refitting.
    ``posterior_predictive=False`` skips simulating the data in the VI ones. ``plot="out.png"``
    saves the ELBO traces there, and the marginals and a pair plot of the coordinates ``pair``
    (e.g. ``("mu", "tau")`` or ``("w[0]", "w[1]")``; default the first two) beside it
    (``out_marginals.png``, ``out_pair.png``)."""
    import pandas as pd

    from ngvi.report.diagnostics import to_inference_data

    unknown = set(methods) - {"ngvi", "fullrank", "advi", "nuts"}
    if unknown:
        raise ConfigError(
            f"unknown method(s) {sorted(unknown)}: choose from ngvi, fullrank, advi, nuts."
        )
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    guide = MeanFieldGaussian(model)
    guide.setup(jax.random.PRNGKey(0), args, kwargs)
    picked, extras = _ngvi_and_best_advi(
        model, args, kwargs, methods, ngvi_steps, advi_steps, advi_lrs, advi_particles, key
    )
    as_idata = partial(
        to_inference_data,
        num_samples=num_draws,
        rng_key=key,
        posterior_predictive=posterior_predictive,
    )
    draws, table, idatas = _meanfield_draws(guide, picked, args, kwargs, key, num_draws, as_idata)
    if "fullrank" in methods:
        draws["fullrank"], row, idatas["fullrank"] = _fullrank(
            model, args, kwargs, ngvi_steps, num_draws, key, as_idata
        )
        table.append(row)
    if "nuts" in methods:
        _add_nuts(
            model, args, kwargs, nuts_warmup, nuts_samples, num_chains, key, draws, table, idatas
        )
    extras = {**extras, "draws": draws, "picked": [t for _, t in picked], "idata": idatas}
    if plot:
        _plots(plot, extras, draws, pair)
    return pd.DataFrame(table), extras


def _ngvi_and_best_advi(
    model, args, kwargs, methods, ngvi_steps, advi_steps, advi_lrs, advi_particles, key
):
    """``compare_vi``'s extras and its (row, trace) pairs that ``compare`` reports: NGVI when
    asked and the best ADVI run (ADVI runs only when asked)."""
    rows, extras = compare_vi(
        model,
        *args,
        ngvi_steps=ngvi_steps,
        advi_steps=advi_steps,
        advi_lrs=advi_lrs if "advi" in methods else (),
        advi_particles=advi_particles,
        rng_key=key,
        **kwargs,
    )
    picked = [
        (r, t)
        for r, t in zip(rows, extras["traces"])
        if (r["method"] == "ngvi" and "ngvi" in methods) or r.get("best_advi")
    ]
    return picked, extras


def _meanfield_draws(guide, picked, args, kwargs, key, num_draws, as_idata):
    """Draws, table rows (with PSIS k-hat) and InferenceData of the picked mean-field fits."""
    draws, table, idatas = {}, [], {}
    for row, tr in picked:
        m, params = row["method"], {"loc": tr.loc, "scale": tr.scale}
        draws[m] = guide.sample_posterior(key, params, sample_shape=(num_draws,))
        idatas[m] = as_idata(guide, params, *args, settings={"method": m, **tr.settings}, **kwargs)
        table.append({**row, "khat": idatas[m].posterior.attrs["psis_khat"]})
    return draws, table, idatas


def _add_nuts(model, args, kwargs, warmup, samples, chains, key, draws, table, idatas) -> None:
    """Run the NUTS reference into ``draws``, ``idatas`` and ``table``: each row so far gets its
    errors in NUTS-sd units (``_site_errors``), and a NUTS row (time, R-hat, ESS) is added."""
    nuts_draws, idatas["nuts"], info = _nuts_reference(
        model, args, kwargs, warmup, samples, chains, key
    )
    draws["nuts"] = nuts_draws
    for row in table:
        row.update(_site_errors(draws[row["method"]], nuts_draws))
    table.append({"method": "nuts", **info})


def _fullrank(model, args, kwargs, steps, num_draws, key, as_idata):
    """Full-rank NGVI (variational online Newton): draws, a table row (k-hat; its time
    includes compilation, as it has no fixed-noise scorer here) and its InferenceData."""
    from ngvi.guides.fullrank import FullRankGaussian

    guide = FullRankGaussian(model)
    engine = NGVI(model, guide)
    t0 = time.perf_counter()
    res = engine.run(key, steps, *args, progress_bar=False, **kwargs)
    seconds = time.perf_counter() - t0
    idata = as_idata(
        guide,
        res.params,
        *args,
        losses=res.losses,
        settings={"method": "fullrank", "lr": engine.lr, "num_particles": engine.num_particles},
        **kwargs,
    )
    draws = guide.sample_posterior(key, res.params, sample_shape=(num_draws,))
    row = {
        "method": "fullrank",
        "num_particles": engine.num_particles,
        "steps_run": res.num_steps,
        "seconds_incl_compile": seconds,
        "khat": idata.posterior.attrs["psis_khat"],
    }
    return draws, row, idata


def _plots(path: str, extras: dict, draws: dict, pair=None) -> None:
    from pathlib import Path

    from ngvi.report.plots import plot_elbo, plot_marginals, plot_pair

    traces = {
        t.method: {"steps": t.steps, "seconds": t.steps * t.step_seconds, "elbo": t.elbo}
        for t in extras["picked"]
    }
    plot_elbo(traces, path)
    stem = Path(path)
    plot_marginals(draws, path=stem.with_name(stem.stem + "_marginals.png"))
    coords = (
        list(pair)
        if pair
        else [
            f"{s}[{i}]" if np.ndim(v[0]) else s
            for s, v in next(iter(draws.values())).items()
            for i in range(max(1, int(np.size(v[0]))))
        ][:2]
    )
    if len(coords) == 2:
        plot_pair(draws, coords[0], coords[1], path=stem.with_name(stem.stem + "_pair.png"))


def verdicts(table) -> list[str]:
    """One line per method: did it reach the optimum, can its draws be trusted (k-hat)."""
    lines = []
    for row in table.to_dict("records"):
        m = row["method"]
        if m == "nuts":
            ok = row["r_hat_max"] < 1.01
            note = "reference is reliable" if ok else "chains disagree: run longer"
            lines.append(
                f"nuts: R-hat max {row['r_hat_max']:.3f}, "
                f"min bulk ESS {row['ess_bulk_min']:.0f}: {note}."
            )
            continue
        steps = row.get("steps_to_0.1")
        if m == "fullrank":
            reach = f"ran {int(row['steps_run'])} steps"
        elif steps is not None and np.isfinite(steps):
            reach = f"stayed within 0.1 nat of the mean-field optimum after {int(steps)} steps"
        else:
            reach = "did not settle within 0.1 nat"
        k = row["khat"]
        trust = (
            "exact fit"
            if k == -np.inf
            else ("good" if k < 0.5 else ("usable with PSIS" if k < 0.7 else "unreliable"))
        )
        errs = [v for c, v in row.items() if c.startswith("err:") and np.isfinite(v)]
        err = f"; means within {max(errs):.2f} NUTS sd" if errs else ""
        lines.append(f"{m}: {reach}; k-hat {k:.2f} ({trust}){err}.")
    return lines
