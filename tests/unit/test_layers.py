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
    "agent": 4, "vsock": 4, "tee": 4, "kms": 4, "libvirt": 4,
    "enclave": 5,
    "lab": 6,
    "bench": 7, "demo": 7, "demo_tpm": 7,
    "cli": 8, "pytest_plugin": 8,
}  # fmt: skip


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            parts = node.module.split(".")
            found |= (
                {parts[1]} if len(parts) > 1 else {a.name for a in node.names if not a.name.startswith("__")}
            )
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


GUEST_INIT = HARNESS.parent / "guest-init"
CLOCKS = {"perf_counter", "monotonic", "time", "perf_counter_ns", "monotonic_ns"}


def test_guest_code_never_imports_the_harness() -> None:
    """Guests run teelab_guest alone; the harness imports the shared wire modules, never the reverse."""
    offenders = [
        str(path.relative_to(GUEST_INIT))
        for path in GUEST_INIT.rglob("*.py")
        if any(p == "harness" or p.startswith("harness.") for p in _top_imports(path))
    ]
    assert offenders == []


def test_no_cli_module_holds_a_timing_loop() -> None:
    """Benchmarks live in harness/bench: a loop that reads a clock in harness/cli is one that escaped."""
    loops = []
    for path in (HARNESS / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.For, ast.While, ast.AsyncFor)) and any(
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in CLOCKS
                for call in ast.walk(node)
            ):
                loops.append(f"{path.name}:{node.lineno}")
    assert loops == []


def _top_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names
