"""The NGVI driver, shaped like ``numpyro.infer.SVI``: pure state, jitted and scanned steps.

One step, for a guide with parameters ``theta`` and the loss ``L = -ELBO``:

    g      = grad L(theta)                       (reparameterization trick, antithetic noise)
    theta' = theta - lr (F + damping)^-1 g       (the guide's closed-form inverse Fisher)
    accept iff L(theta') <= L(theta) on the same noise (common random numbers) and all finite

and Levenberg-Marquardt adaptation of the damping from ``rho = actual / predicted`` decrease,
``predicted = -<g, theta' - theta> / 2`` (exact for a Newton step on a quadratic): shrink it when
``rho > 3/4``, grow it when ``rho < 1/4``, grow it more on a rejected step. A rejected step keeps
the last good parameters. Draws whose log density is not finite at the current parameters are
dropped from the step (``step.copy_weights``): a sampling problem, so the damping is left alone.

Stopping (``run(tol=...)``, on by default): progress counts unit natural steps
(``step.effective_progress``: a rejected step adds 0, one damped to ``1/(1 + damping)`` adds that);
at checks spaced by 1.5x in progress the scan stops and ``ngvi.engine.convergence`` bounds what the
averaged fit may still gain from its ELBO changes on common random numbers and its noise floor;
``converged=True`` when that bound is at most ``tol``.

The RNG key and the step count live in the state, so ``update`` is pure and a run resumed from a
saved state is bit-identical to one that never stopped. ``NGVI._step`` composes these lines from
the pure pieces of ``ngvi.engine.step``; ``ngvi.engine.diagnose`` words the errors and warnings.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import jaxpr_as_fun

from ngvi.engine import convergence, probe
from ngvi.engine.checkpoint import load_checkpoint, save_checkpoint
from ngvi.engine.convergence import CheckInfo
from ngvi.engine.diagnose import claims_convergence, fit_error_message, warn_if_not_honest
from ngvi.engine.settings import check_hyper, check_run, engine_defaults
from ngvi.engine.state import NGVIInfo, NGVIRunResult, NGVIState, StepContext
from ngvi.engine.step import (
    Verdict,
    averaging_weight,
    effective_progress,
    judge,
    levenberg_marquardt,
    trust_region,
    value_and_grad_dropping_non_finite,
)
from ngvi.errors import ConfigError, FitError
from ngvi.guides.base import Guide
from ngvi.model.target import join_data as _join_data
from ngvi.model.target import split_data as _split_data
from ngvi.numerics import random as fast_random
from ngvi.numerics.fusion import unfused
from ngvi.numerics.lapack import batched_lapack, calls_lapack

__all__ = ["NGVI", "CheckInfo", "NGVIInfo", "NGVIRunResult", "NGVIState", "StepContext"]


class NGVI:
    """Natural-gradient variational inference for a NumPyro ``model`` with an ngvi ``guide``.

    :param lr: natural step size; 1.0 is the unit natural step. None (default): the guide's
        ``engine_defaults["lr"]`` if it states one (``KFACGuide``: 0.1), else 1.0.
    :param damping: initial (and minimum) damping; how it enters the step is the guide's closed
        form (see each guide).
    :param num_particles: Monte Carlo samples per step (antithetic pairs when even). None
        (default): the guide's ``engine_defaults["num_particles"]`` (``KFACGuide``: 1), else 8.
        ``run`` doubles them (up to 4x) rather than converge while their noise may bias the fit
        (``ngvi.engine.convergence``); ``particles`` is the count now.
    :param adapt_damping: Levenberg-Marquardt adaptation of the damping.
    :param average: decay of the moving average of iterates reported as the fit (0 = last iterate).
    :param max_rejections: consecutive rejected steps after which ``run`` stops with ``FitError``.
    :param max_kl: KL trust region: each proposal is scaled back along the straight line from the
        current parameters (in the guide's parameter coordinates: natural parameters for
        ``ExpFamilyGuide``) to the largest fraction ``t`` in [0, 1] with
        ``guide.kl(q_old, q_new) <= max_kl`` (bisection on the closed-form KL). A natural step is
        the steepest descent per unit of KL, so this is the TRPO step (Schulman et al. 2015).
    """

    def __init__(
        self,
        model: Callable,
        guide: Guide,
        *,
        lr: float | None = None,
        damping: float = 0.0,
        num_particles: int | None = None,
        adapt_damping: bool = True,
        average: float = 0.99,
        max_rejections: int = 50,
        max_kl: float | None = None,
    ):
        if not isinstance(guide, Guide):
            raise ConfigError(
                f"guide must be an ngvi guide (e.g. ngvi.MeanFieldGaussian(model)), got "
                f"{type(guide).__name__}; for NumPyro autoguides use ngvi.advi."
            )
        lr, num_particles = engine_defaults(guide, lr=lr, num_particles=num_particles)
        check_hyper(lr, damping, num_particles, average, max_rejections)
        if max_kl is not None and not (
            isinstance(max_kl, (int, float)) and math.isfinite(max_kl) and max_kl > 0
        ):
            raise ConfigError(
                f"max_kl must be None or a positive finite number (nats per step), got {max_kl!r}."
            )
        if guide.model is not model:
            raise ConfigError(
                f"the {type(guide).__name__} was built for another model function "
                f"({_name(guide.model)}) than the one given to NGVI ({_name(model)}): build it "
                "with the same model, e.g. NGVI(model, ngvi.MeanFieldGaussian(model))."
            )
        self.model, self.guide = model, guide
        self.lr, self.damping, self.num_particles = float(lr), float(damping), int(num_particles)
        self.adapt_damping, self.average = bool(adapt_damping), float(average)
        self.max_rejections = int(max_rejections)
        self.max_kl = None if max_kl is None else float(max_kl)
        self._boost = 1  # the particles' doubling factor now (``NGVIState.boost``)
        self._jitted: dict = {}
        self._layouts: set = set()  # data shapes the guide has been set up (and checked) for

    # -- pure pieces --------------------------------------------------------------------------
    def init(self, rng_key: jax.Array, *args, **kwargs) -> NGVIState:
        """Set the guide up on the model's data, choose its start (``Guide.choose_start``) and
        return the initial state."""
        key_setup, key_run = jax.random.split(rng_key)
        self._setup(key_setup, args, kwargs)
        target = self.guide.choose_start(key_setup, args, kwargs)  # Guide's class docstring
        params = self.guide.init_params(target)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(float)), params)
        i0, dtype = jnp.zeros((), jnp.int32), params_dtype(params)
        zero, nan = jnp.zeros((), dtype), jnp.full((), jnp.nan, dtype)
        damping = jnp.asarray(self.damping, dtype)
        no = jnp.array(False)
        one, self._boost = jnp.ones((), jnp.int32), 1
        return NGVIState(
            params, params, damping, key_run, i0, i0, i0, zero, params, zero, no, nan, nan, one
        )

    def _neg_elbo_and_logp(self, params, eps, data, model_key, z=None, draw_by_draw=False):
        """``neg_elbo_and_logp`` of this engine's guide."""
        return neg_elbo_and_logp(self.guide, params, eps, data, model_key, z, draw_by_draw)

    def _neg_elbo(self, params, eps, data, model_key):
        """-ELBO = -(mean_k log p(x, z_k) + H[q]) with z_k the reparameterized samples."""
        return self._neg_elbo_and_logp(params, eps, data, model_key)[0]

    def _draws(self, draws: Callable, eps):
        """``draws()``, as a kernel of its own on CPU when the guide's draws are elementwise
        (``Guide.elementwise_draws``, ``ngvi.numerics.fusion.unfused``)."""
        return unfused(draws, eps) if self.guide.elementwise_draws else draws()

    def _step(self, state: NGVIState, data) -> tuple[NGVIState, NGVIInfo]:
        """The boxed update of the module docstring, one line a call."""
        key, ctx = self._context(state, data)
        (loss, logp), grad, ctx, num_bad = self._gradient(state, ctx)  # g = grad L(theta)
        proposal, full_step, frac = self._propose(state, grad, ctx)  # theta - lr (F+d)^-1 g
        z_new = self._draws(
            lambda: self.guide.reparam_proposal(state.params, proposal, ctx.eps, ctx), ctx.eps
        )
        new_loss, new_logp = self._neg_elbo_and_logp(
            proposal, ctx.eps, data, ctx.model_key, z_new
        )  # L(theta') on the same noise
        verdict = judge(
            loss, logp, grad, proposal, new_loss, new_logp, full_step, frac, self.guide.crn_descent
        )
        accept = verdict.accept
        params = jax.tree.map(lambda a, b: jnp.where(accept, a, b), proposal, state.params)
        n = (state.step - state.num_rejected).astype(loss.dtype)
        w = jnp.where(accept, averaging_weight(n, self.average), 0.0)
        new_state = state._replace(
            params=params,
            avg_params=self.guide.average(state.avg_params, params, w),
            damping=self._adapt(state.damping, verdict),
            rng_key=key,
            step=state.step + 1,
            num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
            consecutive_rejected=jnp.where(accept, 0, state.consecutive_rejected + 1),
            progress=state.progress + effective_progress(accept, frac, state.damping),
        )
        step_kl = self._step_kl(state.params, params, accept, loss.dtype)
        info = NGVIInfo(
            loss, accept, state.damping, step_kl, verdict.reason, num_bad, jnp.array(True)
        )
        return new_state, info

    def _context(self, state: NGVIState, data) -> tuple[jax.Array, StepContext]:
        """The next state key and this step's noise, model key and loss on them."""
        key, k_eps, k_model = fast_random.split(state.rng_key, 3)  # jax.random's bits, faster
        eps = self.guide.base_noise(k_eps, self.particles)
        model_key = k_model if self.guide.target.has_subsample else None
        ctx = StepContext(eps, data, model_key, None, fast_random.fold_in(k_model, 1))
        return key, self._with_noise(ctx, eps)

    def _with_noise(self, ctx: StepContext, eps) -> StepContext:
        loss_fn = lambda p: self._neg_elbo(p, eps, ctx.data, ctx.model_key)
        return ctx._replace(eps=eps, loss_fn=loss_fn)

    def _gradient(self, state: NGVIState, ctx: StepContext):
        """((L, log p per draw), grad L, ctx with the guide's curvature and the draws used, number
        of draws dropped) at ``state.params``. Draws whose log density is not finite here are
        dropped (``step.copy_weights``) by the engine's own gradient; a guide with its own
        ``value_and_grad`` (K-FAC) gets none dropped: its step is rejected, without touching
        the damping, and the next step draws afresh."""
        if type(self.guide).value_and_grad is not Guide.value_and_grad:
            loss_and_logp = lambda p: self._neg_elbo_and_logp(p, ctx.eps, ctx.data, ctx.model_key)
            value, grad, curvature = self.guide.value_and_grad(
                loss_and_logp, state.params, state.step, ctx
            )
            num_bad = jnp.sum(~jnp.isfinite(value[1])).astype(jnp.int32)
            return value, grad, ctx._replace(curvature=curvature), num_bad
        args, kwargs = ctx.data
        target = self.guide.target
        log_density = lambda zi: target.log_density(zi, args, kwargs, ctx.model_key)
        value, grad, source = value_and_grad_dropping_non_finite(
            lambda p: self.guide.reparam(p, ctx.eps), log_density, self.guide.entropy, state.params
        )
        num_bad = jnp.sum(source != jnp.arange(source.shape[0])).astype(jnp.int32)
        return value, grad, self._with_noise(ctx, ctx.eps[source]), num_bad

    def _propose(self, state: NGVIState, grad, ctx: StepContext):
        """(proposal, full natural step, fraction t of it kept by the KL trust region)."""
        proposal = self.guide.natural_step(
            state.params, grad, self.lr, state.damping, state.step, ctx
        )
        full_step = jax.tree.map(jnp.subtract, proposal, state.params)
        proposal, frac = trust_region(self.guide.kl, state.params, proposal, full_step, self.max_kl)
        return proposal, full_step, frac

    def _adapt(self, damping, verdict: Verdict):
        """Levenberg-Marquardt adaptation (``step.levenberg_marquardt``) when enabled."""
        if not self.adapt_damping:
            return damping
        return levenberg_marquardt(damping, verdict, self.damping)

    def _check(self, state: NGVIState, dynamic, spec, tol: float) -> tuple[NGVIState, CheckInfo]:
        """``ngvi.engine.convergence.run_check`` on the compiled ``evaluate``; a passed check
        stands only if the guide verifies its estimates there (``Guide.verify_fit``)."""
        fn = self._compiled("evaluate", spec)
        evaluate = lambda s, key: fn(s, dynamic, key)
        state, info = convergence.run_check(state, evaluate, tol, self.particles, self.average)
        key = jax.random.fold_in(state.rng_key, 3)
        doubled = convergence.boosted(info, tol, self._boost) != self._boost
        if doubled:  # the noise may bias the average: less noise, one more window
            self._boost *= 2
            state = state._replace(boost=jnp.asarray(self._boost, jnp.int32))
        if info.passed and (
            doubled or self.guide.verify_fit(state.avg_params, _join_data(dynamic, spec), key)
        ):
            state, info = state._replace(converged=jnp.array(False)), info._replace(passed=False)
        if info.passed and self.guide.probed:  # the crawl no trend shows (ngvi.engine.probe)
            found = self._compiled("probe", spec)(state.avg_params, dynamic, key)
            refuted, gain, se = probe.refutes(jax.block_until_ready(found.gains), tol)
            info = info._replace(probe_gain=gain, probe_se=se, passed=not refuted)
            if refuted:  # go where the probe went; the next window starts there
                dtype = state.change.dtype
                state = state._replace(
                    params=found.params,
                    avg_params=found.params,
                    check_params=found.params,
                    converged=jnp.array(False),
                    change=jnp.asarray(gain, dtype),
                    change_se=jnp.asarray(se, dtype),
                )
        return state, info

    @property
    def particles(self) -> int:
        """The particles a step draws now: ``num_particles`` times the doubling factor of the
        state ``init`` or ``run`` last gave (``NGVIState.boost``, ``ngvi.engine.convergence``);
        ``update`` and ``evaluate`` draw as many, without reading the state's factor (a read
        would wait for the device on every call)."""
        return self.num_particles * self._boost

    def _step_kl(self, old, new, accept, dtype):
        """KL(q_old || q_new) of an accepted step (0 when rejected), with a trust region only."""
        if self.max_kl is None:
            return jnp.full((), jnp.nan, dtype)
        return jnp.where(accept, self.guide.kl(old, new), 0.0)

    # -- jitted entry points --------------------------------------------------------------------
    def _compiled(self, name: str, spec, chunk: int = 0):
        """The jitted ``update``, ``evaluate``, ``probe`` (``ngvi.engine.probe``) or ``run``
        chunk (which stops early at a due convergence check when ``tol > 0``). The probe is
        kept on the guide (it draws its own particles and depends on nothing else of the
        engine), so a second engine on the same guide does not compile it again."""
        if name == "probe":
            programs = self.guide._start_programs
            if ("probe", spec) not in programs:
                programs["probe", spec] = jax.jit(_probe_program(self.guide, spec))
            return programs["probe", spec]
        key = (name, spec, chunk, self.guide.step_variant, self.particles)
        if key not in self._jitted:
            if name == "update":

                def fn(state, dynamic):
                    return self._step(state, _join_data(dynamic, spec))
            elif name == "evaluate":

                def fn(state, dynamic, key):
                    eps = self.guide.base_noise(key, self.particles)
                    mk = key if self.guide.target.has_subsample else None
                    z = self._draws(lambda: self.guide.reparam(state.avg_params, eps), eps)
                    data = _join_data(dynamic, spec)
                    return self._neg_elbo_and_logp(state.avg_params, eps, data, mk, z)[0]
            else:

                def fn(state, dynamic, tol, stop_at):
                    return self._scan(state, _join_data(dynamic, spec), tol, stop_at, chunk)

            self._jitted[key] = jax.jit(fn)
        return self._jitted[key]

    def _scan(self, state, data, tol, stop_at, chunk):
        """Up to ``chunk`` steps, stopping before the first step at which the run is done; the
        infos of the steps not taken are padding (``ran=False``).

        A while loop whose body is the bare step: XLA hoists what depends on the data alone (the
        Cholesky factor of a ``MultivariateNormal(covariance_matrix=cov)``, say) out of a loop
        body, not out of a conditional's branch, and a scan of ``lax.cond(done, pad, step)`` paid
        it every step (the 100-dimensional ill-conditioned Gaussian of
        ``benchmarks/bench_gym.py``: 52 -> 28 us a step); a chunk that stops early no longer steps
        through its padding; the steps are the same computation. A step that makes batched
        LAPACK calls (``ngvi.numerics.lapack.batched_lapack``: the zoo's log-Gaussian Cox
        process, whose GP prior is factored per draw) keeps the scan of conditionals: in the
        while loop XLA ran two of them at once and jaxlib 0.10.2 froze (its full-rank fits, in
        both dtypes; reverted in 8e495fc)."""

        def done(s):
            return (
                (s.step >= stop_at)
                | s.converged
                | (s.consecutive_rejected >= self.max_rejections)
                | ((tol > 0) & convergence.due(s))
            )

        i0, nan = jnp.zeros((), jnp.int32), jnp.full((), jnp.nan, state.damping.dtype)

        def pad(s):
            return NGVIInfo(nan, jnp.array(False), s.damping, nan, i0, i0, jnp.array(False))

        # the step traced once: its jaxpr says which loop, and is the loop's body (the data
        # closed over, as the model sees them: sizes and other static values stay Python values)
        closed, shapes = jax.make_jaxpr(lambda s: self._step(s, data), return_shape=True)(state)
        out_tree = jax.tree.structure(shapes)

        def step(s):
            return jax.tree.unflatten(out_tree, jaxpr_as_fun(closed)(*jax.tree.leaves(s)))

        if batched_lapack(closed):

            def scanned(s, _):
                return lax.cond(done(s), lambda s: (s, pad(s)), step, s)

            return lax.scan(scanned, state, None, length=chunk)
        infos = jax.tree.map(lambda x: jnp.broadcast_to(x, (chunk,) + jnp.shape(x)), pad(state))

        def body(carry):
            i, s, infos = carry
            s, info = step(s)
            return i + 1, s, jax.tree.map(lambda a, x: a.at[i].set(x), infos, info)

        _, state, infos = lax.while_loop(
            lambda carry: (carry[0] < chunk) & ~done(carry[1]), body, (i0, state, infos)
        )
        return state, infos

    def update(self, state: NGVIState, *args, **kwargs) -> tuple[NGVIState, jax.Array]:
        """One natural step; returns the new state and the loss (-ELBO) it started from."""
        dynamic, spec = self._checked_data(args, kwargs)
        new_state, info = self._compiled("update", spec)(state, dynamic)
        return new_state, info.loss

    def evaluate(self, state: NGVIState, *args, **kwargs) -> jax.Array:
        """-ELBO of the averaged parameters, on fresh noise derived from the state's key."""
        dynamic, spec = self._checked_data(args, kwargs)
        key = jax.random.fold_in(state.rng_key, 1)
        return self._compiled("evaluate", spec)(state, dynamic, key)

    def _checked_data(self, args, kwargs):
        """Split the data; data of shapes not seen by ``init`` set the guide up again first, so a
        changed latent layout gets the guide's named ``ModelError``, not a shape error from jit."""
        dynamic, spec = _split_data(args, kwargs)
        if _data_shapes(dynamic, spec) not in self._layouts:
            self._setup(jax.random.PRNGKey(0), args, kwargs)
        return dynamic, spec

    def _setup(self, rng_key, args, kwargs):
        """``guide.setup`` on these data (validates them), remembering their shapes."""
        target = self.guide.setup(rng_key, args, kwargs)
        self._layouts.add(_data_shapes(*_split_data(args, kwargs)))
        return target

    def get_params(self, state: NGVIState) -> Any:
        """The averaged parameters (the fit to report) as ``GuideParams``: keyed by the guide's
        ``numpyro.param`` names (for ``Predictive(params=...)``) and stamped with the model's
        layout, so another model's guide refuses them."""
        return self.guide.numpyro_params(state.avg_params)

    def run(
        self,
        rng_key: jax.Array,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        tol: float | None = 0.1,
        init_state: NGVIState | None = None,
        chunk_size: int = 100,
        checkpoint: str | None = None,
        checkpoint_every: int | None = None,
        callback: Callable[[NGVIState], None] | None = None,
        **kwargs,
    ) -> NGVIRunResult:
        """Run up to ``num_steps`` steps (from ``init_state`` if given), scanned in jitted chunks.

        ``tol`` (nats, default 0.1; ``None`` turns checking off): stop once the ELBO of the
        reported fit (the iterate average) can gain at most ``tol`` more, as bounded from its
        changes over the last windows (each the last third of the run) with about 95% confidence
        and its noise floor (see the module docstring; ``result.checks`` lists the checks).
        ``converged=True`` means that check passed; on models with a known optimum such fits
        lie within ``tol`` nats of their family's optimum. A run that ends without passing it
        warns (``ngvi.ConvergenceWarning``) naming the likely cause and the fix; ``num_steps``
        is a budget, not a target. Ctrl-C returns the partial result with the last good state.
        A converged ``init_state`` is continued: its check restarts.

        With ``checkpoint=path`` the state is written there atomically every ``checkpoint_every``
        steps (default: every chunk) and at the end, and ``num_steps`` counts from the start of
        the fit: if ``path`` exists the fit resumes from it, so running the same command again
        after a crash finishes the same fit, bit for bit. ``callback(state)`` runs after each
        chunk (logging, custom stopping by raising KeyboardInterrupt).
        """
        check_run(num_steps, tol, checkpoint_every)
        state, stop_at = self._start(rng_key, num_steps, args, kwargs, init_state, checkpoint)
        self._boost = int(state.boost)  # a continued or checkpointed fit keeps its particles
        dynamic, spec = _split_data(args, kwargs)
        chunk = int(checkpoint_every or chunk_size)
        tol_arr = jnp.asarray(-1.0 if tol is None else tol)
        infos, checks, interrupted = [], [], False
        bar = _progress(max(int(stop_at) - int(state.step), 0), progress_bar)
        try:
            while True:
                if tol is not None and bool(convergence.due(state)) and not state.converged:
                    state, check = self._check(state, dynamic, spec, tol)
                    checks.append(check)
                    if checkpoint is not None:
                        save_checkpoint(checkpoint, state, self.guide)
                if int(state.step) >= int(stop_at) or _should_stop(state, self):
                    break
                before = int(state.step)
                fn = self._compiled("run", spec, chunk)  # the guide's step_variant may change
                state, info = fn(state, dynamic, tol_arr, stop_at)
                infos.append(info)
                if checkpoint is not None:
                    save_checkpoint(checkpoint, state, self.guide)
                if bar is not None:
                    bar.update(int(state.step) - before)
                    loss, damping = _last_finite(info.loss), float(state.damping)
                    bar.set_postfix(loss=f"{loss:.4g}", damping=f"{damping:.2g}")
                if callback is not None:
                    callback(state)
                if int(state.step) == before and not bool(convergence.due(state)):
                    break
        except KeyboardInterrupt:
            interrupted = True
            warnings.warn("run interrupted: returning the last good state", stacklevel=2)
        finally:
            if bar is not None:
                bar.close()
        return self._result(state, infos, interrupted, tol, tuple(checks))

    def _start(self, rng_key, num_steps, args, kwargs, init_state, checkpoint):
        """The state to start from and the step to stop at (see ``run``)."""
        if init_state is not None:
            self._setup(jax.random.PRNGKey(0), args, kwargs)
            if bool(init_state.converged):  # asked for more steps: check afresh from here
                init_state = init_state._replace(
                    converged=jnp.array(False),
                    check_params=init_state.avg_params,
                    check_progress=init_state.progress,
                )
            return init_state, init_state.step + num_steps
        state = self.init(rng_key, *args, **kwargs)
        if checkpoint is None:
            return state, state.step + num_steps
        if os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint, state, self.guide)
        return state, jnp.asarray(num_steps, jnp.int32)

    def _result(self, state, infos, interrupted, tol=None, checks=()) -> NGVIRunResult:
        if infos:
            info = jax.tree.map(lambda *x: jnp.concatenate(x), *infos)
            info = jax.tree.map(lambda x: x[np.asarray(info.ran)], info)  # drop the padding
        else:
            i0 = jnp.zeros((0,), jnp.int32)
            f0, b0 = jnp.zeros((0,)), jnp.zeros((0,), bool)
            info = NGVIInfo(f0, b0, f0, f0, i0, i0, b0)
        result = NGVIRunResult(
            self.get_params(state),
            state,
            info.loss,
            int(info.loss.shape[0]),
            claims_convergence(self, state),
            int(state.num_rejected),
            info,
            interrupted,
            checks,
        )
        if int(state.consecutive_rejected) >= self.max_rejections:
            raise FitError(fit_error_message(self, state, info), result)
        if not interrupted:
            warn_if_not_honest(self, state, info, tol, checks, stacklevel=3)
        return result


