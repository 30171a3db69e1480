"""The layout of the project's modules: no import cycle among them (imports inside functions count: they
run sooner or later), each imports on its own, and the tiny base needs only synthetic.py."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))
                 if os.path.basename(p) != "setup.py")  # setup.py builds the extension; nothing imports it


def import_graph():
    """{module: {imported project module: first line}} from every import statement, at any depth."""
    graph = {}
    for m in MODULES:
        with open(os.path.join(ROOT, m + ".py")) as f:
            tree = ast.parse(f.read(), m + ".py")
        edges = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in MODULES and top != m:
                    edges[top] = min(edges.get(top, node.lineno), node.lineno)
        graph[m] = edges
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


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert {"common", "tasks", "synthetic", "tiny_base", "finetune", "evaluate"} <= set(MODULES)
    cycle = find_cycle(graph)
    where = cycle and ", ".join(f"{a}.py:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
    assert cycle is None, f"import cycle {' -> '.join(cycle)} ({where})"


def test_tiny_base_needs_only_synthetic():
    graph = import_graph()
    assert graph["synthetic"] == {}
    assert reach(graph, "tiny_base") == {"synthetic"}


def test_each_module_imports_on_its_own():
    # One interpreter (torch is slow to import), the project's modules dropped from sys.modules before
    # each import, so each one is imported as if it came first.
    code = ("import importlib, sys\n"
            f"mods = {MODULES!r}\n"
            "for m in mods:\n"
            "    for k in mods:\n"
            "        sys.modules.pop(k, None)\n"
            "    importlib.import_module(m)\n"
            "    if m == 'tiny_base':\n"
            "        extra = sorted(set(mods) & set(sys.modules) - {'tiny_base', 'synthetic'})\n"
            "        assert not extra, f'import tiny_base also loaded {extra}'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
