"""The package's layers, read from its source: no import cycles, nothing in the library imports the application
layer (the CLI, and ``posttrain.demo`` should one return; the demo is now the shipped ``configs/demo.yaml``), and the
math (``losses.py``, ``rl.py``) imports only torch and the standard library; outside the CLI, posttrain's own
modules are imported at the top of a file, never inside a function.

Every module's AST is walked for its imports of posttrain modules, at module level and inside functions alike: a
function-local import does not make a dependency go away, it only hides it from the import machinery, so a cycle
through one is still two layers that each need the other. Imports under ``if TYPE_CHECKING:`` are left out of the
cycle check (they never run) but count for the demo rule. ``from posttrain.x import y`` is an import of module
``posttrain.x.y`` when that is a module, and importing ``posttrain.x.y`` runs the package ``posttrain.x`` first,
so an edge to a module is also an edge to each package above it (except the importer's own packages, which are
already importing)."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import posttrain

PACKAGE_DIR = Path(posttrain.__file__).resolve().parent
# The application layer: only it may import itself (and the demo).
APPLICATION = {"posttrain.cli", "posttrain.__main__"}
PURE_MATH = {"posttrain.losses", "posttrain.rl"}
ALLOWED_IN_PURE_MATH = {"torch", "__future__"} | set(sys.stdlib_module_names)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a dotted module name (posttrain's own modules resolved to a module or package)
    line: int
    function_local: bool
    type_checking_only: bool


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = ["posttrain", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import statement in the module, with the module (or package) each one loads."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, function_local: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, function_local, type_checking))
        elif isinstance(node, ast.ImportFrom):
            source = resolve(node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                target = submodule if submodule in modules else source
                found.append(Import(name, target, node.lineno, function_local, type_checking))
        for child in ast.iter_child_nodes(node):
            inside_function = function_local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_checking or (
                isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body
            )
            visit(child, inside_function, guarded)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return found


def all_imports(root: Path = PACKAGE_DIR) -> list[Import]:
    modules = package_modules(root)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, set(modules))]


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, dict[str, Import]]:
    """importer → {posttrain module it loads: the import statement}, type-checking-only imports left out."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for imp in imports:
        if imp.type_checking_only or not imp.target.startswith("posttrain."):
            continue
        own_packages = {imp.importer.rsplit(".", depth)[0] for depth in range(imp.importer.count("."))} | {
            imp.importer
        }
        parts = imp.target.split(".")
        for end in range(2, len(parts) + 1):  # posttrain.a, posttrain.a.b, ...: each package runs before its module
            loaded = ".".join(parts[:end])
            if loaded in modules and loaded not in own_packages:
                graph[imp.importer].setdefault(loaded, imp)
    return graph


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def describe_cycle(component: list[str], graph: dict[str, dict[str, Import]]) -> str:
    members = set(component)
    edges = [
        f"    {imp.importer} -> {target}  ({imp.importer.replace('.', '/')}.py:{imp.line}{', in a function' if imp.function_local else ''})"
        for importer in component
        for target, imp in sorted(graph[importer].items())
        if target in members
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def _is_application(module: str) -> bool:
    return module in APPLICATION or module == "posttrain.demo" or module.startswith("posttrain.demo.")


def layer_problems(root: Path = PACKAGE_DIR) -> list[str]:
    """Every broken layer rule in the package under ``root``, one readable line (or block) each."""
    modules = package_modules(root)
    imports = all_imports(root)
    problems = [
        describe_cycle(component, import_graph(imports, set(modules)))
        for component in cycles(import_graph(imports, set(modules)))
    ]
    for imp in imports:
        where = f"{modules[imp.importer].relative_to(root.parent)}:{imp.line}"
        if _is_application(imp.target) and not _is_application(imp.importer):
            problems.append(
                f"{where}: library module {imp.importer} imports {imp.target}; only the CLI may import the demo or the CLI"
            )
        if imp.function_local and imp.target.startswith("posttrain") and not _is_application(imp.importer):
            # A lazy import of an own module hides a dependency (and a cycle) instead of removing it.
            problems.append(
                f"{where}: {imp.importer} imports {imp.target} inside a function; own-package imports go at the top"
            )
        if imp.importer in PURE_MATH and imp.target.split(".")[0] not in ALLOWED_IN_PURE_MATH:
            problems.append(
                f"{where}: {imp.importer} imports {imp.target}; the math imports only torch and the standard library"
            )
    return list(dict.fromkeys(problems))  # one line per statement, however many names it imports


def test_the_package_keeps_its_layers() -> None:
    problems = layer_problems()
    assert not problems, "\n".join(problems)


def test_the_checker_sees_cycles_demo_imports_and_heavy_math(tmp_path: Path) -> None:
    """Each rule fails on a package that breaks it: a cycle hidden behind a function-local import (also reported
    as a function-local own import), a relative import of the demo, and a third-party import in the math."""
    package = tmp_path / "posttrain"
    files = {
        "__init__.py": "",
        "losses.py": "import torch\nimport numpy as np\n",
        "rl.py": "from __future__ import annotations\nimport math\nimport torch.nn.functional as F\n",
        "pipeline.py": "from posttrain.eval import report\n",
        "eval/__init__.py": "",
        "eval/report.py": "def write():\n    from posttrain.pipeline import Pipeline\n",
        "rewards.py": "from .demo.tasks import score\n",
        "recipes/__init__.py": "",
        "recipes/sft.py": "import posttrain.cli\n",
        "demo/__init__.py": "",
        "demo/tasks.py": "from posttrain.rewards import thing\n",
        "cli.py": "def demo():\n    from posttrain.demo import tasks\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    problems = layer_problems(package)
    assert any(
        p.startswith("cycle among posttrain.eval.report, posttrain.pipeline") and "in a function" in p
        for p in problems
    ), problems
    assert any(p.startswith("cycle among posttrain.demo.tasks, posttrain.rewards") for p in problems), problems
    assert any(
        "posttrain/rewards.py:1: library module posttrain.rewards imports posttrain.demo.tasks" in p for p in problems
    ), problems
    assert any("posttrain/losses.py:2: posttrain.losses imports numpy" in p for p in problems), problems
    assert any(
        "posttrain/recipes/sft.py:1: library module posttrain.recipes.sft imports posttrain.cli" in p for p in problems
    ), problems
    assert any(
        "posttrain/eval/report.py:2: posttrain.eval.report imports posttrain.pipeline inside a function" in p
        for p in problems
    ), problems
    assert len(problems) == 6, problems  # rl.py, cli.py and the demo's own imports are allowed
