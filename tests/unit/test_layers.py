"""The library's layers import only downward (docs/architecture.md): a test, so it stays true."""

from __future__ import annotations

import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "harness"
# docs/architecture.md's layers, split where modules of one layer import each other: errors sits below the
# other base modules, and the CLI above the benchmarks and the demo it runs.
LAYER = {
    "errors": 0,
    "paths": 1, "aio": 1, "config": 1, "userfiles": 1,
    "host": 2,
    "qemu": 3, "images": 3, "attest": 3,
    "agent": 4, "vsock": 4, "tee": 4, "kms": 4,
    "enclave": 5,
    "lab": 6,
    "bench": 7, "demo": 7,
    "cli": 8, "pytest_plugin": 8,
}  # fmt: skip


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("harness.")}
    return found


def test_every_package_has_a_layer() -> None:
    packages = {
        p.stem if p.is_file() else p.name for p in HARNESS.iterdir() if p.suffix == ".py" or p.is_dir()
    }
    assert packages - {"__init__", "__pycache__"} == set(LAYER)


def test_imports_go_only_downward() -> None:
    upward = []
    for path in HARNESS.rglob("*.py"):
        relative = path.relative_to(HARNESS).with_suffix("")
        owner = relative.parts[0] if relative.parts[0] != "__init__" else None
        if owner is None:
            continue
        for target in imported_packages(path) - {owner}:
            if LAYER[target] >= LAYER[owner]:
                upward.append(
                    f"{relative} ({owner}, layer {LAYER[owner]}) imports {target} (layer {LAYER[target]})"
                )
    assert upward == []
