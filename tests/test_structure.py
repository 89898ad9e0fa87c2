"""The package's shape, read from its source with ``ast`` (nothing of the package is imported).

Layers, lowest first: foundation (root modules) < calibration < capture < statistics < trim
< methods < reporting < prepass < integration. A module imports only its own layer and those
below it, counting imports inside functions and under ``TYPE_CHECKING``. ``demo/`` and the
start-up hook ``_autoload`` stand outside the order: demo may import anything, nothing in the
package imports either of them, and the hook, which runs in every Python process, reaches the
package only lazily through ``integration.registration``.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "mergekit_sparsegpt"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = (
    "foundation",
    "calibration",
    "capture",
    "statistics",
    "trim",
    "methods",
    "reporting",
    "prepass",
    "integration",
)
FOUNDATION = {f"{PACKAGE}", f"{PACKAGE}.special_files", f"{PACKAGE}.termination"}
AUTOLOAD = f"{PACKAGE}._autoload"
DEMO = f"{PACKAGE}.demo"
AUTOLOAD_LAZY_IMPORTS = {f"{PACKAGE}.integration.registration"}
# mergekit modules whose import fires the start-up hook's registration; see _autoload.
MERGE_MACHINERY = ("mergekit.merge_methods", "mergekit.merge", "mergekit.plan", "mergekit.card")
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 60
ROOT_INIT_EXTRA = {"__version__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES: dict[str, ast.Module] = {
    name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for name, path in MODULES.items()
}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _layer(name: str) -> int | None:
    """Index into LAYERS; None for the modules outside the order (demo, _autoload)."""
    if name == AUTOLOAD or name == DEMO or name.startswith(DEMO + "."):
        return None
    if name in FOUNDATION:
        return 0
    sub = name.split(".")[1]
    if sub in LAYERS[1:] and _is_package(f"{PACKAGE}.{sub}"):
        return LAYERS.index(sub)
    raise AssertionError(f"{name} belongs to no layer: add it to a layer folder or FOUNDATION")


def _imported_names(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Every dotted name an import statement may bind a module to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name if _is_package(name) else name.rpartition(".")[0]
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(name: str) -> Iterator[tuple[ast.stmt, str, bool]]:
    """(statement, imported name, inside a function) for every import of module ``name``."""
    function_nodes: set[int] = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            function_nodes.update(id(inner) for inner in ast.walk(node) if inner is not node)
    for node in ast.walk(TREES[name]):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for imported in _imported_names(name, node):
                yield node, imported, id(node) in function_nodes


def _package_targets(name: str) -> set[str]:
    """The package modules ``name`` imports (a ``from`` import counts its submodule if any)."""
    targets = set()
    for _, imported, _ in _imports(name):
        if imported in MODULES and imported != name:
            targets.add(imported)
    return targets


def _where(name: str, node: ast.stmt) -> str:
    return f"{MODULES[name].relative_to(ROOT.parent)}:{node.lineno}"


def test_every_import_goes_to_the_same_or_a_lower_layer() -> None:
    offenders = []
    for name in MODULES:
        for node, target, _ in _imports(name):
            if target not in MODULES or target == name:
                continue
            if target == AUTOLOAD or target == DEMO or target.startswith(DEMO + "."):
                if not (name.startswith(DEMO + ".") or name == DEMO) or target == AUTOLOAD:
                    offenders.append(f"{_where(name, node)} imports {target}")
                continue
            source_layer = _layer(name)
            if source_layer is None:  # demo and _autoload have their own tests
                continue
            target_layer = _layer(target)
            assert target_layer is not None
            if target_layer > source_layer:
                offenders.append(
                    f"{_where(name, node)}: {name} ({LAYERS[source_layer]}) imports "
                    f"{target} ({LAYERS[target_layer]})"
                )
    assert not offenders, "imports of a higher layer (or of demo/_autoload):\n" + "\n".join(
        offenders
    )


def test_autoload_imports_only_the_stdlib_and_registration_lazily() -> None:
    offenders = []
    for node, imported, in_function in _imports(AUTOLOAD):
        if isinstance(node, ast.ImportFrom) and imported == node.module and node.names:
            continue  # the ``from X`` half; its ``X.name`` entries are judged below
        top = imported.split(".")[0]
        if in_function and (imported in AUTOLOAD_LAZY_IMPORTS or top in sys.stdlib_module_names):
            continue
        if not in_function and top in sys.stdlib_module_names | {"__future__"}:
            continue
        if in_function and isinstance(node, ast.ImportFrom):
            if node.module in AUTOLOAD_LAZY_IMPORTS:
                continue
        offenders.append(f"{_where(AUTOLOAD, node)} imports {imported}")
    assert not offenders, "_autoload may import the stdlib, and registration lazily:\n" + (
        "\n".join(offenders)
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def test_no_import_circle() -> None:
    cycles = _cycles({name: _package_targets(name) for name in MODULES})
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _imports_machinery(imported: str) -> bool:
    return any(imported == m or imported.startswith(m + ".") for m in MERGE_MACHINERY)


def test_layers_below_methods_do_not_import_mergekit_merge_machinery() -> None:
    """Registration imports methods/ and below; none of those may set it off half-way."""
    below = LAYERS.index("methods")
    offenders = [
        f"{_where(name, node)} imports {imported}"
        for name in MODULES
        if (layer := _layer(name)) is not None and layer < below
        for node, imported, _ in _imports(name)
        if _imports_machinery(imported)
    ]
    assert not offenders, "\n".join(offenders)


def test_methods_package_imports_merge_methods_first() -> None:
    body = TREES[f"{PACKAGE}.methods"].body
    statements = body[1:] if body and _is_docstring(body[0]) else body
    assert statements, "methods/__init__.py must import mergekit.merge_methods"
    first = statements[0]
    assert isinstance(first, (ast.Import, ast.ImportFrom))
    assert "mergekit.merge_methods" in _imported_names(f"{PACKAGE}.methods", first)


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def test_package_inits_hold_only_a_docstring() -> None:
    offenders = []
    for name, tree in TREES.items():
        if not _is_package(name):
            continue
        body = tree.body[1:] if tree.body and _is_docstring(tree.body[0]) else tree.body
        if name == f"{PACKAGE}.methods":
            body = body[1:]  # the import of mergekit.merge_methods, checked above
        if name == PACKAGE:
            body = [node for node in body if not _assigns_only(node, ROOT_INIT_EXTRA)]
        offenders += [f"{_where(name, node)}: {ast.unparse(node)[:60]}" for node in body]
    assert not offenders, "package __init__.py files are docstring-only:\n" + "\n".join(offenders)


def _assigns_only(node: ast.stmt, names: set[str]) -> bool:
    return (
        isinstance(node, ast.Assign)
        and all(isinstance(t, ast.Name) and t.id in names for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )


def test_modules_are_short() -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent)}: {n} lines"
        for path in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


_LITERAL_TOKENS = {tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE}
_LITERAL_OPS = {",", "(", ")", "[", "]", "+", "%"}


def _literal_lines(source: str) -> set[int]:
    """Lines made of string literals (and the punctuation between them) only."""
    has_string: set[int] = set()
    has_code: set[int] = set()
    fstring_depth = 0
    fstring_types = {
        getattr(tokenize, n, None) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    } - {None}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        lines = range(tok.start[0], tok.end[0] + 1)
        if tok.type in fstring_types or fstring_depth:
            if tok.type == getattr(tokenize, "FSTRING_START", None):
                fstring_depth += 1
            elif tok.type == getattr(tokenize, "FSTRING_END", None):
                fstring_depth -= 1
            has_string.update(lines)
        elif tok.type == tokenize.STRING:
            has_string.update(lines)
        elif tok.type in _LITERAL_TOKENS or (
            tok.type == tokenize.OP and tok.string in _LITERAL_OPS
        ):
            continue
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            has_code.update(lines)
    return has_string - has_code


def _function_length(node: ast.FunctionDef | ast.AsyncFunctionDef, literal: set[int]) -> int:
    lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    if node.body and _is_docstring(node.body[0]):
        doc = node.body[0]
        lines -= set(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    return len(lines - literal)


def test_functions_are_short() -> None:
    offenders = []
    for name, tree in TREES.items():
        literal = _literal_lines(MODULES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = _function_length(node, literal)
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{_where(name, node)} {node.name}: {length} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
