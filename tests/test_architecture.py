"""The layout ARCHITECTURE.md promises: every module in a layer, small modules and classes.

import-linter (`lint-imports`, run by CI) checks the layers' imports; it says nothing of a
module no layer names, so this checks that each has one. A new top-level module of the
package must be given its layer in pyproject.toml.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import tomllib
from pathlib import Path

from helpers import ROOT

import inferq

MAX_MODULE_LINES = 600
MAX_CLASS_METHODS = 40


def _layered() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    names: set[str] = set()
    for contract in config["contracts"]:
        for layer in contract.get("layers", []):
            names.update(part.strip() for part in layer.replace(":", "|").split("|"))
    return names


def _modules() -> list[pkgutil.ModuleInfo]:
    return list(pkgutil.walk_packages(inferq.__path__, prefix="inferq."))


def test_every_module_of_the_package_belongs_to_a_layer():
    layered = _layered()
    loose = sorted({".".join(m.name.split(".")[:2]) for m in _modules()} - layered)
    assert not loose, f"modules in no layer of pyproject.toml's import-linter contract: {loose}"


def _source_files() -> list[Path]:
    package = Path(inferq.__file__).parent  # its folders are links: follow them
    return sorted(Path(folder, name) for folder, _, names in os.walk(package, followlinks=True)
                  for name in names if name.endswith(".py"))


def test_no_module_is_a_warehouse():
    long = {str(p.relative_to(ROOT)): n for p in _source_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {long}"


def test_no_class_is_a_warehouse():
    big = {}
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body
                           if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
                if len(methods) > MAX_CLASS_METHODS:
                    big[f"{path.relative_to(ROOT)}:{node.name}"] = len(methods)
    assert not big, f"classes over {MAX_CLASS_METHODS} methods: {big}"
