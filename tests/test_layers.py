"""The layering rules of docs/architecture.md, checked on the source files.

(a) import-linter's contracts in pyproject.toml ([tool.importlinter]): the layers
    cli > analysis > compiler > quantizer | passes > runtime, and the ground floor (every module
    directly in ``ttfsc``) importing none of those six packages;
(b) no import cycle between modules (imports inside functions included);
(c) no module of the ttfsc packages uses another module's private name, neither
    ``from x import _y`` nor ``x._y`` on an imported module ``x``.

(a) and (b) read the graph with grimp, which finds a package's modules by walking the folder
that ``import ttfsc`` resolves to. The editable install maps ``ttfsc`` to core/ and its
subpackages to sibling folders (pyproject's package-dir), which grimp cannot follow, so the
fixture first copies the sources into one ``ttfsc/`` tree, laid out from that same mapping, and
runs grimp and import-linter in a subprocess whose ``sys.path`` starts there.

(c) leaves tests/ out on purpose: a unit test of a private helper is white-box by design and is
not part of the layering; the rule guards the boundaries between the package's modules.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import networkx as nx
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def package_dirs() -> dict[str, pathlib.Path]:
    """Package name -> its source folder, from pyproject's [tool.setuptools] package-dir."""
    with open(PYPROJECT, "rb") as f:
        cfg = tomllib.load(f)
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    return {pkg: ROOT / folder for pkg, folder in mapping.items()}


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the ttfsc packages (dotted name -> source file)."""
    out = {}
    for pkg, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    """The sources copied into one ``ttfsc/`` tree, as an installed wheel would lay them out."""
    top = tmp_path_factory.mktemp("layers")
    for pkg, folder in package_dirs().items():
        dst = top.joinpath(*pkg.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        for path in folder.glob("*.py"):
            shutil.copy2(path, dst / path.name)
    return top


def run_in_tree(tree: pathlib.Path, code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` with ``tree`` first on sys.path, so ``ttfsc`` is the copy."""
    env = dict(os.environ, PYTHONPATH=str(tree), COLUMNS="200")
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------
# (a) import-linter contracts

LINT = f"""
import sys
from importlinter.cli import lint_imports_command
sys.argv = ["lint-imports", "--config", {str(PYPROJECT)!r}, "--no-cache", "--no-logo"]
lint_imports_command()
"""


def test_import_linter_contracts_kept(tree):
    pytest.importorskip("importlinter", reason="import-linter 2.16 needs Python >= 3.11")
    res = run_in_tree(tree, LINT)
    report = res.stdout + res.stderr
    print(report)
    assert "Analyzed" in report, "import-linter did not run:\n" + report
    kept = res.returncode == 0
    assert kept, "broken import-linter contracts:\n" + report


# --------------------------------------------------------------------------------------------
# (b) no cycles

GRAPH = """
import json, grimp
g = grimp.build_graph("ttfsc", cache_dir=None)
print(json.dumps({"modules": sorted(g.modules), "edges": sorted(
    [m, i, sorted(d["line_number"] for d in g.get_import_details(importer=m, imported=i))]
    for m in g.modules for i in g.find_modules_directly_imported_by(m))}))
"""


def import_graph(tree) -> nx.DiGraph:
    res = run_in_tree(tree, GRAPH)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    missing = set(module_files()) - set(data["modules"])
    assert not missing, f"grimp did not see {sorted(missing)}"
    g = nx.DiGraph()
    g.add_nodes_from(data["modules"])
    for importer, imported, lines in data["edges"]:
        g.add_edge(importer, imported, lines=lines)
    return g


def cycles_of(g: nx.DiGraph, limit: int = 20) -> list[list[str]]:
    """Up to ``limit`` simple cycles, shortest first, each as a list of modules."""
    found = []
    for comp in nx.strongly_connected_components(g):
        sub = g.subgraph(comp)
        if len(comp) > 1 or sub.has_edge(*(2 * tuple(comp))):
            found.extend(nx.simple_cycles(sub, length_bound=6))
    return sorted(found, key=lambda c: (len(c), c))[:limit]


def describe(g: nx.DiGraph, cycle: list[str]) -> str:
    hops = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(f"{a} (l.{','.join(map(str, g.edges[a, b]['lines']))})"
                       for a, b in hops) + f" -> {cycle[0]}"


def test_no_import_cycles(tree):
    pytest.importorskip("grimp", reason="grimp comes with import-linter (Python >= 3.11)")
    g = import_graph(tree)
    cycles = cycles_of(g)
    for c in cycles:
        print(describe(g, c))
    assert not cycles, "import cycles:\n" + "\n".join(describe(g, c) for c in cycles)


# --------------------------------------------------------------------------------------------
# (c) no other module's private names

def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def private_uses(module: str, path: pathlib.Path, modules: set[str]) -> list[str]:
    """``path:line: what`` for each use of another ttfsc module's private name in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.stem == "__init__"
    bound: dict[str, str] = {}  # local name -> the ttfsc module it is bound to
    out = []

    def flag(node, what):
        out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module} uses {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "ttfsc":
                    continue
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
                if any(is_private(p) for p in a.name.split(".")[1:]):
                    flag(node, a.name)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, is_package, node)
            if source.split(".")[0] != "ttfsc":
                continue
            for a in node.names:
                full = f"{source}.{a.name}"
                if full in modules:
                    bound[a.asname or a.name] = full
                if is_private(a.name) and source != module:
                    flag(node, full)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in bound:
            continue
        target = bound[base.id]
        for attr in chain:
            if is_private(attr):
                if target != module:
                    flag(node, f"{target}.{attr}")
                break
            if f"{target}.{attr}" not in modules:
                break  # an object of that module: its attributes are not module names
            target = f"{target}.{attr}"
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_no_private_names_across_modules():
    files = module_files()
    modules = set(files)
    uses = [u for m, p in files.items() for u in private_uses(m, p, modules)]
    for u in uses:
        print(u)
    assert not uses, f"{len(uses)} uses of another module's private name:\n" + "\n".join(uses)
