"""The package layout (docs/design.md, "Layout"): imports only go downward.

Every module of the package is parsed with `ast`; every import of a package
module counts, at module level or inside a function (lazy imports are still
dependencies). Relative imports are resolved; `convert/` and `kernels_metal/`
are read as `specstream_mlx.convert` and `specstream_mlx.kernels_metal`, the
names they ship under.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "specstream_mlx"

# Each module belongs to a group: a core module is its own group, a wing or
# subpackage is one group. Ranks, bottom up (docs/design.md, "Layout"): a
# module may import from its own rank or a lower one, never a higher one.
RANKS = {
    # 0. The leaf: kernel sources, launch code, emulator. Imports only mlx;
    #    the core's attention.py loads it lazily.
    "kernels_metal": 0,
    # 1-6. The core, flat in specstream_mlx/, in dependency order.
    "_blas": 1, "atomic": 1, "config": 1, "families": 1, "rope": 1, "masks": 1,
    "tree": 1, "treedesc": 1, "prompts": 1, "records": 1,
    "attention": 2, "cache": 2, "model": 2, "shard": 2, "heads": 2, "eagle": 2,
    "forward": 3, "loading": 3,
    "verify": 4, "drafters": 4, "overlap": 4,
    "decode": 5,
    "generate": 6,
    "__init__": 6,  # specstream_mlx/__init__.py: the public API over generate and loading
    # 7-8. The wings, each built on the core only.
    "train": 7, "bench": 7, "serve": 7, "convert": 7,
    # The kernel micro-benchmark (`specstream-mlx bench-kernel`) ships beside the
    # kernels but builds trees and masks with the core: a tool, not the leaf.
    "kernels_metal.bench": 7,
    "coreml": 8,  # the one wing above another (see WING_EDGES)
    # 9. The command line on top; the only place that ties the wings together.
    "cli": 9,
}
WINGS = {"train", "bench", "serve", "convert", "coreml", "kernels_metal.bench"}

# Imports from one wing into another that the design allows, with the reason.
WING_EDGES = {
    # Core ML export builds its PyTorch model with convert's PyTorch reference
    # (convert.to_torch), starts from convert's default checkpoint
    # (convert.default_model) and shares its error/log helpers (convert.common).
    ("coreml", "convert"): "coreml uses convert's PyTorch reference",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__)."""
    found = {}
    sources = [(ROOT / PACKAGE, PACKAGE, True),
               (ROOT / "convert", f"{PACKAGE}.convert", False),
               (ROOT / "kernels_metal", f"{PACKAGE}.kernels_metal", False)]
    for folder, prefix, recursive in sources:
        for path in sorted(folder.rglob("*.py") if recursive else folder.glob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = (path, is_package)
    return found


MODULES = _modules()


def _group(module: str) -> str | None:
    if module == PACKAGE:
        return "__init__"
    if module == f"{PACKAGE}.__main__":
        return "cli"  # `python -m specstream_mlx` runs the command line
    if module == f"{PACKAGE}.kernels_metal.bench":
        return "kernels_metal.bench"
    first = module.split(".")[1]
    return first if first in RANKS else None


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports; and the imports that resolve to none."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    unresolved = []
    for name, (path, is_package) in MODULES.items():
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        # `import a.b.c` loads a.b.c (and its parents): count the deepest module
                        parts = alias.name.split(".")
                        deepest = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                        if ".".join(parts[:i]) in MODULES), None)
                        targets.append(deepest or alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = ".".join(base[: len(base) - (node.level - 1)])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    # `from pkg import sub` imports the submodule; `from mod import x` the module
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in MODULES else source)
            for target in targets:
                if target not in MODULES:
                    unresolved.append(f"{name} (line {node.lineno}): {target}")
                elif target != name:
                    edges[name].add(target)
    return edges, unresolved


EDGES, UNRESOLVED = _imports()


def _edges():
    for source in sorted(EDGES):
        for target in sorted(EDGES[source]):
            yield source, target


def test_modules_found_and_every_import_resolves():
    assert f"{PACKAGE}.generate" in MODULES and f"{PACKAGE}.convert.pipeline" in MODULES
    assert f"{PACKAGE}.kernels_metal.launch" in MODULES and f"{PACKAGE}.cli.app" in MODULES
    assert not UNRESOLVED, "imports of package modules that do not exist:\n" + "\n".join(UNRESOLVED)


def test_every_module_has_a_rank():
    unranked = sorted(name for name in MODULES if _group(name) is None)
    assert not unranked, ("modules with no rank in tests/test_layout.py RANKS (place them in "
                          "the layout first):\n" + "\n".join(unranked))


def test_no_import_cycles():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(EDGES[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(EDGES):
        if node not in index:
            visit(node)
    detail = []
    for component in cycles:
        members = set(component)
        detail.append("cycle among: " + ", ".join(component))
        detail += [f"  {s} -> {t}" for s in component for t in sorted(EDGES[s]) if t in members]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_imports_only_go_down():
    upward = [f"{s} (rank {RANKS[_group(s)]}) -> {t} (rank {RANKS[_group(t)]})"
              for s, t in _edges()
              if _group(s) is not None and _group(t) is not None
              and RANKS[_group(s)] < RANKS[_group(t)]]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_wings_do_not_import_each_other():
    crossing = [f"{s} -> {t}" for s, t in _edges()
                if _group(s) in WINGS and _group(t) in WINGS and _group(s) != _group(t)
                and (_group(s), _group(t)) not in WING_EDGES]
    assert not crossing, "imports between wings the design does not allow:\n" + "\n".join(crossing)
    # Each allowed exception is still used (else drop it from WING_EDGES).
    used = {(_group(s), _group(t)) for s, t in _edges()}
    assert set(WING_EDGES) <= used, f"unused WING_EDGES: {set(WING_EDGES) - used}"


def test_bench_is_imported_by_cli_only():
    outside = [f"{s} -> {t}" for s, t in _edges()
               if _group(t) == "bench" and _group(s) not in ("bench", "cli")]
    assert not outside, "bench imported outside cli:\n" + "\n".join(outside)


def test_public_api():
    import importlib

    import specstream_mlx

    # `specstream_mlx.generate` is the function, which shadows the submodule's attribute.
    generate_module = importlib.import_module("specstream_mlx.generate")
    loading = importlib.import_module("specstream_mlx.loading")

    for name in ("load", "generate", "stream_generate"):
        assert name in specstream_mlx.__all__
        assert callable(getattr(specstream_mlx, name))
    assert specstream_mlx.load is loading.load
    assert specstream_mlx.generate is generate_module.generate
    assert specstream_mlx.stream_generate is generate_module.stream_generate
