"""No two modules of musefast import each other, directly or around a circle — lazily (inside a
function) or not: dependencies point down (pipelines → models → nn → ops → kernels/reference),
and a CPU path, a format reader or an op's custom-op wrapper that reached back up would tie the
layers into one knot. Package ``__init__`` files (the public faces that re-export) are left out."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "musefast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(name: str, modules: dict) -> str | None:
    """The module file an imported dotted name lands in (a submodule if there is one)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(modules: dict) -> dict:
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in found:
                if imported.startswith("musefast"):
                    target = _target(imported, modules)
                    if target and target != name:
                        edges[name].add(target)
    return edges


def _circles(edges: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    faces = {name for name, p in modules.items() if p.name == "__init__.py"}
    edges = {name: targets - faces for name, targets in _edges(modules).items() if name not in faces}
    assert _circles(edges) == []


def test_the_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
