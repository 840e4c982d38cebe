"""The package layout's rules, read from the code's own imports (README: 'How it works')."""

from __future__ import annotations

import ast
from pathlib import Path

import onnxq

PACKAGE = Path(onnxq.__file__).parent
LOWER = {  # what each subpackage may import from onnxq (besides the top-level base modules)
    "quant": set(),
    "runtime": {"quant"},
    "passes": {"quant", "runtime"},
    "search": {"quant", "runtime", "passes"},
    "commands": {"quant", "runtime", "passes", "search"},
}
ENTRY = {"cli", "api", "entry", "__main__", "__init__"}  # top-level modules above every subpackage


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Modules `module` imports (absolute names), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_each_subpackage_imports_only_the_layers_below_it() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        own = _subpackage(module)
        if own is None:
            continue
        for name in _imports(module, path, top_level_only=False):
            if name not in modules:
                continue
            other = _subpackage(name)
            top_entry = other is None and name.split(".")[-1] in ENTRY and name != "onnxq"
            if top_entry or (other is not None and other != own and other not in LOWER[own]):
                wrong.append(f"{module} imports {name}")
    assert wrong == []


def test_the_quantization_core_never_touches_onnxruntime() -> None:
    """placement, plan and the writers are plain data and graph code: testable and usable without a runtime."""
    touching = [module for module, path in _modules().items() if _subpackage(module) == "quant"
                and any(n.startswith("onnxruntime") for n in _imports(module, path, top_level_only=False))]
    assert touching == []


def test_no_module_import_cycles() -> None:
    modules = _modules()
    graph = {m: {n for n in _imports(m, p, top_level_only=True) if n in modules and n not in (m, "onnxq")}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
