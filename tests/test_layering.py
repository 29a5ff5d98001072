"""Imports point one way: csm_jax.core <- csm_jax.io <- csm_jax.inference; train and convert build on core and io
(never on each other or on inference); command lines on top. `python -m train` (train/__main__.py) is a command
line, so it may also import csm_jax.inference (to speak samples with the weights being trained); the rest of train/
may not. Checked on the source (lazy imports inside functions included), so a violation fails here before it
becomes a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("csm_jax", "convert", "train")
# module prefix -> the prefixes it may import (besides itself); the first matching prefix wins
ALLOWED = [
    ("csm_jax.core", ["csm_jax.core"]),
    ("csm_jax.io", ["csm_jax.core", "csm_jax.io"]),
    ("csm_jax.inference", ["csm_jax.core", "csm_jax.io", "csm_jax.inference"]),
    ("convert", ["csm_jax.core", "csm_jax.io", "convert"]),
    ("train.__main__", ["csm_jax.core", "csm_jax.io", "csm_jax.inference", "train"]),  # the command line
    ("train", ["csm_jax.core", "csm_jax.io", "train"]),
    ("csm_jax", ["csm_jax"]),  # the package's public API and the command lines: anything of csm_jax
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports (relative imports resolved)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def allowed(module: str) -> list[str]:
    return next(targets for prefix, targets in ALLOWED if module == prefix or module.startswith(prefix + "."))


def within(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_files():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_imports_point_one_way():
    wrong = []
    for path in project_files():
        module = module_name(path)
        for name in sorted(imports(path)):
            if module.startswith("csm_jax") and module.count(".") == 0:
                continue  # csm_jax/__init__.py re-exports the public API
            if not within(name, allowed(module)) and not name.startswith(module + "."):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles_between_files():
    graph = {module_name(p): {n for n in imports(p)} for p in project_files()}
    graph = {m: {t for t in targets if t in graph and t != m and not t.startswith(m + ".")}
             for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
