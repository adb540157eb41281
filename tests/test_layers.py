"""The shape of the package (DESIGN.md "Layers"; issue 14 item 3), checked from the source text.

Every module under ``src/ckptvault`` is parsed with :mod:`ast`; every import in it, at module level
or inside a function, relative or absolute, becomes an edge of the import graph. The test fails on:

- an import of a higher layer (imports go downward only; a module may import its own layer);
- any cycle between modules (the message shows the cycle's path);
- an import of a private name (``_x``) from another module;
- ``os``/``shutil``/``fcntl`` file operations outside ``storage/`` (and ``testing/``).

What exists today in files still being split is listed in the ``KNOWN_*`` sets below, each entry
with the reason it is there. A known entry that no longer occurs fails the test too, so each set
shrinks as the work of issue 14 lands and documents what is left of it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "ckptvault"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE

# Top-level module or package name -> layer (DESIGN.md). ``testing`` may import anything below it
# and nothing may import it; it gets a layer above everything.
LAYERS: dict[str, int] = {
    "errors": 0,
    "types": 0,
    "config": 0,
    "version": 0,
    "visible": 0,
    "format": 1,
    "storage": 1,
    "policy": 1,
    "engine": 2,
    "catalog": 2,
    "api": 3,
    "manager": 3,
    "training": 3,
    "validation": 3,
    "validation_worker": 3,
    "legacy": 3,
    "export": 3,
    "distributed": 3,  # torch.distributed.checkpoint storage layer (issue 16)
    "integrations": 4,
    "cli": 4,
    "reporting": 4,
    "report_html": 4,
    "report_plots": 4,  # split out of reporting (issue 14 item 4)
    "report_trajectory": 4,
    "testing": 5,
}
PACKAGE_ROOT_LAYER = 5  # ``ckptvault/__init__.py`` re-exports the public API of every layer

# Each KNOWN set holds what is still there today, each entry with its reason. A new violation
# fails, and so does an entry that no longer occurs (delete it here): the sets only shrink.

# (importer, imported) module pairs that import upward today.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Cycles (the sorted modules of one strongly connected component) that exist today: none.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}

# (importer, imported module) pairs where the importer takes a private ``_name`` from that module.
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}

# Modules that still call os/shutil/fcntl file operations outside storage/: the remaining work of
# issue 14 items 1-2 (everything above storage/ speaks the Storage protocol and a run-directory class).
KNOWN_FILE_OPS: dict[str, str] = {}


def _names(text: str) -> set[str]:
    return set(text.split())


# os/shutil/fcntl attributes that touch files (os.path's pure string functions, os.environ,
# os.getpid, os.cpu_count and the like are not file operations).
FILE_OPS: dict[str, set[str]] = {
    "os": _names(
        "open read write pread pwrite close fsync fdatasync rename renames replace remove unlink rmdir"
        " removedirs mkdir makedirs scandir listdir walk stat lstat fstat chmod chown link symlink"
        " readlink truncate ftruncate utime lseek sendfile posix_fadvise posix_fallocate statvfs"
        " fstatvfs lockf fdopen dup access mkfifo copy_file_range"
    ),
    "os.path": _names("exists isfile isdir islink getsize getmtime lexists samefile"),
    "shutil": _names(
        "rmtree copy copy2 copyfile copyfileobj copytree move disk_usage make_archive unpack_archive chown"
    ),
    "fcntl": _names("flock lockf fcntl ioctl"),
}
FILE_OPS_ALLOWED_UNDER = ("storage", "testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


MODULES = all_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return PACKAGE_ROOT_LAYER
    return LAYERS[parts[1]]


def room_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def resolve_relative(importer: str, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def nearest_module(name: str) -> str | None:
    """The package-internal module ``name`` names (or is inside of: ``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, tree: ast.AST) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every package-internal import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = nearest_module(alias.name)
                    if target is not None:
                        yield target, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = resolve_relative(name, node.level, node.module)
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module
            else:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:  # ``from . import api``: the submodule itself
                    yield full, None, node.lineno
                else:
                    target = nearest_module(base)
                    if target is not None:
                        yield target, alias.name, node.lineno


def parse(name: str) -> ast.AST:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


GRAPH: dict[str, set[str]] = {}
EDGES: list[tuple[str, str, str | None, int]] = []
for _module in MODULES:
    GRAPH[_module] = set()
    for _target, _imported, _line in imports_of(_module, parse(_module)):
        EDGES.append((_module, _target, _imported, _line))
        if _target != _module:
            GRAPH[_module].add(_target)


# Imports allowed inside functions only (not at import time), so that importing the importer stays
# cheap: api imports validation's subprocess machinery only when a save or validate needs it.
FUNCTION_LEVEL_ONLY = {("ckptvault.api", "ckptvault.validation")}


def test_some_imports_only_inside_functions() -> None:
    for importer, target in sorted(FUNCTION_LEVEL_ONLY):
        tree = parse(importer)
        top = ast.Module(
            body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.If)],
            type_ignores=[],
        )
        for node in ast.walk(top):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                node.body = []
        found = [line for t, _name, line in imports_of(importer, top) if t == target]
        assert not found, f"{importer} imports {target} at import time (line {found[0]})"


