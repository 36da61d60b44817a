"""The layout's import directions hold: the import-linter contracts in pyproject.toml pass, a wrong-way import
breaks them, and no provision module takes part in an import cycle (imports inside functions and under
TYPE_CHECKING count)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold() -> None:
    out = _lint(ROOT, ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and " 0 broken" in out.stdout


def test_a_model_module_importing_a_stage_breaks_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "provision", tmp_path / "provision", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layers = tmp_path / "provision" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _wrong() -> None:\n    import provision.stages.verify  # noqa\n")
    out = _lint(tmp_path, tmp_path)
    assert out.returncode != 0
    assert "provision.model.layers -> provision.stages.verify" in out.stdout


def _cycles() -> list[list[str]]:
    graph = grimp.build_graph("provision", include_external_packages=False)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def test_no_provision_module_is_part_of_an_import_cycle() -> None:
    assert _cycles() == []
