"""``split``, ``fold_in`` and ``normal`` bit for bit as ``jax.random``'s, without its CPU loop.

JAX lowers the Threefry-2x32 hash on CPU as a rolled loop of its five rounds (to keep compiles
short): each call then runs as a dozen small kernels a round, about 3 us however few numbers it
makes. An NGVI step splits its key and draws its noise: on a 2- to 10-dimensional model that was
half of the step (measured: 3.1 us of a 6 us step; 33 us for 4 x 501 normals). Here the same hash
is written out round by round, so XLA fuses it into one kernel: 0.5 us, 2.1 us and 10.6 us for
d = 10, 100 and 501 (``split(key, 3)`` and ``normal`` of 4 x d, in a scan; measured on this
module's prototype).

The numbers are the same bits as ``jax.random.split(key, n)``, ``jax.random.fold_in(key, i)``
and ``jax.random.normal(key, shape, dtype)`` for a raw ``uint32[2]`` Threefry key under JAX's
default (partitionable) Threefry (``tests/test_random.py`` checks equality); an eager call
(outside a compiled program) and any other key, backend or setting fall back to ``jax.random``
itself, so a fit is the same whichever path drew its noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["fold_in", "normal", "split"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (Salmon et al. 2011; 20 rounds), as JAX's unrolled lowering:
    ``(x1, x2)`` uint32 counters under the key ``(k1, k2)``."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            a = a + b
            b = _rotl(b, r) ^ a
        a = a + ks[(i + 1) % 3]
        b = b + ks[(i + 2) % 3] + np.uint32(i + 1)
    return a, b


def _fast(key) -> bool:
    """Whether ``key`` takes the written-out path: a raw uint32[2] Threefry key, traced (inside
    a compiled program: called eagerly, the path would compile its conditional afresh, ~0.1 s a
    call, where ``jax.random``'s own cached program gives the same bits), on CPU under the
    partitionable Threefry ``jax.random`` uses by default."""
    return (
        jax.default_backend() == "cpu"
        and isinstance(key, jax.core.Tracer)
        and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and key.dtype == np.uint32
        and key.shape == (2,)
        and jax.config.jax_threefry_partitionable
        and jax.config.jax_default_prng_impl == "threefry2x32"
    )


def _iota_2x32(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(high, low)`` 32-bit halves of a 64-bit iota of ``shape`` (sizes below 2^32)."""
    lo = lax.iota(np.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    return jnp.zeros(shape, np.uint32), lo


def split(key, num: int = 2) -> jax.Array:
    """``jax.random.split(key, num)``: (num, 2) new keys."""
    if not _fast(key):
        return jax.random.split(key, num)
    hi, lo = _iota_2x32((num,))
    b1, b2 = threefry2x32(key[0], key[1], hi, lo)
    return jnp.stack([b1, b2], axis=1)


def fold_in(key, data: int) -> jax.Array:
    """``jax.random.fold_in(key, data)`` for a non-negative ``data < 2^32``: the hash of the
    counter pair ``(0, data)``."""
    if not _fast(key) or not isinstance(data, int) or not 0 <= data < 2**32:
        return jax.random.fold_in(key, data)
    zero, count = jnp.zeros((1,), np.uint32), jnp.full((1,), data, np.uint32)
    b1, b2 = threefry2x32(key[0], key[1], zero, count)
    return jnp.concatenate([b1, b2])


def normal(key, shape: tuple[int, ...], dtype=None) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``: ``sqrt(2) erfinv(u)`` with ``u`` uniform on
    ``[nextafter(-1, 0), 1)`` from the mantissa bits of the hash of a 64-bit iota."""
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    if not _fast(key) or dtype not in (jnp.float32, jnp.float64):
        return jax.random.normal(key, shape, dtype)
    shape = tuple(shape)
    draw = lambda k: _normal_bits(k, shape, dtype)
    # a kernel of its own (both branches are the same): XLA would otherwise copy the hash into
    # each consumer of the noise (an antithetic concatenate computed it once per output element:
    # steps 15-50% slower). ``ngvi.numerics.fusion.unfused``'s trick, but with a predicate read from
    # the integer key: its ``isfinite`` of an integer is a constant, and the cond would fold away
    return lax.cond(key[0] == key[0], draw, draw, key)


def _normal_bits(key, shape, dtype):
    b1, b2 = threefry2x32(key[0], key[1], *_iota_2x32(shape))
    finfo = jnp.finfo(dtype)
    if finfo.bits == 64:
        bits = (b1.astype(np.uint64) << np.uint64(32)) | b2.astype(np.uint64)
    else:
        bits = b1 ^ b2
    udt = bits.dtype
    one = jnp.asarray(np.array(1.0, dtype).view(udt), udt)
    float_bits = lax.shift_right_logical(bits, jnp.asarray(finfo.bits - finfo.nmant, udt)) | one
    floats = lax.bitcast_convert_type(float_bits, dtype) - jnp.array(1.0, dtype)
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    hi = np.array(1.0, dtype)
    u = lax.max(jnp.asarray(lo), floats * (hi - lo) + lo)
    return lax.mul(np.array(np.sqrt(2), dtype), lax.erf_inv(u))
