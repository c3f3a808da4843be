"""Enclave images from recipes: ``images/enclaves/<name>/enclave.toml`` and its ``app/`` folder, packed as an
EIF over a base image, content-addressed like ``harness.images`` (inputs, not time: a second build is a hit).

The EIF: kernel = the base image's kernel; cmdline = the base's + the recipe's words, role enclave;
ramdisk[0] = the base's initrd (guest-init, Python, modules: PCR1); ramdisk[1] = the application, a newc
cpio of ``app/`` under ``/app`` (PCR2). Builds land in ``$XDG_CACHE_HOME/teelab/enclaves/<name>-<key>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import images, paths
from harness.enclave import eif as eif_format
from harness.enclave.eif_build import build_eif
from harness.enclave.errors import EnclaveAppPackFailed, EnclaveRecipeInvalid, EnclaveRecipeUnknown
from harness.enclave.pcrs import ImageMeasurements
from harness.enclave.plan import check_memory, check_vcpus, minimum_memory_mib
from harness.images import cache, rootfs
from harness.images.errors import PackFailed
from harness.images.recipe import recipes_dir

__all__ = [
    "BuiltEnclave",
    "EnclaveRecipe",
    "build_enclave_image",
    "enclave_cmdline",
    "enclave_key",
    "enclave_recipe_names",
    "load_enclave_recipe",
    "pack_app_ramdisk",
]

APP_MOUNT = "app"  # the application ramdisk unpacks under /app
ROLE = "enclave"
RECIPE_FILE = "enclave.toml"
RECIPE_KEYS = {"name", "version", "description", "base", "vcpus", "memory_mib", "cmdline"}
SKIPPED = ("__pycache__", ".pyc")  # left behind by running the app on the host; not part of the image
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
# What writes the EIF's bytes, beside the base image's key (which covers guest-init and harness.images).
BUILDER_SOURCES = (Path(__file__), Path(eif_format.__file__), Path(rootfs.__file__))


@dataclass(frozen=True)
class EnclaveRecipe:
    name: str
    version: str
    description: str
    base: str
    vcpus: int
    memory_mib: int
    cmdline: tuple[str, ...]
    directory: Path

    @property
    def app_dir(self) -> Path:
        return self.directory / "app"

    def inputs(self) -> dict[str, Any]:
        """What the recipe file says (not where it lives): part of the cache key."""
        fields = dataclasses.asdict(self)
        del fields["directory"]
        return fields


@dataclass(frozen=True)
class BuiltEnclave:
    """A built enclave image: ``path`` is the EIF; ``measurements`` its PCR0, PCR1, PCR2."""

    name: str
    version: str
    key: str
    path: Path
    measurements: ImageMeasurements
    eif_bytes: int
    app_ramdisk_bytes: int
    cmdline: str
    vcpus: int
    memory_mib: int
    base: str
    base_key: str
    built: bool  # True when this call built it, False when it came from the cache
    seconds: float  # how long this call took

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def minimum_memory_mib(self) -> int:
        """What the enclave needs at least: 128 MiB and 4 x the EIF."""
        return minimum_memory_mib(self.eif_bytes)


def enclave_recipes_dir() -> Path:
    return recipes_dir() / "enclaves"


def enclaves_dir() -> Path:
    path = paths.cache_dir() / "enclaves"
    path.mkdir(parents=True, exist_ok=True)
    return path


def enclave_recipe_names() -> list[str]:
    return sorted(p.parent.name for p in enclave_recipes_dir().glob(f"*/{RECIPE_FILE}"))


def _check_recipe_fields(data: dict[str, Any], name: str, where: str) -> None:
    """E931 for a recipe key that is unknown, missing or of the wrong type."""
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise EnclaveRecipeInvalid(
            f"{where}: unknown keys {unknown}", hint=f"known keys: {', '.join(sorted(RECIPE_KEYS))}"
        )
    if data.get("name") != name:
        raise EnclaveRecipeInvalid(
            f"{where}: name is {data.get('name')!r}, not its folder's name {name!r}",
            hint=f'set name = "{name}"',
        )
    for key in ("version", "base"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise EnclaveRecipeInvalid(
                f"{where}: {key} must be a non-empty string", hint=f'set {key} = "..."'
            )
    if not isinstance(data.get("description", ""), str):
        raise EnclaveRecipeInvalid(f"{where}: description must be a string", hint='description = "..."')
    for key in ("vcpus", "memory_mib"):
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            raise EnclaveRecipeInvalid(f"{where}: {key} must be an integer", hint=f"set {key} = N")
    words = data.get("cmdline", [])
    if not isinstance(words, list) or not all(is_cmdline_word(w) for w in words):
        raise EnclaveRecipeInvalid(
            f"{where}: cmdline must be a list of words (no spaces, quotes or control characters)",
            hint='write cmdline = ["key=value", ...]',
        )


def load_enclave_recipe(name: str) -> EnclaveRecipe:
    """``images/enclaves/<name>/enclave.toml``, checked: E930 when missing, E931 when malformed, E932/E933
    when its defaults break the sizing rules."""
    directory = enclave_recipes_dir() / name
    path = directory / RECIPE_FILE
    if not _NAME.fullmatch(name) or not path.is_file():
        raise EnclaveRecipeUnknown(
            f"no enclave recipe {name!r}",
            hint=f"known enclave recipes: {', '.join(enclave_recipe_names()) or 'none'} "
            f"(in {enclave_recipes_dir()})",
            name=name,
        )
    where = f"images/enclaves/{name}/{RECIPE_FILE}"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise EnclaveRecipeInvalid(f"{where} is not valid TOML: {exc}", hint=f"fix {where}") from None
    _check_recipe_fields(data, name, where)
    words = data.get("cmdline", [])
    check_vcpus(data["vcpus"], where=where)
    check_memory(data["memory_mib"], None, where=where)
    recipe = EnclaveRecipe(
        name=name,
        version=data["version"],
        description=data.get("description", ""),
        base=data["base"],
        vcpus=data["vcpus"],
        memory_mib=data["memory_mib"],
        cmdline=tuple(words),
        directory=directory,
    )
    if not any(is_file for _, _, is_file in app_entries(recipe.app_dir, where)):
        raise EnclaveRecipeInvalid(
            f"{where}: the app/ folder holds no file",
            hint=f"put the application (app/run) in {recipe.app_dir}",
        )
    return recipe


def app_entries(app_dir: Path, where: str = "the recipe") -> list[tuple[str, Path, bool]]:
    """(path relative to app/, path, is a file) for every folder and regular file of ``app_dir``, sorted;
    E931 for anything else (links, devices, sockets) or a missing folder."""
    if not app_dir.is_dir() or app_dir.is_symlink():
        raise EnclaveRecipeInvalid(
            f"{where}: {app_dir} is not a folder", hint="create app/ beside the recipe"
        )
    entries = []
    for path in sorted(app_dir.rglob("*")):
        relative = path.relative_to(app_dir)
        if any(part == SKIPPED[0] or part.endswith(SKIPPED[1]) for part in relative.parts):
            continue
        mode = path.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise EnclaveRecipeInvalid(
                f"{where}: app/{relative} is not a regular file or folder",
                hint="copy the file in place of the link; an enclave image holds files only",
                path=str(path),
            )
        entries.append((relative.as_posix(), path, stat.S_ISREG(mode)))
    return entries


def enclave_cmdline(base_cmdline: str, additions: tuple[str, ...]) -> str:
    """The base image's words (its role dropped), the recipe's, then ``teelab.role=enclave``."""
    words = [w for w in base_cmdline.split() if not w.startswith("teelab.role=")]
    return " ".join([*words, *additions, f"teelab.role={ROLE}"])


def enclave_key(recipe: EnclaveRecipe, base: images.BuiltImage) -> str:
    """The content address of an enclave image: recipe, base image key, app files (names, executable bits,
    contents) and the builder's source; never a time."""
    digest = hashlib.sha256()
    inputs = {"recipe": recipe.inputs(), "base": {"name": base.name, "key": base.key}}
    digest.update(json.dumps(inputs, sort_keys=True).encode() + b"\0")
    for relative, path, is_file in app_entries(recipe.app_dir):
        digest.update(f"app/{relative}\0{_mode(path, is_file):o}\0".encode())
        if is_file:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for source in BUILDER_SOURCES:
        digest.update(f"{source.parent.name}/{source.name}\0".encode() + source.read_bytes() + b"\0")
    return digest.hexdigest()


