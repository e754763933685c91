"""The package's layers: each part of ``visionlora`` (a subpackage, or a top-level module)
imports only the parts below it.

Every import counts, inside functions too, and so does a string that names a module of the
package ("visionlora.tasks.pose.builtin:tiny_vitpose" in a registry), since it is imported
when used. Docstrings do not count.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import visionlora

SOURCE = Path(visionlora.__file__).parent
PACKAGE = "visionlora"

# Lowest first. A part may import the parts of the layers before its own, and none after or beside it.
LAYERS: list[set[str]] = [
    {"errors", "lazy", "console", "compat"},  # compat: private APIs of torch, accelerate and peft
    {"artifacts", "runtime"},
    {"core"},  # prediction options and writers, drawing and plot primitives
    {"data", "metrics"},
    {"examples"},  # generated data sets
    {"modeling"},  # loading policy, adapters, built-in models, mixed-adapter forwards
    {"tasks"},  # the task contract and the four tasks
    {"config"},
    {"reporting"},
    {"deploy"},  # loading runs, predict, video, export, ONNX
    {"training"},  # the engine
    {"checking"},  # visionlora check: data checks, label errors from fold runs, check.html
    {"ray_cluster"},
    {"serving"},
    {"demo"},
    {"cli_parsers"},  # the arguments of each command
    {"cli"},
    {"__init__", "__main__", "reference"},  # the package's own face: visionlora.load
]


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        name = ".".join((PACKAGE, *path.relative_to(SOURCE).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def part_of(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def imported(module: str, path: Path, node: ast.AST) -> list[str]:
    """The module names an import statement names (a ``from`` import's names may be modules too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def docstring_nodes(tree: ast.Module) -> set[int]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    owners = [tree] + [node for node in ast.walk(tree) if isinstance(node, kinds)]
    return {id(owner.body[0].value) for owner in owners
            if owner.body and isinstance(owner.body[0], ast.Expr) and isinstance(owner.body[0].value, ast.Constant)}


def named_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """(module named, line) for each import and each string naming a module of the package."""
    tree = ast.parse(path.read_text())
    docstrings = docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [(target, node.lineno) for target in imported(module, path, node)]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and node.value.startswith(PACKAGE + ".") and " " not in node.value):
            found.append((node.value.split(":")[0], node.lineno))
    return found


def ties() -> dict[tuple[str, str], list[str]]:
    """(part, part it imports) -> the places ("file:line") that tie them."""
    modules = module_names()
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        for target, line in named_modules(module, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if not target.startswith(PACKAGE + "."):
                continue
            source_part, target_part = part_of(module), part_of(target)
            if source_part != target_part and target_part != "__init__":
                found[(source_part, target_part)].append(f"{path.relative_to(SOURCE.parent)}:{line}")
    return found


def layer_of(part: str) -> int:
    for index, layer in enumerate(LAYERS):
        if part in layer:
            return index
    raise AssertionError(f"the part {part!r} has no layer in LAYERS; add it where it belongs")


def test_every_part_has_a_layer():
    parts = {part_of(module) for module in module_names()}
    assert parts == set().union(*LAYERS), "LAYERS names parts that do not exist"
    for part in parts:
        layer_of(part)


def test_each_part_imports_only_the_parts_below_it():
    upward = {f"{a} -> {b}": places[:3] for (a, b), places in ties().items() if layer_of(b) >= layer_of(a)}
    assert not upward, f"imports that do not go down a layer: {upward}"


def test_no_two_parts_import_each_other():
    found = ties()
    pairs = sorted({tuple(sorted(pair)) for pair in found if (pair[1], pair[0]) in found})
    assert not pairs, f"parts that import each other: {pairs}"


def test_the_check_sees_imports_in_functions_and_module_strings(tmp_path):
    module = tmp_path / "example.py"
    module.write_text('"""visionlora.cli is named in a docstring only."""\n'
                      "def f():\n    from visionlora.serving import app\n"
                      'REGISTRY = "visionlora.tasks.pose.builtin:tiny_vitpose"\n')
    named = dict(named_modules("visionlora.data.example", module))
    assert named == {"visionlora.serving": 3, "visionlora.serving.app": 3, "visionlora.tasks.pose.builtin": 4}
