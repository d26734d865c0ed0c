"""Data-parallel fits: the data axis sharded over a device mesh, and subsampled plates.

The multi-device checks run in a subprocess with ``--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts, and this process already has one CPU device).
"""

import json
import os
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.initialization import init_to_value

import ngvi
from ngvi import MeanFieldGaussian
from ngvi.engine.sharding import data_mesh, shard_data

# -- helper, in this (one-device) process ------------------------------------------------------


def test_shard_data_replicates_what_has_no_data_axis():
    mesh = data_mesh()
    X, y, prior = np.ones((6, 2), np.float32), np.zeros(6, np.float32), np.ones(3, np.float32)
    Xs, kw, s = shard_data(X, {"y": y, "prior": prior, "k": 3, "none": None}, 2.0, mesh=mesh)
    assert Xs.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert kw["y"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert kw["prior"].sharding.is_fully_replicated  # length 3 is not the data axis (6)
    assert kw["k"] == 3 and kw["none"] is None and s == 2.0  # non-arrays pass through
    np.testing.assert_array_equal(Xs, X)
    single = shard_data(y, mesh=mesh)
    assert isinstance(single, jax.Array) and single.shape == (6,)
    cols = shard_data(X.T, mesh=mesh, axis=1)  # data along axis 1
    assert cols.sharding.spec == jax.sharding.PartitionSpec(None, "data")


def test_shard_data_rejects_a_multi_axis_mesh():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
    with pytest.raises(ngvi.ConfigError, match="one-dimensional mesh"):
        shard_data(np.ones(4), mesh=mesh)


# -- subsampled plates: the stochastic natural gradient is unbiased ----------------------------

N_ROWS, BATCH, P = 200, 20, 3
INIT = {"w": np.zeros(P, np.float32), "b": np.float32(0.0)}


def _subsampled_model(X, y=None, batch=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", X.shape[0], subsample_size=batch) as idx:
        numpyro.sample("y", dist.Bernoulli(logits=X[idx] @ w + b), obs=y[idx])


def test_subsampled_natural_gradient_is_unbiased():
    """E over subsample keys of F^-1 grad(-ELBO on a minibatch, likelihood scaled by N/m) equals
    F^-1 grad(-ELBO on all rows): F depends on the guide's parameters only, so the natural
    gradient is linear in the (unbiased) minibatch gradient. Same particles for both."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_ROWS, P)).astype(np.float32)
    y = (rng.random(N_ROWS) < 1 / (1 + np.exp(-X @ np.array([1.0, -2.0, 0.5])))).astype(np.float32)
    X, y = jnp.asarray(X), jnp.asarray(y)
    guide = MeanFieldGaussian(_subsampled_model, init_strategy=init_to_value(values=INIT))
    # the layout does not depend on the batch; set up on all rows (cheaper: no eager subsampling)
    target = guide.setup(jax.random.PRNGKey(0), (X,), {"y": y})
    params = {"loc": jnp.linspace(-0.5, 0.5, target.dim), "scale": jnp.full(target.dim, 0.3)}
    eps = guide.base_noise(jax.random.PRNGKey(1), 8)

    def natgrad(batch, key):
        def loss(p):
            z = guide.reparam(p, eps)
            logp = jax.vmap(lambda zi: target.log_density(zi, (X,), {"y": y, "batch": batch}, key))
            return -(jnp.mean(logp(z)) + guide.entropy(p))

        g = jax.grad(loss)(params)
        nat = MeanFieldGaussian.fisher_inverse(params, g)  # (mu, sigma) coordinates
        # natural coordinates: the natural direction of the precision is G = dL/dscale / scale
        return jnp.concatenate([nat["loc"], nat["scale"], g["scale"] / params["scale"]])

    keys = jax.random.split(jax.random.PRNGKey(2), 4000)
    full, draws = jax.jit(lambda ks: (natgrad(None, None), jax.vmap(partial(natgrad, BATCH))(ks)))(
        keys
    )
    mean, se = jnp.mean(draws, 0), jnp.std(draws, 0) / np.sqrt(len(keys))
    assert jnp.all(se > 0)  # the minibatch gradient is in fact random
    z = np.asarray((mean - full) / se)
    assert np.all(np.abs(z) < 4.5), z  # 4.5 SE over 15 coordinates: false alarm ~1e-4
    # power: the SE is small against the gradient itself, so a bias of a few percent (a missing
    # or wrong N/m scale is a bias of 90% of the likelihood term) would fail the check above
    assert np.median(np.abs(np.asarray(full)) / np.asarray(se)) > 20


# -- several devices, in a subprocess -----------------------------------------------------------

PROBLEM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro.infer.initialization import init_to_value
    import ngvi

    N, P = 4000, 4

    def model(X, y=None, batch=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", X.shape[0], subsample_size=batch) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])

    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, P)).astype(np.float32)
    y = (rng.random(N) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5, 0.0])))).astype("f4")

    def fit(X, y, steps, batch, seed=0):
        init = init_to_value(values={"w": jnp.zeros(P)})
        guide = ngvi.MeanFieldGaussian(model, init_strategy=init)
        r = ngvi.NGVI(model, guide).run(jax.random.PRNGKey(seed), steps, X, y=y, batch=batch,
                                        progress_bar=False, chunk_size=steps)
        return {k: np.asarray(v).tolist() for k, v in r.params.items()}, r.num_rejected
    """
)

CHILD = textwrap.dedent(
    """
    import glob, json, sys
    from ngvi.engine.sharding import shard_data

    steps, batch, dump = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    batch = None if batch == "none" else int(batch)
    out = {"devices": len(jax.devices())}
    try:
        shard_data(X[:-1], y[:-1])
    except ngvi.ConfigError as e:
        out["error"] = str(e)
    Xs, ys = shard_data(X, y)
    out["shard_devices"] = [len(Xs.sharding.device_set), len(ys.sharding.device_set)]
    out["shard_shapes"] = sorted({tuple(s.data.shape) for s in Xs.addressable_shards})
    out["four"], out["four_rejected"] = fit(Xs, ys, steps, batch)
    # the compiled scanned chunk of the sharded run, as XLA partitioned it (after GSPMD)
    hlo = []
    for f in glob.glob(dump + "/*jit_fn*after_optimizations.txt"):
        text = open(f).read()
        if "num_partitions=4" in text.splitlines()[0]:
            hlo.append({"all_reduce": text.count("all-reduce("),
                        "all_gather": text.count("all-gather("),
                        "rows_per_device": "f32[1000,4]" in text.splitlines()[0],
                        "while": " while(" in text})
    out["hlo"] = hlo
    print(json.dumps(out))
    """
)


def _sharded_vs_one_device(tmp_path, steps: int, batch) -> dict:
    """The 4-device fit in a subprocess (XLA flag) and, meanwhile, the same fit here on this
    process's one CPU device; returns the child's report with the one-device fit added."""
    script, dump = tmp_path / "child.py", tmp_path / "hlo"
    script.write_text(PROBLEM + CHILD)
    flags = (
        "--xla_force_host_platform_device_count=4 "
        f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*jit_fn.*"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(steps), str(batch).lower(), str(dump)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    ns: dict = {}
    exec(PROBLEM, ns)  # the same model, data and settings, here
    assert len(jax.devices()) == 1
    one = ns["fit"](ns["X"], ns["y"], steps, batch)
    other_seed = ns["fit"](ns["X"], ns["y"], steps, batch, seed=1)[0]
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    out["one"], out["one_rejected"] = one
    out["other_seed"] = other_seed
    return out


def _sd_distance(p: dict, q: dict) -> float:
    """Largest distance between two mean-field fits in units of the posterior sd:
    ``max_i max(|loc_p - loc_q| / scale_q, |log scale_p - log scale_q|)``."""
    loc = np.abs(np.subtract(p["loc"], q["loc"])) / np.asarray(q["scale"])
    scale = np.abs(np.log(p["scale"]) - np.log(np.asarray(q["scale"])))
    return float(max(loc.max(), scale.max()))


def _check_sharded_run(out: dict) -> None:
    """The sharded fit equals the one-device fit up to rounding carried through the fit.

    Error model: the two runs differ only in the order in which per-row terms are summed (a
    relative rounding of ~sqrt(N) * eps per sum), but the fit is adaptive: each accept test,
    damping update and Stein precision estimate feeds the next step, so rounding can be
    amplified (measured: 8e-5 relative after 30 steps on an AVX-512 Xeon, 0 on others), and a
    flipped accept decision would move the path by up to one step. What cannot differ is the
    posterior the fit lands on, at the scale of its own Monte Carlo noise: the distance between
    the two fits, in posterior sd, must be below a tenth of the distance between two seeds of the
    same one-device fit. A real sharding bug (a device's rows dropped or counted twice, a missing
    all-reduce, a wrong N/m scale) moves the posterior by O(1) sd."""
    assert out["devices"] == 4
    assert out["shard_devices"] == [4, 4] and out["shard_shapes"] == [[1000, 4]]
    # the sharded run's compiled chunk keeps 1000 rows per device (no gather of the data to one
    # device) and sums the ELBO, gradient and curvature terms over devices with all-reduces
    scans = [h for h in out["hlo"] if h["while"]]
    assert scans, out["hlo"]
    for h in scans:
        assert h["rows_per_device"] and h["all_reduce"] >= 1 and h["all_gather"] == 0, h
    assert abs(out["one_rejected"] - out["four_rejected"]) <= 1
    _assert_same_posterior(out["four"], out["one"], out["other_seed"])


def _assert_same_posterior(fit: dict, ref: dict, ref_other_seed: dict) -> None:
    """``fit`` is within a tenth of the seed-to-seed distance of ``ref`` (in posterior sd)."""
    noise = _sd_distance(ref_other_seed, ref)
    assert noise > 1e-3, noise  # the seed moves the fit: the band below is not vacuous
    assert _sd_distance(fit, ref) < 0.1 * noise, (fit, ref, noise)


@pytest.mark.slow  # 11-14 s (a subprocess compiles the fit); the slow job also runs the variants
def test_sharded_fit_matches_one_device(tmp_path):
    """4-device mesh (subprocess) vs one device (this process), same seed, full-data logistic
    regression on 4000 rows; the tolerance's error model is in ``_check_sharded_run``."""
    out = _sharded_vs_one_device(tmp_path, 30, None)
    assert "length 3999" in out["error"]  # X[:-1]: the argument, its length, the devices
    assert "4 devices" in out["error"] and "argument 0" in out["error"]
    _check_sharded_run(out)


@pytest.mark.slow  # ~30 s on a busy 2-core machine: a longer fit and a subsampled plate
@pytest.mark.parametrize("batch", [None, 400])
def test_sharded_fit_matches_one_device_long_and_subsampled(tmp_path, batch):
    """Same check over 300 steps, and with ``numpyro.plate(..., subsample_size=400)`` on the
    sharded rows (the subsample indices are drawn from the same key on every device)."""
    _check_sharded_run(_sharded_vs_one_device(tmp_path, 300, batch))


# -- several processes (hosts), JAX's own multi-process runtime ---------------------------------

HOSTS_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro.infer.initialization import init_to_value
    import ngvi

    N, P = 4000, 4

    def model(X, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, P)).astype(np.float32)
    y = (rng.random(N) < 1 / (1 + np.exp(-X @ np.array([1.0, -1.0, 0.5, 0.0])))).astype("f4")
    rows = np.array_split(np.arange(N), jax.process_count())[jax.process_index()]
    sharding = jax.sharding.NamedSharding(ngvi.data_mesh(), jax.sharding.PartitionSpec("data"))
    Xg = jax.make_array_from_process_local_data(sharding, X[rows])
    yg = jax.make_array_from_process_local_data(sharding, y[rows])
    out = {"global_devices": len(jax.devices()), "local": Xg.addressable_shards[0].data.shape}
    bad = y.copy()
    bad[3000] = 2.0  # held by process 1 only
    try:
        ngvi.make_target(model, (Xg,), {"y": jax.make_array_from_process_local_data(
            sharding, bad[rows])})
    except ngvi.DataError as e:
        out["error"] = str(e)
    guide = ngvi.MeanFieldGaussian(model, init_strategy=init_to_value(values={"w": jnp.zeros(P)}))
    r = ngvi.NGVI(model, guide).run(jax.random.PRNGKey(0), 30, Xg, y=yg, progress_bar=False,
                                    chunk_size=30)
    out["params"] = {k: np.asarray(v).tolist() for k, v in r.params.items()}
    ref = ngvi.NGVI(model, guide).run(jax.random.PRNGKey(0), 30, X, y=y, progress_bar=False,
                                      chunk_size=30)  # this process alone, unsharded
    out["ref"] = {k: np.asarray(v).tolist() for k, v in ref.params.items()}
    seed1 = ngvi.NGVI(model, guide).run(jax.random.PRNGKey(1), 30, X, y=y, progress_bar=False,
                                        chunk_size=30)
    out["ref_seed1"] = {k: np.asarray(v).tolist() for k, v in seed1.params.items()}
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # ~40 s on a busy 2-core machine: two processes, each compiles the fit
def test_two_processes_with_jax_distributed_match_one_device(tmp_path):
    """The README's multi-host recipe on one machine: two processes joined by
    ``jax.distributed.initialize`` (CPU collectives over gloo), a global mesh over both, each
    process holding its 2000 rows (``jax.make_array_from_process_local_data``). The data checks
    run on the devices (a bad label held by process 1 is reported by both) and the fit equals
    the one-process, one-device fit (error model as in ``_check_sharded_run``)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(HOSTS_CHILD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for out in outs:
        assert out["global_devices"] == 2 and out["local"] == [2000, 4]
        assert "observed site 'y' has value 2.0 at index (3000,)" in out["error"]
        _assert_same_posterior(out["params"], out["ref"], out["ref_seed1"])
    assert outs[0]["params"] == outs[1]["params"]  # one global fit, not two local ones
