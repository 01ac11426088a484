"""The package's shape, checked from its source (no import): layer order, package faces, no
import cycle between packages, module and function sizes.

- **Layers**: a package may import only from packages in its own or a lower layer (``LAYERS``,
  data-flow order). Imports inside functions count too: a lazy import is still a dependency.
- **Faces**: code outside a package imports it through its ``__init__`` (``from
  autocompress.measure import size_report``), never from a private module
  (``autocompress.measure._timing``). Public modules (no leading underscore) are faces too.
  Imports under ``if TYPE_CHECKING:`` are not dependencies and are not checked.
- **Sizes**: no module over ``MAX_MODULE_LINES`` lines, no function over ``MAX_FUNCTION_LINES``.

What breaks a rule today is listed in ``tests/architecture_allowed.py``; the list may only
shrink: a new violation fails, and so does an allowed one that is gone (delete its line).
Regenerate the list after a deliberate change with::

    .venv/bin/python -m tests.test_architecture > tests/architecture_allowed.py
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "autocompress"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# Lowest first; a package may import from its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_errors", "_registry", "_lazy", "_inputs", "_catalog"),
    ("compress",),
    ("onnxgraph",),
    ("measure",),
    ("finetune",),
    ("tasks",),
    ("config",),
    ("tracking",),
    ("tune",),
    ("deploy",),
    ("_api", "cli", "agent", "__init__", "__main__"),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The ``autocompress`` modules (or ``module.name`` for names taken from a package) that
    ``module`` imports, with the line of each import."""
    tree = ast.parse(path.read_text())
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for n in ast.walk(block)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("autocompress")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("autocompress"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return out


def _top(module: str) -> str:
    """The first-level member of the package a module belongs to (``compress``, ``_api``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_private_reach(importer: str, target: str) -> bool:
    """Whether ``importer`` reaches into a private module of another package."""
    parts = target.split(".")
    if len(parts) < 3 or _top(importer) == _top(target):
        return False
    return any(p.startswith("_") and p != "__init__" for p in parts[2:])


def violations() -> list[str]:
    """Every rule broken today, one stable line each."""
    modules = _modules()
    found: set[str] = set()
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            found.add(f"module-size {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    found.add(f"function-size {module}.{node.name}")
        for target, _ in _imports(module, path, modules):
            src, dst = _top(module), _top(target)
            if dst == "__init__" or src == dst:
                continue
            edges.setdefault(src, set()).add(dst)
            if RANK.get(dst, 0) > RANK.get(src, 0):
                found.add(f"layer {module} -> {target}")
            if _is_private_reach(module, target):
                found.add(f"face {module} -> {target}")
    for a, b in itertools.combinations(sorted(edges), 2):
        if b in _reachable(a, edges) and a in _reachable(b, edges):
            found.add(f"cycle {a} <-> {b}")
    return sorted(found)


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _allowed() -> set[str]:
    from tests.architecture_allowed import ALLOWED

    return set(ALLOWED)


def test_every_layer_is_known():
    tops = {_top(m) for m in _modules()}
    assert tops <= set(RANK), f"add {sorted(tops - set(RANK))} to LAYERS"


def test_no_new_violation():
    new = sorted(set(violations()) - _allowed())
    assert not new, "new architecture violations (fix them):\n  " + "\n  ".join(new)


def test_allowed_list_only_shrinks():
    gone = sorted(_allowed() - set(violations()))
    assert not gone, "fixed: delete from tests/architecture_allowed.py:\n  " + "\n  ".join(gone)


def test_checker_sees_a_private_reach_and_an_upward_import():
    assert _is_private_reach("autocompress.tune._driver", "autocompress.measure._timing")
    assert not _is_private_reach("autocompress.tune._driver", "autocompress.tune._trial")
    assert not _is_private_reach("autocompress.tune._driver", "autocompress.measure")
    assert RANK["compress"] < RANK["tune"]


if __name__ == "__main__":
    print('"""Architecture rules broken today (tests/test_architecture.py); the list only shrinks."""')
    print()
    print("ALLOWED = [")
    for line in violations():
        print(f"    {line!r},")
    print("]")
