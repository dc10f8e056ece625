"""The import graph of ``mtl_jax``: no import circle; and of ``tests``: no file imports a test
module.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ...
import`` of every module, at module level and inside functions alike (a function-level import
hides a circle, it does not remove it), relative imports resolved. An import names the
deepest ``mtl_jax`` module it reaches: ``from mtl_jax.uda.run import uda_run`` depends on
``mtl_jax.uda.run``, ``from mtl_jax.models import layers`` on ``mtl_jax.models.layers``, ``from
mtl_jax.models import build_model`` on the package ``mtl_jax.models``.
"""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mtl_jax"


def _modules(root: str) -> dict[str, str]:
    """``{dotted module name: path}`` of every ``.py`` file under ``root/mtl_jax``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _target(name: str, modules: dict[str, str]) -> str | None:
    """The deepest module of ``modules`` that ``name`` (a dotted path) starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    """``{module: {mtl_jax modules it imports}}`` (the package root, which imports nothing of
    its own, is left out: every import passes through it)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1 more
                    base = module.split(".")
                    if not is_package:
                        base = base[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
                # "from a import b": b is a module of a, or a name defined in a.
                names = [n for n in names[:-1] if n in modules] or [prefix]
            for name in names:
                if name.split(".")[0] != PACKAGE:
                    continue
                target = _target(name, modules)
                if target and target not in (module, PACKAGE):
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_circles_and_imports_at_any_depth(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import low\n")
    (pkg / "sub" / "low.py").write_text("import numpy\n")
    (pkg / "top.py").write_text("from mtl_jax.sub.low import x\nfrom mtl_jax import mid\n")
    (pkg / "mid.py").write_text("def f():\n    from .sub import low\n")
    graph = import_graph(str(tmp_path))
    assert graph == {"mtl_jax": set(), "mtl_jax.sub": {"mtl_jax.sub.low"},
                     "mtl_jax.sub.low": set(), "mtl_jax.top": {"mtl_jax.sub.low", "mtl_jax.mid"},
                     "mtl_jax.mid": {"mtl_jax.sub.low"}}
    assert find_cycle(graph) is None
    (pkg / "sub" / "low.py").write_text("def g():\n    from ..top import y\n")  # in a function
    assert find_cycle(import_graph(str(tmp_path))) == ["mtl_jax.mid", "mtl_jax.sub.low",
                                                       "mtl_jax.top", "mtl_jax.mid"]


def test_mtl_jax_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["mtl_jax.train"]  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["mtl_jax.run_support", "mtl_jax.uda.run"])
def test_the_loop_and_its_runs_sit_below_train(module):
    """The kinds of run and the loop's helpers never import the loop (``mtl_jax.train``) or
    the command line."""
    graph = import_graph()
    reached, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not reached & {"mtl_jax.train", "mtl_jax.main", "mtl_jax.cli_training"}, module


#: The layers of mtl_jax (docs/architecture.md), lowest first: a module may import modules of
#: its own layer or of a lower one. Every top-level module and package has a layer, so a new
#: one must be placed here.
LAYERS = [
    {"errors", "paths", "log_routing", "__init__"},
    {"optim", "run_config", "workdir_lock", "checkpointing", "distributed", "compile_cache",
     "writers", "data", "weighting"},
    {"tasks"},
    {"models", "evaluation", "config_utils", "config_schema", "config_cross"},
    {"steps", "staging"},
    {"experiment"},
    {"run_support", "compare"},
    {"uda", "sde", "params_report"},
    {"train", "predict"},
    {"cli_training"},
    {"main"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} has no layer in LAYERS (tests/test_import_graph.py)")


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "\n".join(upward)


# ---------------------------------------------------------------- the tests' own imports
def imports_of_test_modules(tests_dir: str) -> dict[str, list[str]]:
    """``{file: [test modules it imports]}`` for every ``.py`` file under ``tests_dir`` (test
    modules, ``conftest.py`` and helper modules alike) that imports a test module
    (``test_*.py``, named from ``tests_dir``, which pytest puts on ``sys.path``): ``import``,
    ``from ... import`` (relative ones resolved) and ``importlib.import_module("...")``, at any
    depth."""
    files = {}  # dotted name -> path
    for dirpath, _, names in os.walk(tests_dir):
        for f in names:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), tests_dir)[:-3].split(os.sep)
                files[".".join(rel)] = os.path.join(dirpath, f)
    test_modules = {m for m in files if m.split(".")[-1].startswith("test_")}
    found = {}
    for module, path in sorted(files.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module.split(".")[:-1]
        reached = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - (node.level - 1)] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                names = [prefix] + [f"{prefix}.{a.name}".lstrip(".") for a in node.names]
            elif (isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and getattr(node.func, "attr", getattr(node.func, "id", None))
                  in ("import_module", "__import__")):
                names = [node.args[0].value]
            for name in names:
                parts = name.split(".")
                reached |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
        hits = sorted((reached & test_modules) - {module})
        if hits:
            found[os.path.relpath(path, tests_dir)] = hits
    return found


def test_the_test_import_finder_finds_every_form(tmp_path):
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (tmp_path / "helpers" / "fakes.py").write_text("def f():\n    from test_a import x\n")
    (tmp_path / "helpers" / "test_inner.py").write_text("")
    (tmp_path / "helpers" / "other.py").write_text("from . import test_inner\n")
    (tmp_path / "conftest.py").write_text("import importlib\nimportlib.import_module('test_b')\n")
    (tmp_path / "test_a.py").write_text("import numpy\nfrom helpers import fakes\n")
    (tmp_path / "test_b.py").write_text("import test_a as a\nfrom helpers.fakes import f\n")
    (tmp_path / "test_c.py").write_text("from helpers import test_inner, fakes\n")
    assert imports_of_test_modules(str(tmp_path)) == {
        os.path.join("helpers", "fakes.py"): ["test_a"],
        os.path.join("helpers", "other.py"): ["helpers.test_inner"],
        "conftest.py": ["test_b"], "test_b.py": ["test_a"], "test_c.py": ["helpers.test_inner"]}


def test_no_test_module_imports_another():
    """Shared test helpers live in ``conftest.py`` or helper modules (``tests/fake_datasets``),
    never in a test module that others import."""
    tests_dir = os.path.join(REPO, "tests")
    assert len(os.listdir(tests_dir)) > 30  # the whole folder was read
    found = imports_of_test_modules(tests_dir)
    assert not found, "test modules imported (move the helpers out of them): " + "; ".join(
        f"{f} imports {', '.join(m)}" for f, m in sorted(found.items()))


# ---------------------------------------------------------------- the house's other rules
def test_no_library_file_over_450_lines():
    long = {os.path.relpath(path, REPO): n for path in glob.glob(
        os.path.join(REPO, "mtl_jax", "**", "*.py"), recursive=True)
        if (n := len(open(path, encoding="utf-8").read().splitlines())) > 450}
    assert not long, f"split these modules (at most 450 lines each): {long}"


def test_no_reference_to_files_outside_the_repository():
    """Users never see the planning documents the project was written from: code, docs and
    notebooks name the repository's own files only."""
    pattern = re.compile(r"\bSPEC(\.md| §)|\bDESIGN\.md|\bSTYLE\.md|\bseed 00\d")
    found = []
    for folder in ("mtl_jax", "configs", "benchmarks", "docs", "colab", "tests", ".ci"):
        for path in glob.glob(os.path.join(REPO, folder, "**", "*"), recursive=True):
            if path.endswith((".py", ".md", ".ipynb", ".sh")) or "/.ci/" in path + "/":
                if os.path.isfile(path):
                    text = open(path, encoding="utf-8").read()
                    found += [f"{os.path.relpath(path, REPO)}: {m.group(0)}"
                              for m in pattern.finditer(text)]
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    found += [f"README.md: {m.group(0)}" for m in pattern.finditer(readme)]
    assert not found, found
