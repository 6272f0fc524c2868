"""The floor plan holds: the import directions between the wings of ``flashsale/``, the
packages around it, and no private name reached across a package line.

Checked on the real import graph (a fresh interpreter per check, so one test's imports
cannot hide another's) and on the source (for names a module reaches but may not import
at start-up).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inventory", "flashsale", "loadtests", "benchmarks")


def _loaded_after(imports: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


#: The order writer, one concern a module (flashsale/pipeline/__init__.py maps them).
WRITER_MODULES = ("writer", "backlog", "entries", "order_sql", "worker_settings")


def test_the_service_does_not_load_the_order_writer() -> None:
    """The service answers buyers; the writer runs in the worker process. Nothing the
    service imports at start-up (its OpenAPI document included) pulls the writer loop in."""
    loaded = _loaded_after(["flashsale.service.app", "flashsale.service.serve", "flashsale.service.cli"])
    assert not loaded & {f"flashsale.pipeline.{m}" for m in WRITER_MODULES}
    assert "flashsale.drills.drill" not in loaded and "flashsale.runtime.embedded" not in loaded


def test_fence_recovery_writes_through_the_writers_sql_not_its_loop() -> None:
    loaded = _loaded_after(["flashsale.fence.recovery"])
    assert {"flashsale.pipeline.entries", "flashsale.pipeline.order_sql"} <= loaded
    assert not loaded & {"flashsale.pipeline.writer", "flashsale.pipeline.backlog"}


def test_fence_verification_needs_no_aiohttp() -> None:
    loaded = _loaded_after(["flashsale.fence.verify", "flashsale.fence.recovery"])
    assert "aiohttp" not in loaded and not any(m.startswith("flashsale.service") for m in loaded)


def test_the_cli_root_loads_no_wing() -> None:
    """`flashsale --help` works on the base install: the root imports wings lazily."""
    loaded = _loaded_after(["flashsale.cli"])
    wings = ("service", "pipeline", "fence", "drills", "runtime")
    assert not [m for m in loaded if m.split(".")[:2] in [["flashsale", w] for w in wings]]


@pytest.mark.parametrize("package", ["inventory", "loadtests", "flashsale"])
def test_packages_import_only_what_their_row_allows(package: str) -> None:
    forbidden = {
        "inventory": ("flashsale", "loadtests", "benchmarks", "aiohttp", "asyncpg", "locust"),
        "loadtests": ("flashsale", "inventory", "benchmarks", "redis", "asyncpg"),
        "flashsale": ("benchmarks",),
    }[package]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules(package)
        for module, _, line in _imports(path)
        if module.split(".")[0] in forbidden
    ]
    assert not bad, bad


def test_wings_use_each_other_only_through_public_names() -> None:
    """No private name crosses a package line: not from another top-level package, and
    not from another wing of flashsale."""

    def owner(module: str) -> tuple[str, ...]:
        parts = module.split(".")
        return tuple(parts[:2]) if parts[0] == "flashsale" and len(parts) > 2 else tuple(parts[:1])

    bad = []
    for package in ("flashsale", "loadtests", "benchmarks"):
        for path in _modules(package):
            mine = owner(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for module, names, line in _imports(path):
                if module.split(".")[0] not in PACKAGES or owner(module) == mine:
                    continue
                private = [n for n in names if n.startswith("_")]
                private += [p for p in module.split(".")[1:] if p.startswith("_")]
                if private:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert not bad, bad


def test_postgresql_is_read_in_one_place() -> None:
    """The read side of the order record has one owner (flashsale/ledger.py): no other
    module queries orders, order_lines or stock_events. The writer writes them."""
    import re

    reads = re.compile(r"\b(FROM|JOIN)\s+(orders|order_lines|stock_events)\b", re.I)
    bad = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in _modules("flashsale")
        if path.name not in ("ledger.py", "order_sql.py")
        for m in reads.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not bad, bad


#: Underscored names of other libraries we reach on purpose, each with why no public way exists.
LIBRARY_INTERNALS = {
    # typeshed's only name for the type ``add_subparsers()`` returns
    "_SubParsersAction",
    # namedtuple's public methods carry an underscore so as not to clash with field names
    "_replace",
    "_asdict",
    # aiohttp has no public hook for the protocol's own answers (parser errors) or for the
    # request handler around the app: flashsale/service/transport.py subclasses its server
    "_make_server",
    "_kwargs",
    "_loop",
    # nor for "this connection waits for its next request head" (the future its protocol
    # awaits): the head deadline and the connection cap in that module need exactly that
    "_waiter",
}


def test_no_library_internals_are_reached() -> None:
    """No module reaches an underscored attribute that none of our modules defines: a name
    private to redis-py, aiohttp or another library breaks on their next release (the fence
    guard once set redis-py's pool internals to see each new connection; it has a public
    connect watch now). The few deliberate exceptions are listed, each with its reason."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for p in PACKAGES for path in _modules(p)}
    ours: set[str] = set(LIBRARY_INTERNALS)
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                ours.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                ours.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                ours.add(node.id)
            elif isinstance(node, ast.arg):
                ours.add(node.arg)
    bad = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            reached = None
            if isinstance(node, ast.Attribute):
                reached = node.attr
            elif (  # getattr(obj, "_x"), hasattr, setattr
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                reached = node.args[1].value
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                # a method name kept in a string to be looked up later ("_get_free_connections")
                reached = node.value if "_" in node.value.strip("_") else None
            if reached and reached.startswith("_") and not reached.startswith("__") and reached not in ours:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {reached}")
    assert not bad, bad
