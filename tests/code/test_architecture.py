"""Code tests: the library's layers only point down, and no module imports itself back through others.

Every import in src/metanlp is read from the source (those inside functions too, since a lazy import is still a
dependency), resolved to a module of the package, and checked against the layer table below. A new module must be
placed in a layer here, so where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "metanlp"

# Bottom first. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("metanlp", "metanlp.config", "metanlp.atomic", "metanlp.runtime", "metanlp.progress")),
    ("data", ("metanlp.data",)),
    ("encoder", ("metanlp.encoder",)),
    ("learners", ("metanlp.learners",)),
    ("training and evaluation", ("metanlp.train", "metanlp.distributed", "metanlp.checkpoint", "metanlp.evaluation",
                                 "metanlp.pretrain", "metanlp.adaptation", "metanlp.suite", "metanlp.distillation")),
    ("reporting and serving", ("metanlp.reporting", "metanlp.tracking", "metanlp.tasks", "metanlp.serving",
                               "metanlp.service", "metanlp.mlflow_model", "metanlp.scoring")),
    ("stages", ("metanlp.stages",)),
    ("pipeline and CLI", ("metanlp.pipeline", "metanlp.cli", "metanlp.__main__")),
]


def module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in package.rglob("*.py"):
        parts = ["metanlp", *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(package)
    return {name: imports_of(path, set(names)) - {name} for name, path in names.items()}


def _within(module: str, prefix: str) -> bool:
    """`module` is `prefix` or inside it; the root package stands for its __init__ alone."""
    return module == prefix or (prefix != "metanlp" and module.startswith(prefix + "."))


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise LookupError(module)
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                  for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if not any(_within(m, p) for _, ps in LAYERS for p in ps)]
    assert not unplaced, f"place these modules in a layer of {__file__}: {unplaced}"


def test_no_import_points_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_loop():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_loop_and_an_upward_import(tmp_path):
    """The same checks on a made-up package that breaks both rules: they must fail there."""
    package = tmp_path / "metanlp"
    (package / "learners").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "learners" / "__init__.py").write_text("from metanlp.learners.base import Learner\n")
    (package / "learners" / "base.py").write_text("def f():\n    from metanlp.train import meta_train\n")
    (package / "train.py").write_text("from metanlp.learners import Learner\n")
    graph = import_graph(package)
    assert cycles(graph) == [["metanlp.learners", "metanlp.learners.base", "metanlp.train"]]
    assert upward_imports(graph) == [
        "metanlp.learners.base (learners) imports metanlp.train (training and evaluation)"]
    with pytest.raises(LookupError):
        layer_of("elsewhere.module")
