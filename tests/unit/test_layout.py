"""No import cycles among the project's modules, the model apart from training, and the contract and the served
steps as ground floors (issue 22).

The modules are every ``.py`` file of the project's packages: each directory with an ``__init__.py`` whose parent
has none, found at most two levels below the repository root (``amc_model``, ``training``, ``export``, ``serving``,
``benchmarks``, ``ui``, ``deploy``, ``monitoring``, ``client/amc_client`` as ``amc_client``, ``client/amc_contract``
as ``amc_contract``, and any package added later), minus ``tests`` and build outputs. Folders inside a package
without an ``__init__.py`` are namespace packages: their files are modules too.

The rule, read with ``ast`` from every import statement of a file, at module level, inside a function or under
``if TYPE_CHECKING:`` alike: a lazy import is still a cycle, only deferred, and a type-only one still ties the two
modules together (issue 22 counted ``training.step`` <-> ``training.train``, a type-only import, as a circle). An
edge goes from the importing module to the project module whose code must run for the import to succeed:

- ``import a.b.c`` -> ``a.b.c``; ``import a`` -> ``a`` (the package's ``__init__``);
- ``from a.b import name`` -> ``a.b.name`` where that is a module (a submodule imported by name), else ``a.b``
  (``name`` is defined in ``a/b.py`` or ``a/b/__init__.py``); relative imports are resolved first.

Parent packages get no edge of their own: Python runs a package's ``__init__`` before any of its submodules, so
when a submodule runs, its package's ``__init__`` has either finished or is the very import that led to it. So a
package whose ``__init__`` imports its submodules, and submodules that import their siblings by full name
(``from amc_contract import signatures``, ``from . import _calls``), make no cycle. A submodule that takes a name
from its package's ``__init__`` (``from pkg import name``, ``name`` not a submodule) does depend on that
``__init__``: if the ``__init__`` imports that submodule (directly or through others), it is a cycle, and reported.

A cycle is a strongly connected component of this graph with more than one module; the failure names one shortest
cycle in each, with the file and line of every import on it. Imports by string (``importlib``) are not seen.

The same graph shows what the model package, export and serving take from ``training``: nothing, but for the edges
``FROM_TRAINING`` lists with their reason (the corpus, and the demo); export's modules also load without it. And
what the ground floors take from the rest: ``amc_contract`` nothing; ``amc_client`` only the contract; the served
steps (``serving/backends``, which publish vendors into each version folder as ``amc_steps`` beside a copy of
``amc_contract``) only the contract and each other, relatively.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Not the project's modules: tests, outputs, virtual environments, the generated model repository.
SKIP = {"tests", "runs", "build", "dist", "reports", "model_repository", "node_modules", "__pycache__"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every package found at most two levels below ``root`` (see the module docstring)."""
    tops = []
    for init in [*root.glob("*/__init__.py"), *root.glob("*/*/__init__.py")]:
        package = init.parent
        rel = package.relative_to(root).parts
        if any(p in SKIP or p.startswith(".") or p.endswith(".egg-info") for p in rel):
            continue
        if not (package.parent / "__init__.py").exists():
            tops.append(package)
    modules: dict[str, Path] = {}
    for package in tops:
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(package.parent).with_suffix("")
            if any(p in SKIP or p.startswith(".") for p in rel.parts):
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            name = ".".join(parts)
            if name in modules:
                raise AssertionError(f"module {name} is both {modules[name]} and {path}")
            modules[name] = path
    return modules


