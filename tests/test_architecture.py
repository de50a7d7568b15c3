"""The package's shape, checked by parsing imports (``TYPE_CHECKING`` blocks and function bodies included).

* no import cycle inside ``mig_core``;
* imports run one way down the layers of ``docs/concepts.md`` (a folder imports only its own modules and
  lower layers);
* nothing inside the package imports the package root (the public surface sits on top of everything);
* the first-party plugins and ``contrib/`` import only the public surface.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mig_core"

#: Lowest first; a module may import its own folder and anything in an earlier entry.
LAYERS: list[set[str]] = [
    {"errors", "version", "logconfig"},
    {"qapi"},
    {"schema"},
    {"plugin"},
    {"memory", "block"},
    {"host"},
    {"ext"},
    {"machine"},
    {"stream"},
    {"engine"},
    {"control"},
    {"qmp"},
    {"cli", "testing", "__main__"},
]

#: What plugins and contrib may import: the surface, the extension points and the types they speak in.
PUBLIC = ("mig_core", "mig_core.errors", "mig_core.ext", "mig_core.schema", "mig_core.qapi", "mig_core.memory",
          "mig_core.host", "mig_core.testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, own: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every mig_core module ``path`` imports, anywhere in the file, with its line."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mig_core":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split(".") if is_pkg else own.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mig_core":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno


def graph() -> dict[str, set[str]]:
    mods = package_modules()
    known = set(mods)
    return {m: {t for t, _ in imports(p, m, known) if t != m} for m, p in mods.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "<root>"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: folder '{top}' is in no layer (add it to LAYERS and docs/concepts.md)")


def test_no_import_cycle_in_mig_core():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_down_the_layers():
    bad = []
    for mod, targets in graph().items():
        if mod == "mig_core":
            continue  # the surface re-exports from every layer
        for t in targets:
            if t == "mig_core":
                bad.append(f"{mod} imports the package root (the public surface)")
            elif t.split(".")[1] != mod.split(".")[1] and layer(t) > layer(mod):
                bad.append(f"{mod} (layer {layer(mod)}) imports {t} (layer {layer(t)})")
    assert not bad, "\n".join(sorted(bad))


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The parser behind both tests finds imports hidden under TYPE_CHECKING and in function bodies."""
    src = tmp_path / "mig_core" / "engine" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mig_core.control.manager import M\n"
                   "def f():\n    from mig_core.engine import y\n")
    found = {t for t, _ in imports(src, "mig_core.engine.x", {"mig_core.engine.y"})}
    assert found == {"mig_core.control.manager", "mig_core.engine.y"}
    assert layer("mig_core.control.manager") > layer("mig_core.engine.x")


def test_plugins_and_contrib_import_only_the_public_surface():
    files = [p for top in ("plugins", "contrib") for p in (ROOT / top).rglob("*.py")
             if "build" not in p.relative_to(ROOT).parts and ".venv" not in p.parts]
    assert len(files) > 10
    known = set(package_modules())
    bad = []
    for p in files:
        for target, line in imports(p, "plugin", known):
            if not any(target == pub or target.startswith(pub + ".") for pub in PUBLIC[1:]) and target != "mig_core":
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)
