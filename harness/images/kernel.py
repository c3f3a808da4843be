"""The pinned guest kernel: fetched with ``apt-get download``, checked by sha256, unpacked once into the
cache, and its modules resolved with their dependencies (read from each module's ``.modinfo``)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.images.cache import build_lock
from harness.images.errors import KernelFetchFailed, RecipeInvalid
from harness.images.recipe import KernelPin


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package: ``vmlinuz`` and its modules by name."""

    root: Path
    vmlinuz: Path
    modules: dict[str, Path]  # module name (dashes as underscores) -> .ko path
    builtin: frozenset[str]

    def with_dependencies(self, wanted: tuple[str, ...]) -> list[str]:
        """``wanted`` and what they depend on, each after its dependencies; built-in ones left out."""
        order: list[str] = []

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name in order or name in self.builtin:
                return
            if name not in self.modules:
                raise RecipeInvalid(
                    f"kernel module {name} is not in the pinned kernel"
                    + (f" (needed by {chain[-1]})" if chain else ""),
                    hint="drop it from the recipe's modules, or pin a kernel that builds it as a module",
                )
            for dependency in module_dependencies(self.modules[name]):
                visit(dependency, (*chain, name))
            order.append(name)

        for name in wanted:
            visit(name, ())
        return order


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_deb(pin: KernelPin, cache: Path) -> Path:
    """The pinned .deb in ``cache``, downloaded if missing; its sha256 must match the pin."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / pin.deb_name
    if not deb.exists():
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as temp:
            spec = f"{pin.package}={pin.version}"
            done = _apt_download(spec, Path(temp))
            if done.returncode != 0:  # package lists may be missing on a fresh machine: update once
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
                done = _apt_download(spec, Path(temp))
            found = list(Path(temp).glob("*.deb"))
            if done.returncode != 0 or not found:
                raise KernelFetchFailed(
                    f"apt-get download {spec} failed: {done.stderr.strip()[-500:]}",
                    hint="pin a kernel the archive still has: apt-cache policy linux-image-cloud-amd64",
                    package=spec,
                )
            found[0].rename(deb)
    actual = sha256_file(deb)
    if actual != pin.sha256:
        deb.unlink()
        raise KernelFetchFailed(
            f"{pin.deb_name} has sha256 {actual}, the pin says {pin.sha256}",
            hint="the archive's file changed: check it, then update sha256 in images/kernel.toml",
        )
    return deb


def _apt_download(spec: str, directory: Path) -> subprocess.CompletedProcess[str]:
    directory.chmod(0o777)  # apt's sandbox user must be able to write the file
    return subprocess.run(
        ["apt-get", "download", "-qq", spec], cwd=directory, capture_output=True, text=True, check=False
    )


def unpack(pin: KernelPin, cache: Path) -> KernelTree:
    """The kernel package unpacked under ``cache/kernel-<sha>``, once (builds of other images share it, so
    one process at a time fetches and unpacks it)."""
    root = cache / f"kernel-{pin.sha256[:16]}"
    with build_lock(cache, root.name):
        if not (root / ".complete").exists():
            _extract(fetch_deb(pin, cache), root)
    return kernel_tree(root)


def _extract(deb: Path, root: Path) -> None:
    """``deb``'s files as ``root``, marked complete, replacing a partial tree."""
    shutil.rmtree(root, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".kernel-"))
    try:
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelFetchFailed(f"dpkg-deb -x {deb.name}: {done.stderr.strip()}", hint="remove the .deb")
        (staging / ".complete").touch()
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def kernel_tree(root: Path) -> KernelTree:
    vmlinuz = next(root.glob("boot/vmlinuz-*"))
    release_dir = next(root.glob("lib/modules/*"))
    modules = {p.name[:-3].replace("-", "_"): p for p in release_dir.rglob("*.ko")}
    builtin_file = release_dir / "modules.builtin"
    builtin = frozenset(
        Path(line.strip()).name[:-3].replace("-", "_")
        for line in (builtin_file.read_text().splitlines() if builtin_file.exists() else [])
        if line.strip().endswith(".ko")
    )
    return KernelTree(root, vmlinuz, modules, builtin)


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def module_dependencies(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section."""
    match = _DEPENDS.search(ko.read_bytes())
    if not match or not match[1]:
        return []
    return [name.decode() for name in match[1].split(b",") if name]