def pack_app_ramdisk(app_dir: Path, output: Path) -> int:
    """A newc cpio of ``app_dir`` under ``/app``: owner 0:0, modes 0755 (folders, executables) or 0644,
    mtime 0, names sorted, so equal inputs give equal bytes (and PCR2). Returns its size."""
    entries = app_entries(app_dir)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".app-") as tmp:
        root = Path(tmp) / "root"
        target = root / APP_MOUNT
        target.mkdir(parents=True)
        for relative, path, is_file in entries:
            copy = target / relative
            if is_file:
                shutil.copyfile(path, copy)
            else:
                copy.mkdir()
            copy.chmod(_mode(path, is_file))
        target.chmod(0o755)
        for path in sorted(root.rglob("*"), reverse=True):  # contents before their folder
            os.utime(path, (0, 0), follow_symlinks=False)
        try:
            return rootfs.pack_cpio(root, output)
        except PackFailed as exc:
            raise EnclaveAppPackFailed(
                f"cannot pack {app_dir}: {exc.message}", hint=exc.hint or "is cpio installed?"
            ) from exc


def build_enclave_image(
    name: str,
    *,
    base: images.BuiltImage | None = None,
    on_step: Callable[[str], None] | None = None,
) -> BuiltEnclave:
    """The enclave image ``name``, from the cache when its key is there, else built now. ``base`` overrides
    the recipe's base image (tests pass a small one); by default it is built or taken from the image cache."""
    started = time.monotonic()
    step = on_step or (lambda what: None)
    recipe = load_enclave_recipe(name)
    if base is None:
        step(f"base image {recipe.base}")
        base = images.build(recipe.base, on_step=lambda what: step(f"base image {recipe.base}: {what}"))
    key = enclave_key(recipe, base)
    out = cache.build_dir(enclaves_dir(), name, key)
    cached = _load(out, started)
    if cached is not None:
        return cached
    with cache.build_lock(enclaves_dir(), name):
        cached = _load(out, started)  # another process may have built it while we waited
        if cached is not None:
            return cached
        _build(recipe, base, key, out, step)
        cache.prune_builds(enclaves_dir(), name, "enclave.json", keep=out)
    built = _load(out, started)
    assert built is not None
    return dataclasses.replace(built, built=True)