def import_graph(modules: dict[str, Path], root: Path = ROOT) -> dict[str, dict[str, str]]:
    """module -> {imported project module: "file:line" of the first import statement making that edge}."""
    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = f"{path.relative_to(root)}"
        for node in (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name in modules]
            else:
                if node.level:
                    base_parts = package.split(".") if package else []
                    if node.level - 1 > len(base_parts):
                        continue
                    base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                    source = ".".join(p for p in (base, node.module or "") if p)
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    elif source in modules:
                        targets.append(source)
            for target in targets:
                if target != name:
                    graph[name].setdefault(target, f"{where}:{node.lineno}")
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module, as ``[a, b, ..., a]``."""
    cycles = []
    for component in _components(graph):
        if len(component) < 2:
            continue
        members, start = set(component), component[0]
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first from start, inside the component, until an edge leads back to start
            node = queue.popleft()
            if start in graph[node]:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                cycles.append([start, *reversed(path[:-1]), start])
                break
            for child in sorted(graph[node]):
                if child in members and child not in previous and child != start:
                    previous[child] = node
                    queue.append(child)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_projects_modules_import_no_cycle():
    modules = project_modules()
    for package in ("amc_model", "training", "export", "serving", "benchmarks", "ui", "amc_client", "amc_contract"):
        assert package in modules, f"package {package} not found below {ROOT}"
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


# The model apart from training (issue 22, item 4): amc_model imports nothing from training, and export and serving
# import the model package, not the trainer. What they may still take from training, each with why; anything else,
# or an entry here that no longer happens, fails the test below.
FROM_TRAINING = {
    # The data set, not the trainer: --store-corpus and the default keyword table read the checkpoint's corpus.
    ("export.publish", "training.corpus"),
    # CLDR's emoji names (what text rules 2 read queries with) come from the corpus builder's CLDR parser.
    ("export.reference", "training.corpus.catalog"),
    # A corpus store's thumbnails: the corpus's own renderer draws the pictures its features were taken from.
    ("export.thumbnails", "training.corpus.render"),
    # make demo trains the model it then serves: the whole pipeline, not a serving module.
    ("serving.demo", "training.corpus"),
    ("serving.demo", "training.metrics"),
    ("serving.demo", "training.train"),
    ("serving.demo", "training.train_config"),
}


def _module_level_imports(path: Path) -> list[str]:
    """The modules ``path`` imports when it is loaded: module level statements and the branches of module-level
    ``if``/``try`` blocks, not the bodies of functions or classes."""
    out, todo = [], list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(node.module or "")
        elif isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return out


def test_the_model_package_export_and_serving_import_nothing_from_training():
    modules = project_modules()
    assert "amc_model.model" in modules and "amc_model.checkpoint" in modules and "amc_model.text_encoder" in modules
    graph = import_graph(modules)
    found = {(a, b): where for a, edges in graph.items() for b, where in edges.items()
             if a.split(".")[0] in ("amc_model", "export", "serving") and b.split(".")[0] == "training"}
    unexpected = [f"{a} -> {b} ({where})" for (a, b), where in sorted(found.items()) if (a, b) not in FROM_TRAINING]
    assert not unexpected, "imports from training outside FROM_TRAINING:\n    " + "\n    ".join(unexpected)
    assert not FROM_TRAINING - set(found), f"FROM_TRAINING lists imports that no longer happen: {FROM_TRAINING - set(found)}"
    # And export loads without training: its reads of the corpus sit inside the functions that need them.
    eager = {name: [m for m in _module_level_imports(path) if m.split(".")[0] == "training"]
             for name, path in modules.items() if name.split(".")[0] == "export"}
    assert not any(eager.values()), f"export modules importing training when loaded: { {k: v for k, v in eager.items() if v} }"


# What a package may import of the project: the contract nothing but itself; the client the contract (it installs on
# its own: pip install client/); the served steps the contract and each other (a version folder holds nothing else).
GROUND_FLOORS = {
    "amc_contract": ("amc_contract",),
    "amc_client": ("amc_client", "amc_contract"),
    "serving.backends": ("serving.backends", "amc_contract"),
}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_contract_the_client_and_the_steps_import_only_what_they_ship_with():
    modules = project_modules()
    graph = import_graph(modules)
    for package, allowed in GROUND_FLOORS.items():
        members = [m for m in modules if _inside(m, package)]
        assert members, f"no modules of {package}"
        wrong = [f"{a} -> {b} ({where})" for a in members for b, where in sorted(graph[a].items())
                 if not any(_inside(b, ok) for ok in allowed)]
        assert not wrong, f"{package} may import only {allowed} of the project:\n    " + "\n    ".join(wrong)


def test_the_steps_import_each_other_relatively():
    """In a version folder the steps' package is ``amc_steps``, not ``serving.backends``: a sibling imported by its
    project name would not be there."""
    modules = project_modules()
    absolute = []
    for name, path in modules.items():
        if not _inside(name, "serving.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            absolute += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "serving"]
    assert not absolute, "serving/backends imports itself by its project name:\n    " + "\n    ".join(absolute)


def test_the_clients_distribution_ships_the_contract():
    import tomllib

    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    shipped = set(project["tool"]["setuptools"]["packages"])
    assert {"amc_client", "amc_contract"} <= shipped, shipped


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_cycle_finder_reports_cycles_and_only_cycles(tmp_path):
    """A synthetic project: what the rule reports, what it must not, and the message."""
    _write(tmp_path, {
        # A package whose __init__ imports its submodules, which import their siblings and the package's submodules
        # by name, absolutely and relatively: no cycle.
        "pkg/__init__.py": "from pkg.a import A\nfrom . import b\n",
        "pkg/a.py": "from pkg import b\nimport pkg.c\nA = 1\n",
        "pkg/b.py": "from . import c\nfrom .c import C\n",
        "pkg/c.py": "import os\nC = 1\n",
        # A lazy (function-level) import closes a cycle: reported.
        "lazy/__init__.py": "",
        "lazy/one.py": "from lazy.two import f\n",
        "lazy/two.py": "def f():\n    from lazy import one\n    return one\n",
        # A submodule taking a name from its package's __init__, which imports it: a cycle through the __init__.
        "init/__init__.py": "from .sub import helper\nNAME = 1\n",
        "init/sub.py": "from init import NAME\n\ndef helper():\n    return NAME\n",
        # A type-only import closes a cycle too: reported.
        "typed/__init__.py": "",
        "typed/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from typed.y import Y\n",
        "typed/y.py": "from typed.x import TYPE_CHECKING\nY = 1\n",
        # A namespace folder inside a package (no __init__.py) holds modules too.
        "ns/__init__.py": "",
        "ns/inner/deep.py": "import ns.top\n",
        "ns/top.py": "from ns.inner import deep\n",
        # Outside any package root: ignored.
        "tests/__init__.py": "",
        "tests/test_x.py": "import pkg.a\n",
    })
    modules = project_modules(tmp_path)
    assert {"pkg", "pkg.a", "lazy.two", "init.sub", "ns.inner.deep"} <= set(modules) and "tests" not in modules
    graph = import_graph(modules, tmp_path)
    assert graph["pkg"] == {"pkg.a": "pkg/__init__.py:1", "pkg.b": "pkg/__init__.py:2"}
    assert set(graph["pkg.a"]) == {"pkg.b", "pkg.c"} and set(graph["pkg.b"]) == {"pkg.c"}
    assert graph["init.sub"] == {"init": "init/sub.py:1"} and graph["typed.x"] == {"typed.y": "typed/x.py:3"}
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["init", "init.sub", "init"], ["lazy.one", "lazy.two", "lazy.one"],
                              ["ns.inner.deep", "ns.top", "ns.inner.deep"], ["typed.x", "typed.y", "typed.x"]]
    message = describe(["lazy.one", "lazy.two", "lazy.one"], graph)
    assert message.startswith("lazy.one -> lazy.two -> lazy.one")
    assert "lazy.two -> lazy.one (lazy/two.py:2)" in message


def test_a_cycle_through_several_modules_is_named_by_its_shortest_loop():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1", "d": "b.py:2"}, "c": {"a": "c.py:1"},
             "d": {"e": "d.py:1"}, "e": {"a": "e.py:1"}, "f": {"a": "f.py:1"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": "x"}, "b": {}}) == []
