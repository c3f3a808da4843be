"""The pinned guest kernel: fetched with ``apt-get download`` (from the host's apt sources, or from the pin's
Debian suite through the builder's own apt configuration), else taken from the artifact cache the Ansible role
fills; checked by sha256, unpacked once into the cache, and its modules (``.ko`` or ``.ko.xz``) resolved with
their dependencies (read from each module's ``.modinfo``). Beside the bzImage, the uncompressed kernel with
its PVH entry is extracted once (``pvh.py``), for direct boots under TCG."""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import config
from harness.images.cache import build_lock
from harness.images.errors import KernelFetchFailed, RecipeInvalid
from harness.images.pvh import pvh_elf
from harness.images.recipe import KernelPin
from harness.images.rootfs import mirror

DEFAULT_ARTIFACT_CACHE = "/var/cache/teelab/artifacts"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SIGNATURE_MAGIC = b"~Module signature appended~\n"  # sign-file's trailer, after struct module_signature
PVH_KERNEL = "vmlinux-pvh"  # in the unpacked tree: the kernel ELF of boot/vmlinuz-*, when it has a PVH entry
NO_PVH_KERNEL = ".no-pvh"  # marks a tree whose bzImage gave no PVH kernel, so it is not tried again


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package: ``vmlinuz`` and its modules by name."""

    root: Path
    vmlinuz: Path
    modules: dict[str, Path]  # module name (dashes as underscores) -> .ko or .ko.xz path
    builtin: frozenset[str]

    def module_file(self, name: str) -> Path:
        """The uncompressed ``.ko`` of module ``name`` (a ``.ko.xz`` is decompressed beside it, once)."""
        path = self.modules[name]
        if path.suffix != ".xz":
            return path
        plain = path.with_suffix("")
        if not plain.exists():
            staging = plain.with_name(f".{plain.name}.{os.getpid()}")
            staging.write_bytes(module_bytes(path))
            staging.rename(plain)  # atomic: a concurrent build sees the whole file or none
        return plain

    def module_image(self, name: str, *, keep_signature: bool) -> bytes:
        """The ELF bytes to install for module ``name``: without its appended signature unless
        ``keep_signature``."""
        elf = self.module_file(name).read_bytes()
        return elf if keep_signature else without_signature(elf)

    def config(self, option: str) -> str | None:
        """A ``CONFIG_...`` value from the package's ``boot/config-*`` (None when unset or absent)."""
        for path in self.root.glob("boot/config-*"):
            for line in path.read_text().splitlines():
                if line.startswith(f"{option}="):
                    return line.split("=", 1)[1]
        return None

    @property
    def enforces_module_signatures(self) -> bool:
        """Whether this kernel refuses modules without a valid signature (``CONFIG_MODULE_SIG_FORCE``)."""
        return self.config("CONFIG_MODULE_SIG_FORCE") == "y"

    def pvh_kernel(self) -> Path | None:
        """The uncompressed kernel ELF of ``vmlinuz`` (extracted once, beside it), or None when the bzImage's
        payload cannot be decompressed here or the kernel has no PVH entry."""
        target, marker = self.root / PVH_KERNEL, self.root / NO_PVH_KERNEL
        if target.exists() or marker.exists():
            return target if target.exists() else None
        elf = pvh_elf(self.vmlinuz.read_bytes())
        if elf is None:
            marker.touch()
            return None
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        staging.write_bytes(elf)
        staging.rename(target)  # atomic: a concurrent build sees the whole file or none
        return target

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


def artifact_cache() -> Path:
    """Where the role keeps pinned artifacts for when the archive has dropped them: ``[images]
    artifact_cache`` in teelab.toml or ``TEELAB_IMAGES_ARTIFACT_CACHE``."""
    return Path(config.setting("images", "artifact_cache", DEFAULT_ARTIFACT_CACHE))


