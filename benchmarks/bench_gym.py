"""Cost per step and the first gradients: NGVI's defaults against the best ADVI and Pathfinder.

Targets: the bundled eight schools, logistic regression and hierarchical linear models, and four
Inference Gym-style targets written here: a banana (d = 2), an ill-conditioned Gaussian (d = 100,
a random rotation of variances spread over four decades), Neal's funnel (d = 10) and a 1PL
item-response model (400 students x 100 questions, d = 501).

Protocol (as ``bench_meanfield``, ../shared/PERFORMANCE-NOTES.md): one common-random-numbers ELBO
scores every checkpoint; the reference is the mean-field family optimum; ADVI (AutoNormal + Adam)
gets a grid of learning rates x particles and the best configuration by seconds; compile time is
excluded; every ratio comes from one run. Columns: steps / log-density evaluations / seconds to
stay within 0.1 nat, evaluations to first come within 5 nats, and the cost of one NGVI step over
one step of one-particle ADVI at the best learning rate. NGVI's quasi-Newton warm start (before
step 1, checkpoint 0) is counted in its evaluations and seconds, not in its steps: its gradient
evaluations (line search included) and the forward evaluations of its scoring (8 a point); a
natural step is 8 gradient and 8 forward evaluations. Pathfinder (BlackJAX, when installed) is
scored by the ELBO of its own Gaussian (Monte Carlo, 4096 draws) against the same mean-field
optimum, with its gradient evaluations (L-BFGS iterations), which the table puts beside NGVI's
gradient evaluations alone. Prints a table and writes
benchmarks/results/gym.json.

    python benchmarks/bench_gym.py [target ...] [--quick]   # run (those targets), write the JSON
    python benchmarks/bench_gym.py --md [--quick]            # the markdown table of the saved JSON
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ngvi import MeanFieldGaussian, models
from ngvi.report.comparison import compare_vi, format_table, trace_grad_evals
from ngvi.report.scoring import first_touch


# -- the Inference Gym-style targets -------------------------------------------------------------
def banana():
    """x1 ~ N(0, 10^2), x2 | x1 ~ N(0.03 (x1^2 - 100), 1) (Haario et al. 1999)."""
    x1 = numpyro.sample("x1", dist.Normal(0.0, 10.0))
    numpyro.sample("x2", dist.Normal(0.03 * (x1**2 - 100.0), 1.0))


def _ill_conditioned_cov(d: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.logspace(-2, 2, d)) @ q.T


def ill_conditioned_gaussian(cov):
    """z ~ N(0, cov), cov a random rotation of variances from 1e-2 to 1e2 (condition 1e4)."""
    numpyro.sample("z", dist.MultivariateNormal(jnp.zeros(cov.shape[0]), cov))


def funnel(dim: int = 9):
    """Neal's funnel: v ~ N(0, 3), x_i | v ~ N(0, exp(v / 2)), i = 1..dim."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim), jnp.exp(v / 2.0)).to_event(1))


