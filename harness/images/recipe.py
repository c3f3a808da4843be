"""Image recipes: ``images/<name>.toml``, merged over the recipe it extends, and the kernel pin."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import teelab_guest

from harness.images.errors import RecipeInvalid, RecipeUnknown

LIST_FIELDS = ("packages", "modules", "cmdline", "drop")


def recipes_dir() -> Path:
    """``TEELAB_IMAGES_DIR``, else the ``images/`` folder beside the harness package."""
    if os.environ.get("TEELAB_IMAGES_DIR"):
        return Path(os.environ["TEELAB_IMAGES_DIR"])
    return Path(__file__).resolve().parents[2] / "images"


def guest_init_dir() -> Path:
    """The ``teelab_guest`` package that goes into every image."""
    return Path(teelab_guest.__file__).resolve().parent


@dataclass(frozen=True)
class KernelPin:
    """A kernel package pinned by version and sha256; ``suite`` (e.g. ``trixie``) when the builder fetches it
    from that Debian suite through its own apt configuration instead of the host's."""

    package: str
    version: str
    sha256: str
    suite: str | None = None

    @property
    def deb_name(self) -> str:
        return f"{self.package}_{self.version}_amd64.deb"


@dataclass(frozen=True)
class Recipe:
    name: str
    role: str
    description: str
    suite: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    cmdline: tuple[str, ...]
    drop: tuple[str, ...]
    kernel: str = "kernel"  # the pin: images/<kernel>.toml

    def kernel_cmdline(self) -> str:
        return " ".join([*self.cmdline, f"teelab.role={self.role}"])


def is_kernel_pin(name: str) -> bool:
    """``kernel`` and ``kernel-<anything>`` name kernel pins, not image recipes."""
    return name == "kernel" or name.startswith("kernel-")


def recipe_names() -> list[str]:
    return sorted(
        p.stem for p in recipes_dir().glob("*.toml") if p.stem != "base" and not is_kernel_pin(p.stem)
    )


def load_recipe(name: str) -> Recipe:
    data = _merged(name, seen=())
    try:
        return Recipe(
            name=name,
            role=str(data["role"]),
            description=str(data.get("description", "")),
            suite=str(data["suite"]),
            kernel=str(data.get("kernel", "kernel")),
            **{field: tuple(str(v) for v in data.get(field, [])) for field in LIST_FIELDS},
        )
    except KeyError as exc:
        raise RecipeInvalid(
            f"recipe {name} has no {exc.args[0]!r}", hint=f"add {exc.args[0]} = ... to images/{name}.toml"
        ) from None


def load_kernel_pin(name: str = "kernel") -> KernelPin:
    """The pin ``images/<name>.toml``: package, version, sha256 and optionally suite."""
    path = recipes_dir() / f"{name}.toml"
    if not is_kernel_pin(name) or not path.is_file():
        raise RecipeInvalid(
            f"no kernel pin {name!r} (images/{name}.toml)",
            hint="name a kernel pin file: kernel or kernel-<something>",
        )
    data = _read_toml(path)
    try:
        suite = data.get("suite")
        return KernelPin(
            str(data["package"]),
            str(data["version"]),
            str(data["sha256"]),
            None if suite is None else str(suite),
        )
    except KeyError as exc:
        raise RecipeInvalid(
            f"images/{name}.toml has no {exc.args[0]!r}", hint="set package, version, sha256"
        ) from None


def _merged(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if name in seen:
        raise RecipeInvalid(f"recipe {name} extends itself via {' -> '.join(seen)}", hint="break the cycle")
    path = recipes_dir() / f"{name}.toml"
    if not path.is_file() or is_kernel_pin(name):
        raise RecipeUnknown(
            f"no image recipe {name!r}", hint=f"known recipes: {', '.join(recipe_names())}", name=name
        )
    data = _read_toml(path)
    for key in LIST_FIELDS:
        if not isinstance(data.get(key, []), list):
            raise RecipeInvalid(f"{path.name}: {key} must be a list", hint=f'write {key} = ["..."]')
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = _merged(str(parent), (*seen, name))
    for key, value in data.items():
        merged[key] = [*merged.get(key, []), *value] if key in LIST_FIELDS else value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeInvalid(f"{path.name} is not valid TOML: {exc}", hint=f"fix {path}") from exc