def _build(
    recipe: EnclaveRecipe, base: images.BuiltImage, key: str, out: Path, step: Callable[[str], None]
) -> None:
    work = Path(tempfile.mkdtemp(dir=enclaves_dir(), prefix=f".build-{recipe.name}-"))
    try:
        step("application ramdisk")
        app_ramdisk = work / "app.cpio"
        app_bytes = pack_app_ramdisk(recipe.app_dir, app_ramdisk)
        step("eif")
        stage = work / "enclave"
        stage.mkdir()
        cmdline = enclave_cmdline(base.cmdline, recipe.cmdline)
        defaults = {"CPUCount": recipe.vcpus, "MemoryMiB": recipe.memory_mib}
        image = build_eif(
            stage / f"{recipe.name}.eif",
            kernel=base.kernel,
            cmdline=cmdline,
            ramdisks=[base.initrd, app_ramdisk],
            name=recipe.name,
            version=recipe.version,
            custom_metadata={**defaults, "Recipe": recipe.name, "Base": base.name, "BaseKey": base.key},
        )
        check_memory(recipe.memory_mib, image.size, where=f"images/enclaves/{recipe.name}/{RECIPE_FILE}")
        manifest = {
            "name": recipe.name,
            "version": recipe.version,
            "key": key,
            "eif": f"{recipe.name}.eif",
            "pcrs": {str(i): value.hex() for i, value in image.measurements.as_pcrs().items()},
            "eif_bytes": image.size,
            "app_ramdisk_bytes": app_bytes,
            "cmdline": cmdline,
            "vcpus": recipe.vcpus,
            "memory_mib": recipe.memory_mib,
            "base": base.name,
            "base_key": base.key,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (stage / "enclave.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():  # a build whose manifest was lost: replace it
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load(out: Path, started: float) -> BuiltEnclave | None:
    try:
        manifest = json.loads((out / "enclave.json").read_text())
        path = out / manifest["eif"]
        if path.stat().st_size != manifest["eif_bytes"]:
            return None
        pcrs = {int(k): bytes.fromhex(v) for k, v in manifest["pcrs"].items()}
        return BuiltEnclave(
            name=manifest["name"],
            version=manifest["version"],
            key=manifest["key"],
            path=path,
            measurements=ImageMeasurements(pcrs[0], pcrs[1], pcrs[2]),
            eif_bytes=manifest["eif_bytes"],
            app_ramdisk_bytes=manifest["app_ramdisk_bytes"],
            cmdline=manifest["cmdline"],
            vcpus=manifest["vcpus"],
            memory_mib=manifest["memory_mib"],
            base=manifest["base"],
            base_key=manifest["base_key"],
            built=False,
            seconds=time.monotonic() - started,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mode(path: Path, is_file: bool) -> int:
    if not is_file or path.stat().st_mode & 0o111:
        return 0o755
    return 0o644


def is_cmdline_word(word: object) -> bool:
    """A kernel command line word: non-empty, no spaces, quotes, backslashes or control characters."""
    return (
        isinstance(word, str)
        and bool(word)
        and not any(c.isspace() or c in "\"'\\" or ord(c) < 0x20 for c in word)
    )