def item_response(student, question, y=None, num_students=400, num_questions=100):
    """1PL (Rasch) model: logit P(correct) = mean + ability_s - difficulty_q."""
    mean = numpyro.sample("mean", dist.Normal(0.0, 1.0))
    with numpyro.plate("students", num_students):
        ability = numpyro.sample("ability", dist.Normal(0.0, 1.0))
    with numpyro.plate("questions", num_questions):
        difficulty = numpyro.sample("difficulty", dist.Normal(0.0, 1.0))
    with numpyro.plate("answers", student.shape[0]):
        logits = mean + ability[student] - difficulty[question]
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def _irt_data(num_students=400, num_questions=100, seed=0):
    rng = np.random.default_rng(seed)
    s, q = np.meshgrid(np.arange(num_students), np.arange(num_questions), indexing="ij")
    s, q = s.ravel(), q.ravel()
    keep = rng.random(s.size) < 0.5  # each student answers about half the questions
    s, q = s[keep], q[keep]
    logits = 0.5 + rng.normal(size=num_students)[s] - rng.normal(size=num_questions)[q]
    y = (rng.random(s.size) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return (jnp.asarray(s), jnp.asarray(q)), {"y": jnp.asarray(y)}


# -- exact ELBOs where a target has one ----------------------------------------------------------
#: Gauss-Hermite nodes of item-response's one-dimensional expectations (64 and 128 agree to
#: 1e-9 nat in float64, ``tests/test_bench_gym.py``)
HERMITE_NODES = 64


def _normal_prior_term(loc, scale) -> jax.Array:
    """``E_q log N(x | 0, 1)`` summed over coordinates, ``q = N(loc, scale^2)``."""
    return jnp.sum(-0.5 * math.log(2 * math.pi) - 0.5 * (loc**2 + scale**2))


def _entropy(scale) -> jax.Array:
    return jnp.sum(jnp.log(scale)) + 0.5 * scale.shape[-1] * math.log(2 * math.pi * math.e)


def exact_elbo_ill_conditioned(cov):
    """``ELBO(loc, scale)`` of ``N(loc, diag scale^2)`` against ``N(0, cov)`` in closed form:
    ``-1/2 (d log 2 pi + log|cov| + loc' P loc + sum_i P_ii scale_i^2) + H[q]``, ``P = cov^-1``.
    The mean-field optimum is ``loc = 0``, ``scale_i^2 = 1 / P_ii``."""
    cov = np.asarray(cov, np.float64)
    prec = np.linalg.inv(cov)
    d = cov.shape[0]
    const = -0.5 * (d * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1])
    real = jnp.result_type(float)  # float32 unless x64 is on
    prec_j, diag = jnp.asarray(prec, real), jnp.asarray(np.diag(prec), real)

    def elbo(loc, scale):
        quad = loc @ prec_j @ loc + jnp.sum(diag * scale**2)
        return const - 0.5 * quad + _entropy(scale)

    return elbo


