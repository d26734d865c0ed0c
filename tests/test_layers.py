"""The package's layers: imports between ngvi's folders run only downward, the library never
imports the bundled ``models``, and each folder says what lives there."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ngvi"

#: lowest first; a unit imports only units of a strictly lower rank (or itself)
RANK = {
    "errors": 0,
    "numerics": 1,
    "families": 2,
    "model": 3,
    "guides": 4,
    "em": 4,
    "engine": 5,
    "nn": 6,
    "report": 6,
    "cli": 7,
    "__init__": 8,
}


def _unit(module: str) -> str:
    """``ngvi.guides.kfac`` -> ``guides``; ``ngvi`` (the package itself) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imports_in(path.read_text(), package)


def _imports_in(text: str, package: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((node.lineno, mod))
            if mod == "ngvi":  # ``from ngvi import em`` imports the unit ``ngvi.em``
                subs = [a.name for a in node.names if a.name in RANK or a.name == "models"]
                out += [(node.lineno, f"ngvi.{u}") for u in subs]
                if len(subs) < len(node.names):  # a name of the package itself (ngvi.NGVI)
                    out.append((node.lineno, "ngvi.__init__"))
    return out


def _bundled(mod: str) -> bool:
    """The bundled models, under their installed name ``ngvi.models`` or the folder's ``models``."""
    return mod.split(".")[0] == "models" or mod == "ngvi.models" or mod.startswith("ngvi.models.")


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {_unit(_module_name(f)) for f in FILES}
    assert units <= set(RANK), f"modules outside the known layers: {units - set(RANK)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_run_downward(path):
    here = _unit(_module_name(path))
    bad = []
    for line, mod in _imports(path):
        if _bundled(mod):
            bad.append(f"line {line}: imports the bundled models ({mod})")
        if mod.split(".")[0] != "ngvi" or mod == "ngvi":  # the bare package: its units follow
            continue
        there = _unit(mod)
        if there in RANK and there != here and RANK[there] >= RANK[here]:
            bad.append(
                f"line {line}: {here} (rank {RANK[here]}) imports {mod} (rank {RANK[there]})"
            )
    assert not bad, "\n".join(bad)


def test_the_rule_sees_function_level_and_relative_imports():
    """The checker itself: a deferred engine import inside a guide, and a relative one."""
    text = "from .base import Guide\ndef f():\n    from ngvi.engine.infer import NGVI\n"
    assert [m for _, m in _imports_in(text, "ngvi.guides")] == [
        "ngvi.guides.base",
        "ngvi.engine.infer",
    ]
    assert RANK[_unit("ngvi.engine.infer")] > RANK[_unit("ngvi.guides.base")]


def test_the_rule_sees_the_bundled_models_under_every_name():
    text = "import models\nfrom ngvi import models, em\nfrom ngvi.models.funnel import model\n"
    mods = [m for _, m in _imports_in(text, "ngvi.cli")]
    assert sorted(m for m in mods if _bundled(m)) == ["models", "ngvi.models", "ngvi.models.funnel"]
    assert "ngvi.__init__" not in mods  # ``models`` and ``em`` are units, not package names


@pytest.mark.parametrize("folder", sorted(p.parent for p in ROOT.glob("*/__init__.py")))
def test_each_folder_says_what_lives_there(folder):
    doc = importlib.import_module(_module_name(folder / "__init__.py")).__doc__
    assert doc and len(doc.split()) >= 8, f"{folder.name}/__init__.py needs a docstring"
