"""The library's layers import only downward (docs/architecture.md): a test, so it stays true."""

from __future__ import annotations

import ast
import importlib
import inspect
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
    "enclave": 5, "ssh": 5,
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


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small() -> None:
    """No module in harness/ over 600 lines and no function over 80: past that, split along the meaning."""
    modules, functions = [], []
    for path in HARNESS.rglob("*.py"):
        text = path.read_text()
        name = str(path.relative_to(HARNESS))
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))  # type: ignore[operator]
    modules.sort(reverse=True)
    functions.sort(reverse=True)
    print(f"longest module: {modules[0][1]} ({modules[0][0]} lines)")
    print(f"longest function: {functions[0][1]} ({functions[0][0]} lines)")
    assert [m for m in modules if m[0] > MAX_MODULE_LINES] == []
    assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []


def test_every_name_is_imported_from_its_home() -> None:
    """A name is imported from the module that defines it, or from its package (the public API), never
    through another module that happens to import it."""
    detours = []
    for path in [*HARNESS.rglob("*.py"), *(HARNESS.parent / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness.")):
                continue
            module = importlib.import_module(node.module)
            if Path(module.__file__ or "").name == "__init__.py":
                continue
            for alias in node.names:
                named = getattr(module, alias.name, None)
                if not (inspect.isclass(named) or inspect.isfunction(named)):
                    continue  # constants carry their type's module, not their own
                home = named.__module__
                if home.startswith("harness") and home != node.module:
                    detours.append(f"{path.name}: {alias.name} from {node.module}, defined in {home}")
    assert detours == []


def test_the_cli_imports_its_commands_by_name() -> None:
    """No importlib registry in harness/cli: every dependency shows in the code and in import graphs."""
    assert [p.name for p in (HARNESS / "cli").glob("*.py") if "importlib" in _top_imports(p)] == []
