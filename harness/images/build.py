"""Building guest images, content-addressed: a recipe whose inputs did not change is never rebuilt.

The key of an image is the SHA-256 of its merged recipe, the kernel pin, the builder's own source and every
guest-init source file; a build lands in ``$XDG_CACHE_HOME/teelab/images/<name>-<key>/`` as ``vmlinuz``,
``initrd.cpio``, ``image.json`` and, when the kernel has a PVH entry, ``vmlinux`` (the same kernel
uncompressed, a hard link into the unpacked kernel; ``BuiltImage.boot_kernel`` says when it boots).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import paths
from harness.images import cache, kernel, rootfs
from harness.images.recipe import (
    Recipe,
    guest_init_dir,
    load_kernel_pin,
    load_recipe,
    recipe_names,
)


@dataclass(frozen=True)
class BuiltImage:
    """A built guest image: boot it with ``kernel``, ``initrd`` and ``cmdline``."""

    name: str
    key: str
    role: str
    kernel: Path
    initrd: Path
    cmdline: str
    initrd_bytes: int
    built: bool  # True when this call built it, False when it came from the cache
    seconds: float  # how long this call took
    pvh_kernel: Path | None = None  # the kernel ELF with its PVH entry, None when the kernel has none

    @property
    def directory(self) -> Path:
        return self.initrd.parent

    def boot_kernel(self, accel: str) -> Path:
        """The kernel file a VM of this image boots with ``-kernel``. Under TCG, the uncompressed kernel
        through its PVH entry: emulating the bzImage's decompressor costs ~0.7 s of CPU for Debian 13's zstd
        kernel. Elsewhere the bzImage: the firmware of a real SEV-SNP or TDX guest (OVMF) needs it, and KVM
        runs its decompressor in milliseconds. Real SEV-SNP and TDX need KVM: a TCG guest is never one."""
        return self.pvh_kernel if accel == "tcg" and self.pvh_kernel is not None else self.kernel


def images_dir() -> Path:
    path = paths.cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_key(recipe: Recipe) -> str:
    """The content address of an image: what goes into it, not when it was made."""
    digest = hashlib.sha256()
    pin = load_kernel_pin(recipe.kernel)
    inputs = {
        "recipe": dataclasses.asdict(recipe),
        "kernel": dataclasses.asdict(pin),
        "mirror": rootfs.mirror(),
    }
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    for package in (guest_init_dir(), Path(__file__).parent):
        for source in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{source.relative_to(package)}".encode() + b"\0")
            digest.update(source.read_bytes() + b"\0")
    return digest.hexdigest()


def build(name: str, *, on_step: Callable[[str], None] | None = None) -> BuiltImage:
    """The image ``name``, from the cache when its key is there, else built now."""
    started = time.monotonic()
    recipe = load_recipe(name)
    key = image_key(recipe)
    directory = images_dir()
    out = cache.build_dir(directory, name, key)
    cached = _load(out, started)
    if cached is not None:
        return cached
    with cache.build_lock(directory, name):
        cached = _load(out, started)  # another process may have built it while we waited
        if cached is not None:
            return cached
        _build(recipe, key, out, on_step or (lambda step: None))
        cache.prune_builds(directory, name, "image.json", keep=out)
    image = _load(out, started)
    assert image is not None
    return dataclasses.replace(image, built=True)


def list_images() -> list[dict[str, object]]:
    """Every recipe with its current key and whether that build is in the cache."""
    rows = []
    for name in recipe_names():
        recipe = load_recipe(name)
        key = image_key(recipe)
        image = _load(cache.build_dir(images_dir(), name, key), time.monotonic())
        rows.append(
            {
                "name": name,
                "role": recipe.role,
                "key": key[:16],
                "cached": image is not None,
                "initrd_bytes": image.initrd_bytes if image else None,
                "description": recipe.description,
                "cmdline": recipe.kernel_cmdline(),
            }
        )
    return rows


def _build(recipe: Recipe, key: str, out: Path, step: Callable[[str], None]) -> None:
    directory = out.parent
    step("kernel")
    tree = kernel.unpack(load_kernel_pin(recipe.kernel), directory)
    # Module signatures: a kernel that does not enforce them (Debian's: no MODULE_SIG_FORCE, and a guest
    # booted without Secure Boot has no lockdown) only sets a taint flag by them, and checking one costs
    # ~25 ms of emulated CPU per module for Debian 13's ECDSA P-384 key. The modules' integrity is the
    # initramfs's, which the launch measurement covers. A kernel that enforces them gets them signed.
    keep_signatures = tree.enforces_module_signatures
    wanted = tree.with_dependencies(recipe.modules)
    modules = [(name, tree.module_image(name, keep_signature=keep_signatures)) for name in wanted]
    pvh_kernel = tree.pvh_kernel()
    step("rootfs")
    tar = rootfs.debootstrap_tar(recipe.suite, recipe.packages, directory)
    work = Path(tempfile.mkdtemp(dir=directory, prefix=f".build-{recipe.name}-"))
    try:
        root = work / "root"
        rootfs.unpack_tar(tar, root)
        step("trim")
        rootfs.trim(root, recipe.drop)
        rootfs.install_busybox_links(root)
        rootfs.prune_libraries(root)
        info = {"name": recipe.name, "key": key, "role": recipe.role}
        rootfs.install_guest_init(root, guest_init_dir(), modules, json.dumps(info))
        step("compile")
        rootfs.compile_python(root)
        step("pack")
        stage = work / "image"
        stage.mkdir()
        size = rootfs.pack_cpio(root, stage / "initrd.cpio")
        shutil.copyfile(tree.vmlinuz, stage / "vmlinuz")
        if pvh_kernel is not None:
            _link_or_copy(pvh_kernel, stage / "vmlinux")
        manifest = {
            **info,
            "cmdline": recipe.kernel_cmdline(),
            "initrd_bytes": size,
            "kernel": tree.vmlinuz.name,
            "pvh_kernel": "vmlinux" if pvh_kernel is not None else None,
            "module_signatures": "kept" if keep_signatures else "stripped",
            "modules": [n for n, _ in modules],
            "packages": list(recipe.packages),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (stage / "image.json").write_text(json.dumps(manifest, indent=1) + "\n")
        stage.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the kernel ELF is ~55 MB and the same for every image of a kernel), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _load(out: Path, started: float) -> BuiltImage | None:
    try:
        manifest = json.loads((out / "image.json").read_text())
    except (OSError, ValueError):
        return None
    return BuiltImage(
        name=manifest["name"],
        key=manifest["key"],
        role=manifest["role"],
        kernel=out / "vmlinuz",
        initrd=out / "initrd.cpio",
        cmdline=manifest["cmdline"],
        initrd_bytes=manifest["initrd_bytes"],
        built=False,
        seconds=time.monotonic() - started,
        pvh_kernel=out / manifest["pvh_kernel"] if manifest.get("pvh_kernel") else None,
    )
