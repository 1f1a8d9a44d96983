"""The import directions of DESIGN.md: comms imports nothing of loom; parallel,
checkpoint, faults and data import only comms; launch composes everything."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {"comms": set(), "parallel": {"comms"}, "checkpoint": {"comms"}, "faults": {"comms"},
           "data": {"comms"}, "launch": {"comms", "parallel", "checkpoint", "faults", "data"}}


def _loom_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "loom" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if (ROOT / p).is_dir()))
def test_import_directions(package):
    folder = ROOT / package
    for path in sorted(folder.glob("*.py")):
        wrong = _loom_imports(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports loom.{', loom.'.join(sorted(wrong))}"
