"""``ngvi.numerics.random``: the written-out Threefry draws the same bits as ``jax.random``
(split, fold_in, normal; eager and jitted; float32 and float64), and falls back to
``jax.random`` for keys it does not handle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngvi.numerics import random as fast

KEYS = [jax.random.PRNGKey(s) for s in (0, 1, 123456789)] + [
    jax.random.split(jax.random.PRNGKey(7), 3)[2]
]
SHAPES = [(), (1,), (5,), (4, 10), (3, 7), (2, 1, 3)]


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(jnp.all(a == b))


@pytest.mark.parametrize("key", KEYS)
def test_split_and_fold_in_are_jax_randoms_bits(key):
    for n in (1, 2, 3, 8):
        assert _same(fast.split(key, n), jax.random.split(key, n))
        assert _same(jax.jit(lambda k, n=n: fast.split(k, n))(key), jax.random.split(key, n))
    for data in (0, 1, 3, 2**31 + 5):
        assert _same(fast.fold_in(key, data), jax.random.fold_in(key, data))
        jitted = jax.jit(lambda k, data=data: fast.fold_in(k, data))(key)
        assert _same(jitted, jax.random.fold_in(key, data))


@pytest.mark.parametrize("key", KEYS)
def test_normal_is_jax_randoms_bits(key):
    for shape in SHAPES:
        ref = jax.random.normal(key, shape)
        assert _same(fast.normal(key, shape), ref)
        assert _same(jax.jit(lambda k, shape=shape: fast.normal(k, shape))(key), ref)
    with jax.enable_x64(True):
        for dtype in (jnp.float64, jnp.float32):
            ref = jax.random.normal(key, (4, 9), dtype)
            assert _same(jax.jit(lambda k, dtype=dtype: fast.normal(k, (4, 9), dtype))(key), ref)


def test_normal_draws_standard_normals():
    """Not only the same bits: the draws are N(0, 1). Moments of n draws within 4 standard
    errors: 1/sqrt(n) for the mean, 1/sqrt(2n) for the sd, sqrt(96/n) for E[x^4] = 3."""
    n = 200_000
    x = np.asarray(fast.normal(jax.random.PRNGKey(3), (n,)), np.float64)
    assert abs(x.mean()) < 4 / np.sqrt(n)
    assert abs(x.std() - 1) < 4 / np.sqrt(2 * n)
    assert abs((x**4).mean() - 3) < 4 * np.sqrt(96 / n)


def test_typed_keys_fall_back_to_jax_random():
    key = jax.random.key(5)
    assert not fast._fast(key)
    assert bool(jnp.all(fast.normal(key, (3,)) == jax.random.normal(key, (3,))))
    keys = fast.split(key, 2)
    assert bool(jnp.all(jax.random.key_data(keys) == jax.random.key_data(jax.random.split(key))))


def test_written_out_when_traced_and_jax_random_when_eager():
    """Inside a compiled program the hash is written out (the lowered program has no loop: JAX's
    own CPU lowering of Threefry is a rolled loop); an eager call goes to ``jax.random``'s own
    cached program, since the written-out path would compile its conditional afresh on every
    eager call (~0.1 s: a guide's start drew its noise eagerly twice a fit)."""
    key = KEYS[0]
    for f in (
        lambda k: fast.normal(k, (4, 9)),
        lambda k: fast.split(k, 3),
        lambda k: fast.fold_in(k, 3),
    ):
        assert "while" not in jax.jit(f).lower(key).as_text()
    assert "while" in jax.jit(lambda k: jax.random.normal(k, (4, 9))).lower(key).as_text()
    seen = []
    jax.jit(lambda k: seen.append(fast._fast(k)) or k)(key)
    assert seen == [True] and not fast._fast(key)
