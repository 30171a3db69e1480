"""The layout: stage scripts at the root on one package (chained_tuning/). No import cycle among the project's
modules (imports inside functions and importlib.import_module calls count: they run sooner or later), no stage
script imports another, each module imports on its own, and the tiny base needs only the synthetic text."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

PACKAGE = "chained_tuning"
STAGE_SCRIPTS = {"finetune", "evaluate", "curvature", "replay", "metrics", "order", "study", "tasks"}


def project_modules():
    """{dotted module name: file}: the root scripts (setup.py aside: it builds the extension) and the package."""
    mods = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))
            if os.path.basename(p) != "setup.py"}
    for p in glob.glob(os.path.join(ROOT, PACKAGE, "**", "*.py"), recursive=True):
        parts = os.path.relpath(p, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = project_modules()


def _package_of(name, path):
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def _resolve(target):
    """The project module an import of `target` loads last (a.b.c -> a.b.c, or a.b when c is a name in a.b)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name, path):
    """{project module: first line} for every import statement at any depth and every importlib.import_module("...")
    call with a literal name, relative imports resolved."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    pkg, edges = _package_of(name, path), {}

    def add(target, line):
        mod = _resolve(target)
        if mod and mod != name:
            edges[mod] = min(edges.get(mod, line), line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import mod` loads pkg.mod where that is a module
                add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node.lineno)
    return edges


def import_graph():
    graph = {m: imports_of(m, p) for m, p in MODULES.items()}
    for m in MODULES:  # importing a.b.c runs a and a.b first
        parts = m.split(".")
        for k in range(1, len(parts)):
            parent = ".".join(parts[:k])
            if parent in MODULES:
                graph[m].setdefault(parent, 0)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":  # n is on the path that led here
                return path[path.index(n):] + [m, n]
            if n not in state:
                found = visit(n, path + [m])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [])
            if found:
                return found
    return None


def reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_find_cycle_finds_one():
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert find_cycle(graph) in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 2}}) is None


def test_the_graph_sees_relative_function_level_and_importlib_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from .b import x\n")
    (pkg / "b.py").write_text("import importlib\nx = 1\ndef g():\n    return importlib.import_module('p.a')\n")
    saved = dict(MODULES)
    try:
        MODULES.clear()
        MODULES.update({"p": str(pkg / "__init__.py"), "p.a": str(pkg / "a.py"), "p.b": str(pkg / "b.py")})
        assert imports_of("p.a", MODULES["p.a"]) == {"p.b": 2}
        assert imports_of("p.b", MODULES["p.b"]) == {"p.a": 4}
        assert find_cycle(import_graph()) in (["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"])
    finally:
        MODULES.clear()
        MODULES.update(saved)


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert STAGE_SCRIPTS <= set(MODULES) and f"{PACKAGE}.common" in MODULES
    cycle = find_cycle(graph)
    where = cycle and ", ".join(f"{a} (line {graph[a][b]}) imports {b}" for a, b in zip(cycle, cycle[1:]))
    assert cycle is None, f"import cycle {' -> '.join(cycle)} ({where})"


def test_no_stage_script_imports_another():
    graph = import_graph()
    bad = [f"{m}.py:{line} imports {n}.py" for m in sorted(STAGE_SCRIPTS) for n, line in graph[m].items()
           if n in STAGE_SCRIPTS]
    assert not bad, "a stage script imports another (move what they share into the package): " + "; ".join(bad)
    stray = sorted(m for m in MODULES if "." not in m and m not in STAGE_SCRIPTS and m != PACKAGE)
    assert not stray, f"root modules that are not stage scripts (move them into {PACKAGE}/): {stray}"


def test_the_package_imports_no_stage_script():
    graph = import_graph()
    bad = [f"{m}:{line} imports {n}.py" for m in MODULES if m.startswith(PACKAGE) for n, line in graph[m].items()
           if n in STAGE_SCRIPTS]
    assert not bad, "; ".join(bad)


def test_tiny_base_needs_only_synthetic():
    graph = import_graph()
    base, synth = f"{PACKAGE}.data.tiny_base", f"{PACKAGE}.data.synthetic"
    assert reach(graph, synth) <= {PACKAGE, f"{PACKAGE}.data"}
    assert reach(graph, base) - {PACKAGE, f"{PACKAGE}.data"} == {synth}


def test_each_module_imports_on_its_own():
    # One interpreter (torch is slow to import), the project's modules dropped from sys.modules before
    # each import, so each one is imported as if it came first.
    base, synth = f"{PACKAGE}.data.tiny_base", f"{PACKAGE}.data.synthetic"
    code = ("import importlib, sys\n"
            f"mods = {sorted(MODULES)!r}\n"
            "for m in mods:\n"
            "    for k in mods:\n"
            "        sys.modules.pop(k, None)\n"
            "    importlib.import_module(m)\n"
            f"    if m == {base!r}:\n"
            f"        extra = sorted(set(mods) & set(sys.modules) - {{{base!r}, {synth!r}, {PACKAGE!r}, "
            f"{PACKAGE + '.data'!r}}})\n"
            "        assert not extra, f'import tiny_base also loaded {extra}'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
