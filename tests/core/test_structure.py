"""The tree's own rules, checked statically: the driver contract is called, never probed for;
no import circles among qimg's modules; no module over 600 lines."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

from qimg.core.driver import Driver

ROOT = pathlib.Path(__file__).resolve().parents[2] / "qimg"
MAX_LINES = 600
#: modules allowed past MAX_LINES (none: split a module before it grows past the limit)
LONG_MODULES: set[str] = set()


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        yield rel, path


def _driver_names() -> set[str]:
    """Every public name of the driver contract: hooks, capabilities and the attributes set in __init__."""
    names = {n for n in dir(Driver) if not n.startswith("_")}
    return names | {"store", "filename", "writable", "opener", "virtual_size", "backing"}


def _lookups(tree):
    """(line, attribute name or None) of every getattr/hasattr call; None: a name computed at run time."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
            arg = node.args[1]
            name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            yield node.lineno, name


def test_no_driver_hook_is_looked_up_by_name_outside_core():
    hooks = _driver_names()
    found = []
    for rel, path in _modules():
        if rel.startswith(("qimg/core/", "qimg/io/")):
            continue  # core owns the contract; io/ probes the caller's file objects, never a driver
        for line, name in _lookups(ast.parse(path.read_text(), rel)):
            if name in hooks:
                found.append(f"{rel}:{line}: {name}")
    assert found == []


@pytest.mark.parametrize("layer", ["ops", "engine", "cli"])
def test_upper_layers_look_nothing_up_by_a_computed_name(layer):
    found = [f"{rel}:{line}" for rel, path in _modules() if rel.startswith(f"qimg/{layer}/")
             for line, name in _lookups(ast.parse(path.read_text(), rel)) if name is None]
    assert found == []


def test_the_scan_sees_a_hook_lookup():
    tree = ast.parse("def f(drv):\n    return getattr(drv, 'snapshot_create', None), hasattr(drv, 'x')\n")
    assert list(_lookups(tree)) == [(2, "snapshot_create"), (2, "x")]
    assert "snapshot_create" in _driver_names() and "lock_passthrough" in _driver_names()


def test_no_module_is_longer_than_the_limit():
    lengths = {rel: len(path.read_text().splitlines()) for rel, path in _modules()}
    assert {rel: n for rel, n in lengths.items() if n > MAX_LINES and rel not in LONG_MODULES} == {}


def _module_names():
    """{dotted name: (path, package its relative imports start from)}."""
    out = {}
    for _rel, path in _modules():
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = ".".join(parts)
        else:
            package = ".".join(parts[:-1])
        out[".".join(parts)] = (path, package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Which qimg modules each one imports, at module level or inside functions (a lazy import
    still ties the two modules together: it only moves the circle to run time)."""
    names = _module_names()
    graph = {}
    for name, (path, package) in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in names else base)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "qimg.core.catalog" in graph["qimg.core.registry"]
    assert "qimg.formats.qcow2.lifecycle" in graph["qimg.formats.qcow2.bitmap_edit"]


@pytest.mark.parametrize("name", sorted(n for n in _module_names() if n != "qimg.__main__"))
def test_every_module_imports(name):
    importlib.import_module(name)


def _environment_writes(tree):
    """Lines that change the process environment: os.environ[...] = ..., os.environ.setdefault/update/pop, putenv."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func)
            if target in ("os.putenv", "os.unsetenv") or (
                    target.startswith("os.environ.") and node.func.attr in ("setdefault", "update", "pop", "clear")):
                yield node.lineno
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            if any(isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ" for t in targets):
                yield node.lineno


def test_only_the_program_changes_the_environment():
    found = [f"{rel}:{line}" for rel, path in _modules() if not rel.startswith("qimg/cli/")
             for line in _environment_writes(ast.parse(path.read_text(), rel))]
    assert found == []
    probe = ast.parse("import os\nos.environ.setdefault('A', '1')\nos.environ['B'] = '2'\n")
    assert sorted(_environment_writes(probe)) == [2, 3]


def _prints(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = ast.unparse(node.func)
            if target == "print" or target.startswith(("sys.stderr.", "sys.stdout.")):
                yield node.lineno


@pytest.mark.parametrize("layer", ["core", "formats", "io", "ops", "crypto", "api"])
def test_layers_below_the_command_line_print_nothing(layer):
    found = [f"{rel}:{line}" for rel, path in _modules() if rel.startswith(f"qimg/{layer}/")
             for line in _prints(ast.parse(path.read_text(), rel))]
    assert found == []