def exact_elbo_item_response(target, student, question, y, nodes: int = HERMITE_NODES):
    """``ELBO(loc, scale)`` of the mean-field Gaussian on the 1PL model, without Monte Carlo:
    the priors' terms in closed form, and each answer's ``E_q log sigmoid(+-eta)`` with
    ``eta = mean + ability_s - difficulty_q ~ N(m, v)`` (a sum of independent Gaussians) by
    Gauss-Hermite quadrature, ``E f(eta) = pi^-1/2 sum_i w_i f(m + sqrt(2 v) x_i)``."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    real = jnp.result_type(float)  # float32 unless x64 is on
    x, w = jnp.asarray(x, real), jnp.asarray(w / math.sqrt(math.pi), real)
    sign = 2.0 * jnp.asarray(y, real) - 1.0

    def elbo(loc, scale):
        mu, sd = target.unravel(loc), target.unravel(scale)
        m = mu["mean"] + mu["ability"][student] - mu["difficulty"][question]
        v = sd["mean"] ** 2 + sd["ability"][student] ** 2 + sd["difficulty"][question] ** 2
        eta = m[:, None] + jnp.sqrt(2.0 * v)[:, None] * x  # (answers, nodes)
        loglik = jnp.sum(jax.nn.log_sigmoid(sign[:, None] * eta) @ w)
        return loglik + _normal_prior_term(loc, scale) + _entropy(scale)

    return elbo


def exact_scorer(name: str, target, args, kwargs):
    """``score(loc, scale, noise=None)`` with the exact ELBO of ``name`` (vectorised over leading
    dims, ``noise`` ignored), or None where the target has none (then the common-random-numbers
    scorer serves)."""
    if name == "ill_conditioned_gaussian":
        elbo = exact_elbo_ill_conditioned(args[0])
    elif name == "item_response":
        elbo = exact_elbo_item_response(target, *args, kwargs["y"])
    else:
        return None
    one = jax.jit(elbo)
    batched = jax.jit(lambda locs, scales: jax.lax.map(lambda ls: elbo(*ls), (locs, scales)))
    return lambda loc, scale, noise=None: (one if jnp.ndim(loc) == 1 else batched)(loc, scale)


GYM = {  # name: (model, args, kwargs)
    "banana": lambda: (banana, (), {}),
    "ill_conditioned_gaussian": lambda: (
        ill_conditioned_gaussian,
        (jnp.asarray(_ill_conditioned_cov(), jnp.float32),),
        {},
    ),
    "funnel": lambda: (funnel, (), {}),
    "item_response": lambda: (item_response, *_irt_data()),
}
SETTINGS = {  # target: (ngvi steps, advi steps)
    "eight_schools": (400, 6000),
    "logistic_regression": (1500, 20000),
    "hierarchical_linear": (600, 20000),
    "banana": (400, 6000),
    "ill_conditioned_gaussian": (600, 20000),
    "funnel": (400, 6000),
    "item_response": (600, 10000),
}
#: Scorer draws and ADVI checkpoints where the defaults (4096, 400) do not fit; none now: the two
#: targets whose Monte Carlo scorer could not resolve 0.1 nat (item-response: a 1024-draw scorer
#: fitted by its optimum by ~0.5 nat, about p / 2S for p = 1002 parameters and S draws; the
#: ill-conditioned Gaussian needed 65,536 draws) are scored by their exact ELBO (``exact_scorer``).
SCORING: dict = {}
GRID_LR = (0.001, 0.01, 0.05, 0.1)
GRID_PARTICLES = (1, 8)


def load(name: str):
    return GYM[name]() if name in GYM else models.load(name)


# -- Pathfinder ----------------------------------------------------------------------------------
#: Pathfinder's L-BFGS budget (BlackJAX's default is 30). It stops earlier on its own tolerances
#: and the iterations it ran are counted; ``hit_cap`` in the JSON says when it ran out. BlackJAX
#: scores every point of the budget at once (200 draws each, vmapped), so the budget is also a
#: memory cap: 1000 points ran the d = 501 target out of 23 GB
PATHFINDER_MAXITER = {"item_response": 100}
PATHFINDER_MAXITER_DEFAULT = 1000  # Stan's default


def pathfinder_row(model, args, kwargs, best: float, maxiter: int, seed: int = 0) -> dict | None:
    """BlackJAX Pathfinder from the guide's start; None when BlackJAX is not installed. Its
    gradient evaluations are its L-BFGS iterations (line-search evaluations and the 200 forward
    evaluations per iteration of its ELBO estimate are not counted: a lower bound on its cost)."""
    try:
        import blackjax
    except ImportError:
        return None
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    logdensity = lambda z: target.log_density(z, args, kwargs)
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    state, info = blackjax.vi.pathfinder.approximate(
        key, logdensity, jnp.asarray(target.init_z), maxiter=maxiter
    )
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    draws, logq = blackjax.vi.pathfinder.sample(jax.random.PRNGKey(seed + 1), state, 4096)
    logp = jax.lax.map(logdensity, draws)
    elbo = float(jnp.mean(logp - logq))
    evals = int(np.sum(np.isfinite(np.asarray(info.path.elbo))))  # L-BFGS iterations
    return {
        "method": "pathfinder",
        "final_elbo": elbo,
        "gap_nats": best - elbo,
        "grad_evals": evals,
        "hit_cap": evals >= maxiter,
        "seconds_incl_compile": seconds,
    }


def gradients(trace, steps: int) -> int:
    """Gradient evaluations alone (as Pathfinder's are counted) of the start and ``steps`` steps:
    ``num_particles`` a step (NGVI's accept test is forward evaluations)."""
    return trace.start_grad_evals + steps * trace.settings["num_particles"]


# -- the table -----------------------------------------------------------------------------------
def run_target(name: str, quick: bool) -> dict:
    ngvi_steps, advi_steps = SETTINGS[name]
    if quick:
        ngvi_steps, advi_steps = ngvi_steps // 2, advi_steps // 4
    model, args, kwargs = load(name)
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    rows, extras = compare_vi(
        model,
        *args,
        ngvi_steps=ngvi_steps,
        advi_steps=advi_steps,
        advi_lrs=GRID_LR,
        advi_particles=GRID_PARTICLES,
        **SCORING.get(name, {}),
        scorer=exact_scorer(name, target, args, kwargs),
        **kwargs,
    )
    best = extras["best_elbo"]
    for row, trace in zip(rows, extras["traces"]):
        touch = first_touch(trace.elbo, best, 5.0, trace.steps)
        row["grad_evals_to_5"] = None if touch is None else trace_grad_evals(trace, touch)
        row["gradients_to_5"] = None if touch is None else gradients(trace, touch)
    pf = pathfinder_row(
        model, args, kwargs, best, PATHFINDER_MAXITER.get(name, PATHFINDER_MAXITER_DEFAULT)
    )
    return {
        "dim": extras["dim"],
        "best_elbo": best,
        "score_noise": extras["score_noise"],  # the optimum's ELBO on its draws minus on others
        "rows": rows,
        "pathfinder": pf,
    }


def summary_row(name: str, result: dict) -> dict:
    rows = result["rows"]
    ng = next(r for r in rows if r["method"] == "ngvi")
    best = next((r for r in rows if r.get("best_advi")), None)
    one = [r for r in rows if r["method"] == "advi" and r["num_particles"] == 1]
    advi1 = min(one, key=lambda r: r["ms_per_step"]) if one else None
    pf = result["pathfinder"]

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    return {
        "target": name,
        "d": result["dim"],
        "ngvi_steps": ng["steps_to_0.1"],
        "advi_steps": best and best["steps_to_0.1"],
        "step_ratio": ratio(best and best["steps_to_0.1"], ng["steps_to_0.1"]),
        "time_ratio": ratio(best and best["seconds_to_0.1"], ng["seconds_to_0.1"]),
        "cost_vs_advi1": ratio(ng["ms_per_step"], advi1 and advi1["ms_per_step"]),
        "ngvi_evals_to_5": ng["grad_evals_to_5"],
        "ngvi_gradients_to_5": ng.get("gradients_to_5"),
        "ngvi_start_gradients": ng.get("start_grad_evals"),
        "pf_evals": pf and pf["grad_evals"],
        "pf_gap": pf and pf["gap_nats"],
        "score_noise": result["score_noise"],
    }


def markdown(summary: list[dict]) -> str:
    """The summary as the markdown table of the README and docs/benchmarks.md."""

    def f(v, fmt="{:.3g}", none="-"):
        return none if v is None else fmt.format(v)

    head = (
        "| target | d | NGVI steps to 0.1 nat | best ADVI steps | fewer steps | less time "
        "| NGVI step / 1-particle ADVI step | NGVI gradients to 5 nats (all log p evaluations) "
        "| Pathfinder gradients (gap, nats) |\n|" + "---|" * 9
    )
    lines = [head]
    for r in summary:
        pf = "not installed" if r["pf_evals"] is None else f"{r['pf_evals']} ({r['pf_gap']:.2f})"
        lines.append(
            f"| {r['target']} | {r['d']} | {f(r['ngvi_steps'], '{}', 'not reached')} "
            f"| {f(r['advi_steps'], '{}', 'not reached')} | {f(r['step_ratio'], '{:.0f}x')} "
            f"| {f(r['time_ratio'], '{:.0f}x')} | {f(r['cost_vs_advi1'], '{:.1f}x')} "
            f"| {f(r.get('ngvi_gradients_to_5'), '{}')} ({f(r['ngvi_evals_to_5'], '{}')}) | {pf} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")] or list(SETTINGS)
    path = Path(__file__).parent / "results" / ("gym_quick.json" if quick else "gym.json")
    if "--md" in argv:  # the table from the saved results, nothing rerun
        print(markdown(json.loads(path.read_text())["summary"]))
        return
    # targets run one at a time and each is written when done (a long run that stops keeps what
    # it measured); a run of some targets keeps the others' results from the file
    saved = json.loads(path.read_text()) if path.exists() else {}
    out, summary = saved.get("targets", {}), {r["target"]: r for r in saved.get("summary", [])}
    ordered = lambda: [summary[n] for n in SETTINGS if n in summary]
    meta = {"jax": jax.__version__, "platform": platform.platform(), "quick": quick}
    meta["protocol"] = __doc__.split("\n\n")[2]
    for name in names:
        t0 = time.perf_counter()
        out[name] = run_target(name, quick)
        out[name]["seconds"] = time.perf_counter() - t0
        meta["date"] = time.strftime("%Y-%m-%d")
        print(f"\n== {name}: d = {out[name]['dim']} ({out[name]['seconds']:.0f} s)")
        print(format_table(out[name]["rows"]))
        summary[name] = summary_row(name, out[name])
        path.write_text(json.dumps({"meta": meta, "targets": out, "summary": ordered()}, indent=2))
    print("\n== summary")
    print(format_table(ordered()))
    print("\n" + markdown(ordered()))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
