"""Checkpoints of the engine state: arrays and plain metadata in one ``.npz``, never pickle.

A checkpoint holds every leaf of ``NGVIState`` (parameters, averaged parameters, damping, RNG
key, step and rejection counters; guide statistics live inside the parameters) under its pytree
path, plus a JSON header naming the guide class and the model's latent layout. It is written to a
temporary file in the same folder and renamed over the old one, so a fit killed at any moment
leaves either the previous checkpoint or the new one, never half of one. Loading uses
``numpy.load(allow_pickle=False)``: a checkpoint can never run code.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ngvi.errors import NGVIError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

_FORMAT = "ngvi-checkpoint-3"  # 2: the convergence check's state; 3: the particles' boost
_META = "__meta__"


class CheckpointError(NGVIError, ValueError):
    """A checkpoint that is corrupt or was written by another model or guide."""


def _leaf_names(state) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    return names, [leaf for _, leaf in flat], treedef


def _header(state, guide) -> dict:
    names, leaves, _ = _leaf_names(state)
    return {
        "format": _FORMAT,
        "guide": type(guide).__name__,
        "model": guide.target.signature,
        "leaves": {n: [list(np.shape(x)), str(np.asarray(x).dtype)] for n, x in zip(names, leaves)},
    }


def save_checkpoint(path: str | os.PathLike, state, guide) -> None:
    """Write ``state`` atomically (temporary file + rename) to ``path``."""
    path = Path(path)
    names, leaves, _ = _leaf_names(state)
    arrays = {n: np.asarray(x) for n, x in zip(names, leaves)}
    meta = json.dumps(_header(state, guide)).encode()
    arrays[_META] = np.frombuffer(meta, dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, template, guide):
    """Read a checkpoint into the structure of ``template`` (a state from ``NGVI.init`` on the
    same model and data), checking the guide, the model layout and every leaf's shape/dtype."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f[_META]).decode())
            stored = {k: f[k] for k in f.files if k != _META}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        # EOFError: an empty (0-byte) file, e.g. a disk that filled up before the first write
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable or corrupt ({type(e).__name__}: {e}); "
            "delete it to start the fit afresh, or point checkpoint= at an intact file."
        ) from e
    expected = _header(template, guide)
    if meta.get("format") != expected["format"]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {meta.get('format')!r} but this version of "
            f"ngvi writes {expected['format']!r}: it was written by another version. Finish the "
            "fit with that version, or delete the file to start afresh."
        )
    for key, what in (("guide", "guide"), ("model", "model layout")):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has {what} {meta.get(key)!r} but this fit has "
                f"{expected[key]!r}: it was written by another model or guide. Use another "
                "checkpoint path or delete the file."
            )
    names, leaves, treedef = _leaf_names(template)
    out = []
    for name, leaf in zip(names, leaves):
        if name not in stored or meta["leaves"].get(name) != expected["leaves"][name]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: state entry {name} is missing or has another "
                f"shape/dtype ({meta['leaves'].get(name)} vs {expected['leaves'][name]}); it "
                "was written by another configuration (dtype, guide options)."
            )
        out.append(jax.numpy.asarray(stored[name], dtype=np.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