def test_every_module_has_a_layer() -> None:
    missing = sorted({room_of(m) for m in MODULES if room_of(m) and room_of(m) not in LAYERS})
    assert not missing, f"modules without a layer in DESIGN.md's table (add them to LAYERS): {missing}"


def test_imports_go_downward_only() -> None:
    found: dict[tuple[str, str], str] = {}
    for importer, target, _name, line in EDGES:
        if room_of(target) == "testing" and room_of(importer) != "testing":
            found[(importer, target)] = f"{MODULES[importer].name}:{line} imports testing/"
        elif room_of(importer) != room_of(target) and layer_of(target) > layer_of(importer):
            found[(importer, target)] = f"line {line}: L{layer_of(importer)} imports L{layer_of(target)}"
    new = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    gone = sorted(set(KNOWN_UPWARD) - set(found))
    assert not new, "upward imports: " + "; ".join(
        f"{a} -> {b} ({why})" for (a, b), why in sorted(new.items())
    )
    if gone:
        raise AssertionError(f"fixed, remove from KNOWN_UPWARD: {gone}")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                if len(component) > 1 or node in graph[node]:
                    result.append(sorted(component))
    return result


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as a readable path (breadth-first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = previous[node]
                    return [start, *reversed(path[1:]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def test_no_import_cycles() -> None:
    found = {tuple(c): " -> ".join(cycle_path(GRAPH, c)) for c in strongly_connected(GRAPH)}
    new = {k: v for k, v in found.items() if k not in KNOWN_CYCLES}
    gone = sorted(set(KNOWN_CYCLES) - set(found))
    assert not new, "import cycles: " + "; ".join(new.values())
    if gone:
        raise AssertionError(f"fixed, remove from KNOWN_CYCLES: {gone}")


def test_no_private_names_across_modules() -> None:
    found: dict[tuple[str, str], int] = {}
    for importer, target, name, line in EDGES:
        if name is not None and name.startswith("_") and not name.startswith("__") and target != importer:
            found.setdefault((importer, target), line)
    new = {k: v for k, v in found.items() if k not in KNOWN_PRIVATE}
    gone = sorted(set(KNOWN_PRIVATE) - set(found))
    assert not new, "private names imported from another module: " + "; ".join(
        f"{a}:{line} imports a _name from {b}" for (a, b), line in sorted(new.items())
    )
    if gone:
        raise AssertionError(f"fixed, remove from KNOWN_PRIVATE: {gone}")


def file_operations(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """``os.rename(...)``, ``shutil.rmtree``, ``fcntl.flock``, and ``from os import replace``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if node.attr in FILE_OPS.get(owner, ()):
                yield f"{owner}.{node.attr}", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module in FILE_OPS and not node.level:
            for alias in node.names:
                if alias.name in FILE_OPS[node.module]:
                    yield f"{node.module}.{alias.name}", node.lineno


def test_file_operations_only_in_storage() -> None:
    found: dict[str, str] = {}
    for name in MODULES:
        if room_of(name) in FILE_OPS_ALLOWED_UNDER:
            continue
        ops = sorted({op for op, _line in file_operations(parse(name))})
        if ops:
            found[name] = ", ".join(ops)
    new = {k: v for k, v in found.items() if k not in KNOWN_FILE_OPS}
    gone = sorted(set(KNOWN_FILE_OPS) - set(found))
    assert not new, "file operations outside storage/: " + "; ".join(
        f"{m}: {ops}" for m, ops in sorted(new.items())
    )
    if gone:
        raise AssertionError(f"no file operations left, remove from KNOWN_FILE_OPS: {gone}")


# What code above storage/ may import from it: the protocol, the resolver, and the helpers for files
# that are local by nature (an export or report the user asked for at a path, the user's own data
# files, the catalog's SQLite database). Everything else in storage/ is a backend's mechanism, and
# nothing above storage/ asks which backend it is talking to.
STORAGE_FACADE = {
    "ckptvault.storage",
    "ckptvault.storage.base",
    "ckptvault.storage.resolve",
    "ckptvault.storage.atomic_file",
    "ckptvault.storage.localfiles",
    "ckptvault.storage.localfiles_fd",
    "ckptvault.storage.catalogfiles",
    "ckptvault.storage.foreign",  # other tools' files (DCP directories), read and written safely
    "ckptvault.storage.pools",  # the process's long-lived I/O threads (hashing, fsync), any backend
}
# (importer, backend module) pairs that exist today.
KNOWN_BACKEND_IMPORTS: dict[tuple[str, str], str] = {}


def test_nothing_above_storage_names_a_backend() -> None:
    found = {
        (importer, target): f"line {line}"
        for importer, target, _name, line in EDGES
        if room_of(target) == "storage"
        and room_of(importer) not in FILE_OPS_ALLOWED_UNDER
        and target not in STORAGE_FACADE
    }
    new = sorted(set(found) - set(KNOWN_BACKEND_IMPORTS))
    gone = sorted(set(KNOWN_BACKEND_IMPORTS) - set(found))
    assert not new, "backend modules imported above storage/: " + "; ".join(
        f"{i} -> {t} ({found[(i, t)]})" for i, t in new
    )
    assert not gone, f"no longer imported, remove from KNOWN_BACKEND_IMPORTS: {gone}"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, [["a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_itself(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert strongly_connected(graph) == expected
