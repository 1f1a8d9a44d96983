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


# ------------------------------------------- collectives go through loom.comms

# torch.distributed's collectives and point-to-point messages: loom sends them
# through loom.comms, which records each one (the record the fault detectors read)
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "reduce", "gather", "gather_object", "scatter",
    "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "P2POp", "send_object_list", "recv_object_list",
}


def _collective_calls(path: pathlib.Path) -> list[str]:
    """``file:line name`` of every torch.distributed collective ``path`` uses:
    called through a name bound to torch.distributed (``dist.all_reduce``,
    ``torch.distributed.barrier``) or imported from it by name."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()       # names bound to the torch.distributed module
    torch_names = set()   # names bound to torch
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
                elif a.name.split(".")[0] == "torch":
                    torch_names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [(node.lineno, a.name) for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = node.value
            via_alias = isinstance(base, ast.Name) and base.id in aliases
            via_torch = (isinstance(base, ast.Attribute) and base.attr == "distributed"
                         and isinstance(base.value, ast.Name) and base.value.id in torch_names)
            if via_alias or via_torch:
                found.append((node.lineno, node.attr))
    return [f"{path.name}:{line} {name}" for line, name in sorted(found)]


@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if p != "comms" and (ROOT / p).is_dir()))
def test_only_comms_calls_torch_distributed_collectives(package):
    calls = [c for path in sorted((ROOT / package).glob("*.py")) for c in _collective_calls(path)]
    assert not calls, (f"loom.{package} calls torch.distributed collectives directly (send them through "
                       f"loom.comms, which records them): {calls}")


def test_the_collective_check_sees_every_spelling(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                    "from torch.distributed import broadcast, get_rank\n"
                    "dist.all_reduce(x)\ntorch.distributed.barrier()\nd2.isend(x, 1)\ndist.get_rank()\n"
                    "comms.all_reduce(x)\n")
    assert _collective_calls(path) == ["bad.py:4 broadcast", "bad.py:5 all_reduce", "bad.py:6 barrier",
                                       "bad.py:7 isend"]
