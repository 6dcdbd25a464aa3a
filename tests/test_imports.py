"""The import graph of the project's own modules (distilled_decoding/, teachers/, tools/): no cycles, and
`teachers/` never reaches up into `distilled_decoding/`.

The graph is read from the source (AST), not from sys.modules, so lazy imports count too. An edge is:
- `import a.b` / `from a.b import c` / relative `from .x import y`, at any depth (function bodies too);
  `from pkg import name` points at `pkg.name` when that is a module, else at `pkg`;
- `importlib.import_module("a.b")`, `import_module(".b", "a")` and `__import__("a.b")` with literal strings;
- any other string literal that spells a project module, alone or as "module:attr" (the lazy registries
  that feed importlib, e.g. {"var": "teachers.var"}); docstrings are skipped.
Importing `a.b` also runs `a/__init__.py`, but that implicit parent edge is not counted: a package's
`__init__` may re-export its submodules without making every submodule a cycle.
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set, Tuple


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("distilled_decoding", "teachers", "tools")   # tools/ holds scripts: scanned as "tools.<name>"
# "pkg.mod" or "pkg.mod:attr"; a bare word ("teachers") is too common in prose and options to count
MODULE_STRING = re.compile(r"[A-Za-z_]\w*((\.[A-Za-z_]\w*)+(:[\w.]+)?|:[\w.]+)")

Edge = Tuple[str, str, str]        # (target module, "file:line", how)


def project_modules(root: str = ROOT) -> Dict[str, str]:
    """module name -> file path, for every .py file under PACKAGES."""
    mods = {}
    for pkg in PACKAGES:
        base = os.path.join(root, pkg)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(dirpath, fn)
    return mods


def _docstring_nodes(tree: ast.AST) -> Set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _resolve_relative(name: str, level: int, module: str, is_package: bool) -> str:
    """`from <level dots><name> import ...` inside `module` -> the absolute module name."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def module_edges(module: str, path: str, modules: Dict[str, str]) -> List[Edge]:
    """Every edge from `module` (source file `path`) to a module in `modules`."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    tree = ast.parse(src, filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    siblings = {m.split(".")[-1]: m for m in modules if m.startswith("tools.")} if module.startswith("tools.") else {}
    edges: List[Edge] = []

    def target(name: str) -> str:
        """The deepest project module that `name` (a dotted import path) runs, or ''."""
        if module.startswith("tools.") and name.split(".")[0] in siblings:   # scripts import siblings bare
            name = "tools." + name
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in modules:
                return cand
        return ""

    def add(name: str, node: ast.AST, how: str) -> None:
        t = target(name)
        if t and t != module:
            edges.append((t, f"{os.path.basename(path)}:{node.lineno}", how))

    seen = _docstring_nodes(tree)      # string nodes not to read as registry entries
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node, "import")
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module or "", node.level, module, is_package) if node.level else node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                add(sub if sub in modules else base, node, "from-import")
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if fname in ("import_module", "__import__") and args:
                seen.update(id(a) for a in node.args)
                name = args[0]
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    pkg = args[1] if len(args) > 1 else module if is_package else module.rpartition(".")[0]
                    name = _resolve_relative(name[level:], level, pkg, True)
                add(name, node, f"{fname}({args[0]!r})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in seen
              and MODULE_STRING.fullmatch(node.value) and node.value.split(".")[0] in PACKAGES):
            name = node.value.partition(":")[0]
            if name in modules or ":" in node.value:
                add(name, node, f"string {node.value!r}")
    return edges


def import_graph(root: str = ROOT) -> Dict[str, List[Edge]]:
    mods = project_modules(root)
    return {m: module_edges(m, p, mods) for m, p in mods.items()}


def find_cycles(graph: Dict[str, List[Edge]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:     # recursion depth is bounded by the module count (~50)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, []):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe_cycles(graph: Dict[str, List[Edge]], cycles: List[List[str]]) -> str:
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append("cycle: " + " <-> ".join(comp))
        for m in comp:
            for t, where, how in graph[m]:
                if t in members:
                    lines.append(f"    {m} -> {t}   ({where}, {how})")
    return "\n".join(lines)


# ---- the tests -------------------------------------------------------------------------------------


def test_graph_sees_every_kind_of_import(tmp_path):
    """The scanner itself: each kind of edge the module docstring lists is found, a docstring is not,
    and a cycle made only of lazy imports is reported."""
    pkg = tmp_path / "teachers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""teachers.c"""\nOPTIONS = ["teachers"]\n')   # a docstring, a bare word
    (pkg / "a.py").write_text("def f():\n    from .b import x\n    return x\n")
    (pkg / "b.py").write_text("import importlib\nREG = {'k': 'teachers.c:Thing'}\n"
                              "def g():\n    return importlib.import_module('teachers.a')\n")
    (pkg / "c.py").write_text("def h():\n    return __import__('teachers.b')\n")
    (pkg / "d.py").write_text("from importlib import import_module\nM = import_module('.a', 'teachers')\n")
    graph = import_graph(str(tmp_path))
    got = {m: sorted((t, how.split("(")[0].split(" ")[0]) for t, _, how in e) for m, e in graph.items()}
    assert got == {
        "teachers": [],
        "teachers.a": [("teachers.b", "from-import")],
        "teachers.b": [("teachers.a", "import_module"), ("teachers.c", "string")],
        "teachers.c": [("teachers.b", "__import__")],
        "teachers.d": [("teachers.a", "import_module")],
    }
    assert find_cycles(graph) == [["teachers.a", "teachers.b", "teachers.c"]]


def test_teachers_import_nothing_from_distilled_decoding():
    graph = import_graph()
    bad = [f"{m} -> {t} ({where}, {how})" for m, edges in graph.items() if m.split(".")[0] == "teachers"
           for t, where, how in edges if t.split(".")[0] == "distilled_decoding"]
    assert not bad, "teachers/ is the base layer and must not import distilled_decoding/:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20, f"the scan found only {sorted(graph)}"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among the project's modules:\n" + describe_cycles(graph, cycles)
