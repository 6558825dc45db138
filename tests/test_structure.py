"""The package's structure: wings that import downward only, and a planning wing without torch.

Every module of ``lohan_compile/`` and ``passes/`` (installed as ``lohan_compile.passes``) is
parsed, and every import it makes, inside functions too, is an edge of the import graph. A
package ``__init__`` that only re-exports (imports, ``__all__``, a lazy ``__getattr__``) is not
a node: importing through it says nothing about the code's structure.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each wing imports only its own and lower wings (DESIGN.md, "Data flow").
WINGS = [
    ("shared helpers", ["errors", "units", "settings", "layout", "ext"]),
    ("planning (graph-free)", ["plan"]),
    ("options and hardware", ["options", "hardware"]),
    ("fx-level infrastructure and ops", ["graph", "ops"]),
    ("passes", ["passes"]),
    ("report", ["report"]),
    ("runtime", ["runtime", "adam_ops", "optim"]),
    ("tools below the backend", ["dump", "explainer", "measure", "zoo", "tinyllama", "wholestep"]),
    ("backend", ["backend"]),
    ("tools", ["cli", "hf", ""]),
]


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["lohan_compile", "passes", *parts[1:]]
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def _only_reexports(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue  # __all__, __version__, the lazy names
        if isinstance(node, ast.If):
            continue  # if TYPE_CHECKING:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        return False
    return True


def import_graph() -> dict[str, set[str]]:
    files = [*sorted((ROOT / "lohan_compile").rglob("*.py")), *sorted((ROOT / "passes").rglob("*.py"))]
    parsed = {}
    for f in files:
        name, package = _module_name(f)
        parsed[name] = (ast.parse(f.read_text()), package)
    modules = {name for name, (tree, package) in parsed.items() if not (package and _only_reexports(tree))}

    def resolve(target: str) -> str | None:
        while target and target not in parsed:
            target = target.rpartition(".")[0]
        return target if target in modules else None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name in modules:
        tree, package = parsed[name]
        here = name.split(".") if package else name.split(".")[:-1]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                # "from . import x" names a module x; "from .m import f" names m
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in parsed else base for a in node.names]
            for t in targets:
                if t.startswith("lohan_compile"):
                    dep = resolve(t)
                    if dep is not None and dep != name:
                        graph[name].add(dep)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def _wing(module: str) -> int:
    rest = module.removeprefix("lohan_compile").removeprefix(".")
    top = rest.split(".")[0]
    for rank, (_, tops) in enumerate(WINGS):
        if top in tops:
            return rank
    raise AssertionError(f"{module} belongs to no wing: add it to WINGS in {__file__}")


def test_the_graph_sees_every_import():
    graph = import_graph()
    assert "lohan_compile" not in graph  # its __init__ only re-exports (lazily)
    assert "lohan_compile.runtime.keys" in graph["lohan_compile.backend.compiler"]
    assert "lohan_compile.adam_ops" in graph["lohan_compile.optim"]  # imported inside a function
    assert "lohan_compile.plan.simulate" in graph["lohan_compile.plan.profile"]


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_wing_imports_only_its_own_and_lower_wings():
    upward = [
        f"{m} ({WINGS[_wing(m)][0]}) imports {d} ({WINGS[_wing(d)][0]})"
        for m, deps in sorted(import_graph().items()) for d in sorted(deps) if _wing(d) > _wing(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_planning_wing_imports_no_torch():
    code = (
        "import sys\n"
        "import lohan_compile.plan.policies, lohan_compile.plan.schedule, lohan_compile.plan.program\n"
        "import lohan_compile.plan.profile, lohan_compile.plan.simulate, lohan_compile.plan.problem\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("wing", ["plan"])
def test_a_wing_package_has_no_code_of_its_own(wing):
    tree = ast.parse((ROOT / "lohan_compile" / wing / "__init__.py").read_text())
    assert _only_reexports(tree)


def test_public_names_are_not_shadowed_by_submodules():
    """Importing a submodule sets it as an attribute of its package: a public name of the
    package that is also a submodule's name would turn into that module."""
    import importlib
    import pkgutil
    import types

    import lohan_compile as lohan

    for info in pkgutil.walk_packages(lohan.__path__, "lohan_compile."):
        if info.name.split(".")[-1] != "hf":  # (needs transformers; its name is no public name)
            importlib.import_module(info.name)
    for name in lohan.__all__:
        assert not isinstance(getattr(lohan, name), types.ModuleType), name
    assert callable(lohan.explain) and callable(lohan.last_report) and callable(lohan.materialized)


def test_every_package_is_installed():
    """A non-editable install ships only the packages pyproject.toml lists (tests/test_install.py
    installs one; this says which folder is missing, in milliseconds)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lohan_compile").rglob("__init__.py")}
    found |= {"lohan_compile.passes", "lohan_compile.csrc"}  # passes/ and csrc/ through package-dir
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
