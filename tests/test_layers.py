"""The package's imports point one way (docs/architecture.md): down the layer list, no cycles.

Every import counts: module-level, inside functions, ``importlib.import_module("...")``, and any
string constant naming a ``unimodal`` module or class (a ``class_path`` written in code). Recipes
and exports count too: a ``class_path`` nested in another object's ``init_args`` is an import by
that object, and an export's ``class_path``s are imported by ``unimodal.checkpoints``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unimodal"
# each entry may import itself and the entries before it, never one after it
LAYERS = [
    ("unimodal.errors", "unimodal.locks", "unimodal.launch", "unimodal.schema", "unimodal.batch", "unimodal.specs",
     "unimodal.yaml_files"),
    ("unimodal.modalities",),
    ("unimodal.data",),
    ("unimodal.models",),
    ("unimodal.checkpoints",),
    ("unimodal.training",),
    ("unimodal.inference",),
    ("unimodal.worlds",),
    ("unimodal.cli", "unimodal.__main__", "unimodal"),
]
DOTTED = re.compile(r"^unimodal(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def target_module(dotted: str) -> str | None:
    """The package module a dotted name refers to (a module, or a name defined in one)."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def python_imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names = [f"{origin}.{alias.name}" for alias in node.names] + [origin]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.match(node.value):
            # a class_path written in code names a class in a module; logger names ("unimodal.data",
            # "unimodal.train") name none
            target = target_module(node.value)
            if target and target != "unimodal" and node.value[len(target):].count(".") == 1:
                names = [node.value]
        for name in names:
            target = target_module(name) if name.startswith("unimodal") else None
            if target and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    edges = {module: python_imports(module, path) for module, path in MODULES.items()}
    # importing a submodule runs its packages' __init__ first
    for module in list(edges):
        for target in list(edges[module]):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                inside = module == parent or module.startswith(parent + ".")
                if not inside and parent != "unimodal" and parent in MODULES:
                    edges[module].add(parent)
    return edges


def class_path_edges(node: object, owner: str | None, where: str) -> list[tuple[str, str, str]]:
    """``(owner, target, where)`` for each class_path nested in an enclosing class_path's args."""
    out = []
    if isinstance(node, dict):
        path = node.get("class_path") or node.get("_class_path")
        here = owner
        if isinstance(path, str):
            target = target_module(path)
            assert target, f"{where}: class_path {path} names no unimodal module"
            if owner:
                out.append((owner, target, where))
            here = target
        for value in node.values():
            out += class_path_edges(value, here, where)
    elif isinstance(node, list):
        for value in node:
            out += class_path_edges(value, owner, where)
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{source} -> {target}"
        for source, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer(target) > layer(source)
    ]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_points_up_the_layers():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_recipes_nest_classes_of_lower_layers():
    bad = []
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        for owner, target, where in class_path_edges(yaml.safe_load(recipe.read_text()), None, str(recipe.relative_to(ROOT))):
            if layer(target) > layer(owner):
                bad.append(f"{where}: {owner} -> {target}")
    assert bad == []


def test_exports_name_classes_checkpoints_may_import():
    fixtures = sorted((ROOT / "tests" / "fixtures").rglob("unimodal.json"))
    assert fixtures, "the old-export fixture is missing"
    checkpoints = layer("unimodal.checkpoints")
    from unimodal.checkpoints.load import upgrade_export_config

    for file in fixtures:
        config = upgrade_export_config(json.loads(file.read_text()), file)
        for _, target, where in class_path_edges({"class_path": "unimodal.checkpoints.load", **config}, None, str(file)):
            assert layer(target) <= checkpoints, f"{where}: an export names {target}, above unimodal.checkpoints"


def test_the_checker_sees_a_hidden_upward_import(tmp_path):
    """The checks are not vacuous: an import hidden in a function, or a class_path string, counts."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import importlib\n\ndef f():\n    from unimodal.cli import main\n\n"
        "SPEC = 'unimodal.training.module.UnimodalModule'\nLATER = importlib.import_module('unimodal.inference.chat')\n"
        "log = 'unimodal.worlds'\n"
    )
    found = python_imports("unimodal.models.probe", source)
    assert found == {"unimodal.cli", "unimodal.training.module", "unimodal.inference.chat"}
    assert len(upward({"unimodal.models.probe": found})) == 3
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_readme_layout_names_every_module():
    """The README's map of the package lists each module in its folder's line, and no module
    that is gone."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("```\nunimodal/") + 4:]
    block = block[:block.index("```")]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if line.startswith("unimodal/"):
            folder, _, line = line.partition(" ")
        elif not line.startswith(" "):
            folder = None
        if folder:
            listed.setdefault(folder, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    present = {
        f"{path.parent.relative_to(ROOT)}/": {p.name for p in path.parent.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
        for path in PACKAGE.rglob("__init__.py")
    }
    missing = {f"{folder}{name}" for folder, names in present.items() for name in names - listed.get(folder, set())}
    gone = {f"{folder}{name}" for folder, names in listed.items() for name in names - present.get(folder, set())}
    assert not missing and not gone, f"README layout: not listed {sorted(missing)}, listed but gone {sorted(gone)}"
