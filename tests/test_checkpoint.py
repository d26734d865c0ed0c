"""Checkpoint and resume: atomic .npz files, bit-identical resumption, clear errors."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ngvi import NGVI, MeanFieldGaussian, models
from ngvi.engine.checkpoint import CheckpointError


def _engine(name="eight_schools"):
    model, args, kwargs = models.load(name)
    return NGVI(model, MeanFieldGaussian(model)), args, kwargs


def _leaves_equal(a, b) -> bool:
    """Bitwise equal pytrees (a NaN equal to a NaN: the check's fields without ``tol``)."""
    eq = lambda x, y: np.array_equal(x, y, equal_nan=np.issubdtype(np.asarray(x).dtype, np.inexact))
    return all(eq(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_is_bit_identical(tmp_path):
    engine, args, kwargs = _engine()
    key = jax.random.PRNGKey(3)
    # tol=None: every step (the warm-started fit passes the default check before step 40)
    full = engine.run(key, 60, *args, progress_bar=False, chunk_size=20, tol=None, **kwargs)
    path = str(tmp_path / "fit.npz")
    saved = dict(progress_bar=False, checkpoint=path, checkpoint_every=20, tol=None)
    part = engine.run(key, 40, *args, **saved, **kwargs)
    assert int(part.state.step) == 40 and os.path.exists(path)
    resumed = engine.run(key, 60, *args, **saved, **kwargs)
    assert int(resumed.state.step) == 60 and resumed.num_steps == 20
    assert _leaves_equal(resumed.state, full.state)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary left


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
    engine, args, kwargs = _engine()
    path = tmp_path / "fit.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        engine.run(
            jax.random.PRNGKey(0), 10, *args, progress_bar=False, checkpoint=str(path), **kwargs
        )
    other, oargs, okwargs = _engine("normal_normal")
    path.unlink()
    other.run(
        jax.random.PRNGKey(0), 10, *oargs, progress_bar=False, checkpoint=str(path), **okwargs
    )
    with pytest.raises(CheckpointError, match="another model or guide"):
        engine.run(
            jax.random.PRNGKey(0), 10, *args, progress_bar=False, checkpoint=str(path), **kwargs
        )


def test_empty_checkpoint_file_raises_checkpoint_error(tmp_path):
    """A 0-byte file (a disk that filled up, a crash before the first write) is corrupt, not an
    EOFError from numpy."""
    engine, args, kwargs = _engine("normal_normal")
    path = tmp_path / "fit.npz"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unreadable or corrupt \(EOFError"):
        engine.run(
            jax.random.PRNGKey(0), 5, *args, progress_bar=False, checkpoint=str(path), **kwargs
        )


CHILD = textwrap.dedent(
    """
    import sys, time, jax, numpy as np
    from ngvi import models
    from ngvi import NGVI, MeanFieldGaussian
    path, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    model, args, kwargs = models.load("eight_schools")
    engine = NGVI(model, MeanFieldGaussian(model, warm_start=False))
    def tick(state):
        print("step", int(state.step), flush=True)
        if slow:
            time.sleep(0.05)
    r = engine.run(jax.random.PRNGKey(7), 400, *args, progress_bar=False, checkpoint=path,
                   checkpoint_every=10, callback=tick, **kwargs)
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(r.state)])
    print("done", int(r.state.step), "converged", r.converged, flush=True)
    """
)


@pytest.mark.slow  # ~35 s: three subprocess fits
def test_killed_fit_resumes_to_the_same_parameters(tmp_path):
    """Killed at step 30, before the fit converges (about step 45-70 with the default tol from
    the candidate start; the warm start would converge by step 30, so the child goes without
    it): the resumed fit runs the same convergence checks and stops at the same step, bit for
    bit."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ckpt, out = str(tmp_path / "a.npz"), str(tmp_path / "a_out.npz")
    proc = subprocess.Popen(
        [sys.executable, str(script), ckpt, out, "slow"], stdout=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1]) >= 30:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(out)
    subprocess.run(
        [sys.executable, str(script), ckpt, out, "fast"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    ref_ckpt, ref_out = str(tmp_path / "b.npz"), str(tmp_path / "b_out.npz")
    ref = subprocess.run(
        [sys.executable, str(script), ref_ckpt, ref_out, "fast"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    done = ref.stdout.strip().splitlines()[-1].split()
    assert done[3] == "True" and 30 < int(done[1]) < 400, "converged after the kill point"
    with np.load(out) as a, np.load(ref_out) as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
