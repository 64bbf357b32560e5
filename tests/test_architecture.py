"""The rooms' imports run one way (client <- export -> serving.servables <- serving; bench above all),
each room imports itself relatively and the others as camserve.<room>, and `python -m export --help`
stays free of gRPC and TF Serving's protos."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOMS = ("client", "export", "serving", "bench")
# Which parts of the project each part may import (besides itself). serving.servables is TF Serving's
# runtime (loader, version folders, warm-up file, XLA), which the exporter and the server both stand on.
ALLOWED = {
    "client": set(),
    "serving.servables": set(),
    "serving": {"serving.servables"},
    "export": {"client", "serving.servables"},
    "bench": {"client", "export", "serving", "serving.servables"},
}


def part(module: str) -> str:
    """'serving.servables.session' -> 'serving.servables'; 'export.methods' -> 'export'."""
    return "serving.servables" if module.startswith("serving.servables") else module.split(".")[0]


def imports(path: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line, module of the project it imports, whether written as an absolute import of a bare room name)."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])]), False))
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name.startswith("camserve."):
                found.append((node.lineno, name.removeprefix("camserve."), False))
            elif name.split(".")[0] in ROOMS:
                found.append((node.lineno, name, True))
    return found


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            source = part(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for _, module, _ in imports(path):
                if part(module) != source:
                    graph.setdefault(source, set()).add(part(module))
    return graph


def test_the_rooms_import_each_other_one_way():
    graph = edges()
    wrong = {source: targets - ALLOWED[source] for source, targets in graph.items() if targets - ALLOWED[source]}
    assert not wrong, f"imports against the direction of the rooms: {wrong}"
    assert graph.get("export") and graph.get("serving") == {"serving.servables"}  # the check sees the real imports


def test_a_room_imports_itself_relatively_and_others_as_camserve():
    """Installed, the rooms are camserve.<room>: a bare `import export` would load a second copy of a
    module (or nothing at all) there, and relative imports across rooms cannot work in the repository."""
    bare = [f"{path.relative_to(ROOT)}:{line}: {module}"
            for room in ROOMS for path in (ROOT / room).rglob("*.py")
            for line, module, is_bare in imports(path) if is_bare]
    assert not bare, bare
    crossing = [f"{path.relative_to(ROOT)}:{node.lineno}"
                for room in ROOMS for path in (ROOT / room).rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level
                and node.level > len(path.relative_to(ROOT).parts) - 1]
    assert not crossing, f"relative imports out of their room: {crossing}"


@pytest.mark.parametrize("entry", ["export", "camserve.export"])
def test_the_exporter_does_not_import_grpc_or_tf_servings_protos(entry):
    script = f"""
import runpy, sys
sys.argv = ["export", "--help"]
try:
    runpy.run_module({entry!r}, run_name="__main__")
except SystemExit:
    pass
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "tensorflow_serving")))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--backbone" in run.stdout  # the help was printed
    assert "LOADED []" in run.stdout, run.stdout[-2000:]
