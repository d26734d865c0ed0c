"""Float64 per test module, so the rest of the suite runs in JAX's default float32.

A module that needs float64 says so with ``pytestmark = pytest.mark.x64`` and switches it on at
import (``jax.config.update("jax_enable_x64", True)`` above its constants, which are then built
in float64). Collecting a module restores the switch afterwards, so that one module's import does
not turn the whole session to float64; the autouse fixture below turns it on again while the
marked module's tests run and restores it after. ``JAX_ENABLE_X64=1 python -m pytest`` runs the
whole suite in float64 (``.ci/run-slow`` does both), but for modules marked ``float32``, whose
subject is float32 itself.

Suite time (issue 16): XLA compiles, not runs, dominate the default run, so it compiles without
LLVM's optimisation passes and caches every compiled program for the run (below).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import jax
import pytest

#: The suite is dominated by XLA compiles of small programs (about 80% of a module's time,
#: measured on test_numpyro_guide), not by running them: LLVM's optimisation passes are skipped
#: (-31% there). Set before JAX starts its backend; xdist workers and the subprocesses tests start
#: inherit it. ``NGVI_TEST_XLA_OPT=1`` keeps XLA's default optimisation.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("NGVI_TEST_XLA_OPT", "0") != "1" and _FAST_COMPILE not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def pytest_configure(config):
    """The tests import the bundled models as ``ngvi.models``, which only an install of this
    checkout provides (pyproject maps ``models/`` there): say so once instead of an import error
    in every module.

    Many tests compile the same programs (one model, guide and settings, in new engine objects):
    a compilation cache in a fresh temporary folder, shared by the xdist workers (they inherit
    the controller's environment), compiles each once per run (about 11% of the run measured on
    four engine modules). ``NGVI_TEST_JAX_CACHE=0`` switches it off."""
    from ngvi.model.loader import bundled

    if os.environ.get("NGVI_TEST_JAX_CACHE", "1") != "0":
        folder = os.environ.get("NGVI_TEST_JAX_CACHE_DIR")
        if folder is None:  # the controller (or a run without xdist) makes it, and removes it
            folder = os.environ["NGVI_TEST_JAX_CACHE_DIR"] = tempfile.mkdtemp(
                prefix="ngvi-jax-cache-"
            )
            _OWN_CACHE.append(folder)
        jax.config.update("jax_compilation_cache_dir", folder)
        # every program, the eager ops' small ones too (-6% on the four heaviest modules)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    stale = [v for v in bundled().values() if not v.startswith("ngvi.models.")]
    if importlib.util.find_spec("ngvi.models") is None or stale or not bundled():
        raise pytest.UsageError(
            "ngvi.models (the repository's models/ folder) is not installed, or ngvi's entry "
            f"points are from an older install ({stale[:2]}): run `pip install -e . -c "
            "constraints.txt` from the repository root."
        )


def pytest_unconfigure(config):
    """Remove the compilation cache this process made (the workers' runs have ended by now)."""
    while _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE.pop(), ignore_errors=True)


_OWN_CACHE: list[str] = []


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Undo a module's import-time ``jax_enable_x64`` switch once it is collected; a module that
    flips the switch without the ``x64`` marker would silently change every later module, so it
    fails collection with the fix."""
    before = _x64()
    outcome = yield
    if not isinstance(collector, pytest.Module) or _x64() == before:
        return
    jax.config.update("jax_enable_x64", before)
    if collector.get_closest_marker("x64") is None:
        outcome.get_result().outcome = "failed"
        outcome.get_result().longrepr = (
            f"{collector.nodeid} switches jax_enable_x64 at import without the x64 marker: add "
            "`pytestmark = pytest.mark.x64` so the switch stays inside this module."
        )


@pytest.fixture(autouse=True, scope="module")
def _x64_for_marked_modules(request):
    """jax_enable_x64 on for the tests of a module marked ``x64``, off for one marked
    ``float32`` (its subject is float32 itself: a near-singular posterior that float64 resolves
    raises no warning there), restored afterwards."""
    if request.node.get_closest_marker("x64") is not None:
        want = True
    elif request.node.get_closest_marker("float32") is not None:
        want = False
    else:
        yield
        return
    before = _x64()
    jax.config.update("jax_enable_x64", want)
    yield
    jax.config.update("jax_enable_x64", before)