def fetch_deb(pin: KernelPin, cache: Path) -> Path:
    """The pinned .deb in ``cache``: downloaded if missing, else copied from the artifact cache; its sha256
    must match the pin."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / pin.deb_name
    if not deb.exists():
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as temp:
            failure = _download(pin, Path(temp), cache)
            found = list(Path(temp).glob("*.deb"))
            fallback = None if found else artifact_cache() / pin.deb_name
            if found:
                found[0].rename(deb)
            elif fallback is not None and fallback.is_file():
                shutil.copyfile(fallback, Path(temp) / pin.deb_name)
                (Path(temp) / pin.deb_name).rename(deb)
            else:
                raise KernelFetchFailed(
                    f"apt-get download {pin.package}={pin.version} failed ({failure}) and the artifact cache "
                    f"has no {pin.deb_name}",
                    hint=f"pin a kernel the archive still has (apt-cache policy), or put {pin.deb_name} in "
                    f"{artifact_cache()} (the Ansible role fills it)",
                    package=f"{pin.package}={pin.version}",
                )
    actual = sha256_file(deb)
    if actual != pin.sha256:
        deb.unlink()
        raise KernelFetchFailed(
            f"{pin.deb_name} has sha256 {actual}, the pin says {pin.sha256}",
            hint="the file changed: check it, then update sha256 in the kernel pin under images/",
        )
    return deb


def _download(pin: KernelPin, directory: Path, cache: Path) -> str:
    """``apt-get download`` the pin into ``directory``; what went wrong, or "" when it worked."""
    options = [] if pin.suite is None else apt_options(pin.suite, cache)
    spec = f"{pin.package}={pin.version}"
    done = _apt_download(spec, directory, options)
    if done.returncode != 0:  # package lists may be missing or stale: update once
        subprocess.run(["apt-get", *options, "update", "-qq"], capture_output=True, check=False)
        done = _apt_download(spec, directory, options)
    return "" if done.returncode == 0 else done.stderr.strip()[-300:] or f"exit {done.returncode}"


def apt_options(suite: str, cache: Path) -> list[str]:
    """apt options for a private configuration under ``cache/apt-<suite>``: the teelab mirror's ``suite``
    main, its own lists and archives, the host's sources and dpkg status untouched."""
    base = cache / f"apt-{suite}"
    for sub in ("lists/partial", "archives/partial"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    sources = base / "sources.list"
    line = f"deb [signed-by={DEBIAN_KEYRING}] {mirror()} {suite} main\n"
    if not sources.exists() or sources.read_text() != line:
        sources.write_text(line)
    return [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={base / 'lists'}",
        f"-oDir::Cache={base}",
        "-oDir::State::status=/dev/null",
        "-oAPT::Architecture=amd64",
        "-oAcquire::Retries=0",
    ]


def _apt_download(spec: str, directory: Path, options: list[str]) -> subprocess.CompletedProcess[str]:
    directory.chmod(0o777)  # apt's sandbox user must be able to write the file
    return subprocess.run(
        ["apt-get", *options, "download", "-qq", spec],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
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


def module_name(path: Path | str) -> str:
    """``virtio_pci`` for ``.../virtio-pci.ko`` or ``.../virtio-pci.ko.xz``."""
    name = Path(path).name
    return name.removesuffix(".xz").removesuffix(".ko").replace("-", "_")


def without_signature(elf: bytes) -> bytes:
    """A module without the signature ``sign-file`` appended: the PKCS#7 blob, a 12-byte struct
    module_signature whose last field is the blob's length (big-endian), and the magic trailer."""
    if not elf.endswith(SIGNATURE_MAGIC):
        return elf
    info_end = len(elf) - len(SIGNATURE_MAGIC)
    signature_length = int.from_bytes(elf[info_end - 4 : info_end], "big")
    start = info_end - 12 - signature_length
    if start <= 0:
        raise RecipeInvalid(
            "a kernel module's signature trailer is malformed", hint="check the kernel package pin"
        )
    return elf[:start]


def module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes (decompressed when it is a ``.ko.xz``)."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def unpack_file(deb: Path, member: str, cache: Path) -> Path:
    """One file of a package (``usr/share/ovmf/OVMF.fd``), unpacked once into ``cache`` beside the .deb."""
    target = cache / f"{deb.stem}-{Path(member).name}"
    if target.exists():
        return target
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
    try:
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], capture_output=True, text=True)
        if done.returncode != 0 or not (staging / member).is_file():
            raise KernelFetchFailed(
                f"{deb.name} has no {member}: {done.stderr.strip()}",
                hint="check the package pin",
                member=member,
            )
        (staging / member).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def kernel_tree(root: Path) -> KernelTree:
    vmlinuz = next(root.glob("boot/vmlinuz-*"))
    release_dir = next(
        d for d in (*root.glob("lib/modules/*"), *root.glob("usr/lib/modules/*")) if d.is_dir()
    )
    modules = {module_name(p): p for p in release_dir.rglob("*.ko.xz")}
    modules |= {module_name(p): p for p in release_dir.rglob("*.ko")}  # decompressed ones win
    builtin_file = release_dir / "modules.builtin"
    builtin = frozenset(
        module_name(line.strip())
        for line in (builtin_file.read_text().splitlines() if builtin_file.exists() else [])
        if line.strip().endswith((".ko", ".ko.xz"))
    )
    return KernelTree(root, vmlinuz, modules, builtin)


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def module_dependencies(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section."""
    match = _DEPENDS.search(module_bytes(ko))
    if not match or not match[1]:
        return []
    return [name.decode() for name in match[1].split(b",") if name]
