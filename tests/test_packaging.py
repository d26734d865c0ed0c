"""What an install ships: the bundled models as ``ngvi.models``, never as a top-level
``models`` (which would shadow a user's own module of that name), with entry points naming them
there. Checked on setuptools' ``build_py`` + ``egg_info`` output (the files a wheel's purelib
gets, ~1 s, offline with any setuptools) and, marked slow, on a real ``pip wheel`` (with
``--no-build-isolation`` where the installed setuptools can build wheels, else an isolated build
that installs setuptools first)."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Built(NamedTuple):
    files: set[str]  # posix paths relative to the install root (site-packages)
    site: Path  # a directory laid out like site-packages
    entry_points: configparser.ConfigParser
    top_level: list[str]


def _source_copy(tmp: Path) -> Path:
    """The files the build reads, copied (building writes into its source tree)."""
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("ngvi", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def _run(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"


def _build_py(tmp: Path) -> Path:
    site = tmp / "site"
    site.mkdir()
    setup = "from setuptools import setup; setup()"
    cmd = ["-q", "egg_info", "--egg-base", str(site), "build_py", "--build-lib", str(site)]
    _run([sys.executable, "-c", setup, *cmd], _source_copy(tmp))
    return site


def _backend_builds_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels by itself; older ones need the ``wheel`` package."""
    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist")]
    if _backend_builds_wheels_offline():
        cmd.append("--no-build-isolation")
    _run([*cmd, str(_source_copy(tmp))], tmp)
    (wheel,) = (tmp / "dist").glob("ngvi-*.whl")
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install would lay down
    return site


@pytest.fixture(scope="module", params=["build_py", pytest.param("wheel", marks=pytest.mark.slow)])
def built(request, tmp_path_factory) -> Built:
    site = (_build_py if request.param == "build_py" else _wheel)(tmp_path_factory.mktemp("b"))
    files = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    (meta,) = [p for p in site.iterdir() if p.suffix in (".egg-info", ".dist-info")]
    eps = configparser.ConfigParser()
    eps.read_string((meta / "entry_points.txt").read_text())
    top_level = (meta / "top_level.txt").read_text().split()
    return Built({f for f in files if not f.startswith(meta.name)}, site, eps, top_level)


def test_models_install_under_ngvi_not_top_level(built):
    tops = {f.split("/")[0] for f in built.files}
    assert tops == {"ngvi"}, f"the install has top-level entries {sorted(tops)}"
    assert "models" not in built.top_level
    bundled = {f"ngvi/models/{p.name}" for p in (ROOT / "models").glob("*.py")}
    assert bundled | {"ngvi/models/references.json"} <= built.files


def test_entry_points_name_modules_that_ship(built):
    models = dict(built.entry_points["ngvi.models"])
    assert set(models) == {p.stem for p in (ROOT / "models").glob("*.py")} - {
        "__init__",
        "make_references",
    }
    for name, module in models.items():
        assert module == f"ngvi.models.{name}"
        assert module.replace(".", "/") + ".py" in built.files


def test_installed_layout_loads_bundled_models(built, tmp_path):
    """From the built files alone: the loader finds a bundled model by its entry point, and a
    model that imports another one (``bayes_gmm`` -> ``gaussian_mixture``) imports."""
    code = (
        "import ngvi.models.bayes_gmm as b, ngvi.models as m\n"
        "from ngvi.model.loader import load\n"
        "fn, args, kwargs = load('eight_schools')\n"
        "print(m.__file__); print(b.__file__); print(fn.__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(built.site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    init, gmm, module = out.stdout.split()
    assert Path(init).is_relative_to(built.site) and Path(gmm).is_relative_to(built.site)
    assert module == "ngvi.models.eight_schools"