def neg_elbo_and_logp(guide: Guide, params, eps, data, model_key, z=None, draw_by_draw=False):
    """(-ELBO, log p(x, z_k) per particle) with -ELBO = -(mean_k log p(x, z_k) + H[q]) and
    z_k the reparameterized samples (``z`` if given: ``guide.reparam(params, eps)``), all
    at once (vmap) or, with ``draw_by_draw``, one at a time (``ngvi.numerics.lapack``)."""
    args, kwargs = data
    target = guide.target
    z = guide.reparam(params, eps) if z is None else z
    one = lambda zi: target.log_density(zi, args, kwargs, model_key)
    logp = lax.map(one, z) if draw_by_draw else jax.vmap(one)(z)
    return -(jnp.mean(logp) + guide.entropy(params)), logp


def _probe_program(guide: Guide, spec) -> Callable:
    """``(params, dynamic data, key) -> ProbeResult``: the Newton probe (``ngvi.engine.probe``)
    of a passed check, a function of the guide and the data layout only."""

    def fn(params, dynamic, key):
        data, target = _join_data(dynamic, spec), guide.target
        mk = lambda k: k if target.has_subsample else None
        # one draw at a time through a model that calls LAPACK (ngvi.numerics.lapack)
        logp = lambda z: target.log_density(z, *data, mk(key))
        lapack = calls_lapack(logp, target.init_z)

        def neg_elbo(p, eps, k, z=None):
            return neg_elbo_and_logp(guide, p, eps, data, mk(k), z, draw_by_draw=lapack)[0]

        def forward(p, eps, k):
            # the forward-only evaluations with their draws made apart (ngvi.numerics.fusion:
            # XLA fused them into each gather of the log density; the probe of a 501-dimensional
            # item-response fit took 5.6 s, 2.5 s apart); the differentiated ones as they were
            return neg_elbo(p, eps, k, unfused(lambda: guide.reparam(p, eps), eps))

        metric = guide.probe_metric(params)
        apart = forward if guide.elementwise_draws else None
        return probe.newton_probe(neg_elbo, params, metric, guide.base_noise, key, apart)

    return fn


def _should_stop(state: NGVIState, engine: NGVI) -> bool:
    return bool(state.converged) or bool(state.consecutive_rejected >= engine.max_rejections)


def _data_shapes(dynamic, spec) -> tuple:
    return spec, tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(dynamic))


def _name(fn) -> str:
    return f"'{getattr(fn, '__qualname__', None) or repr(fn)}'"


def _last_finite(x) -> float:
    x = np.asarray(x)
    x = x[np.isfinite(x)]
    return float(x[-1]) if x.size else float("nan")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ngvi", leave=False)


def params_dtype(params) -> Any:
    return jax.tree.leaves(params)[0].dtype
