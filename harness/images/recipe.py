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
    package: str
    version: str
    sha256: str

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

    def kernel_cmdline(self) -> str:
        return " ".join([*self.cmdline, f"teelab.role={self.role}"])


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml") if p.stem not in ("base", "kernel"))


def load_recipe(name: str) -> Recipe:
    data = _merged(name, seen=())
    try:
        return Recipe(
            name=name,
            role=str(data["role"]),
            description=str(data.get("description", "")),
            suite=str(data["suite"]),
            **{field: tuple(str(v) for v in data.get(field, [])) for field in LIST_FIELDS},
        )
    except KeyError as exc:
        raise RecipeInvalid(
            f"recipe {name} has no {exc.args[0]!r}", hint=f"add {exc.args[0]} = ... to images/{name}.toml"
        ) from None


def load_kernel_pin() -> KernelPin:
    data = _read_toml(recipes_dir() / "kernel.toml")
    try:
        return KernelPin(str(data["package"]), str(data["version"]), str(data["sha256"]))
    except KeyError as exc:
        raise RecipeInvalid(
            f"images/kernel.toml has no {exc.args[0]!r}", hint="set package, version, sha256"
        ) from None


def _merged(name: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if name in seen:
        raise RecipeInvalid(f"recipe {name} extends itself via {' -> '.join(seen)}", hint="break the cycle")
    path = recipes_dir() / f"{name}.toml"
    if not path.is_file() or name == "kernel":
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
