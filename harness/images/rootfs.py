"""The guest root filesystem: ``mmdebstrap --variant=extract`` of a few Debian packages, trimmed, compiled to
sourceless .pyc files, with guest-init installed, packed as an uncompressed newc cpio archive."""

from __future__ import annotations

import compileall
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.images.cache import build_lock
from harness.images.errors import PackFailed, RootfsFailed

DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PYTHON = "python3.11"
GUEST_SITE = "usr/lib/python3/dist-packages"

INIT_SCRIPT = f"""#!/usr/bin/{GUEST_PYTHON} -IS
import sys, time
exec_at = time.monotonic()
sys.path.append("/{GUEST_SITE}")
from teelab_guest.init import main
main(exec_at)
"""


def mirror() -> str:
    return os.environ.get("TEELAB_DEBIAN_MIRROR", DEFAULT_MIRROR)


def debootstrap_tar(suite: str, packages: tuple[str, ...], cache: Path) -> Path:
    """The mmdebstrap tarball of ``packages``, cached by suite, mirror and package set (images with the same
    packages share it, so one process at a time makes it)."""
    key = hashlib.sha256("\n".join([suite, mirror(), *sorted(packages)]).encode()).hexdigest()[:16]
    tar = cache / f"rootfs-{suite}-{key}.tar"
    cache.mkdir(parents=True, exist_ok=True)
    with build_lock(cache, tar.name):
        if not tar.exists():
            _debootstrap(suite, packages, tar)
    return tar


def _debootstrap(suite: str, packages: tuple[str, ...], tar: Path) -> None:
    partial = tar.with_name(f".partial-{tar.name}")  # mmdebstrap picks the format by suffix
    mode = "root" if os.geteuid() == 0 else "unshare"
    argv = ["mmdebstrap", "--variant=extract", f"--mode={mode}", "--quiet",
            f"--include={','.join(sorted(packages))}", suite, str(partial), mirror()]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RootfsFailed(
            f"mmdebstrap failed ({done.returncode}): {done.stderr.strip()[-800:]}",
            hint=f"check the mirror {mirror()} (TEELAB_DEBIAN_MIRROR) and the package names",
            argv=argv,
        )
    partial.rename(tar)


def unpack_tar(tar: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["tar", "-xf", str(tar), "-C", str(into), "--exclude=./dev/*", "--no-same-owner"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RootfsFailed(
            f"unpacking {tar.name}: {done.stderr.strip()[-500:]}", hint=f"delete {tar} and rebuild"
        )


def trim(root: Path, patterns: tuple[str, ...]) -> int:
    """Remove the paths matching ``patterns`` (globs under ``root``); returns the bytes removed."""
    removed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_symlink() or path.is_file():
                removed += path.lstat().st_size
                path.unlink()
            elif path.is_dir():
                removed += sum(
                    p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file()
                )
                shutil.rmtree(path)
    return removed


def install_guest_init(
    root: Path, package_dir: Path, modules: list[tuple[str, bytes]], image_info: str
) -> None:
    """guest-init as /init, its package in dist-packages, the kernel modules (name, ELF bytes) and their load
    order."""
    target = root / GUEST_SITE / "teelab_guest"
    shutil.copytree(package_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    module_dir = root / "lib/modules/teelab"
    module_dir.mkdir(parents=True, exist_ok=True)
    for name, elf in modules:
        (module_dir / f"{name}.ko").write_bytes(elf)
    etc = root / "etc/teelab"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "modules").write_text("".join(f"{name}\n" for name, _ in modules))
    (etc / "image.json").write_text(image_info)
    for directory in ("proc", "sys", "dev", "run", "tmp", "root"):
        (root / directory).mkdir(exist_ok=True)


def compile_python(root: Path) -> None:
    """Precompile every module: sourceless .pyc for Debian's Python (smaller, faster to import), and .pyc in
    __pycache__ beside the kept sources for guest-init (tracebacks keep their lines)."""
    version = sorted(p.name for p in (root / "usr/bin").glob("python3.*") if p.name[8:].isdigit())
    if version != [GUEST_PYTHON] or f"{sys.version_info[0]}.{sys.version_info[1]}" != GUEST_PYTHON[6:]:
        raise PackFailed(
            f"the guest has {version or 'no python3.X'}, the builder runs Python {sys.version.split()[0]}",
            hint=f"build images with Debian's {GUEST_PYTHON} (the teelab virtualenv uses /usr/bin/python3)",
        )
    ours = root / GUEST_SITE / "teelab_guest"
    for directory in (root / "usr/lib" / GUEST_PYTHON, root / GUEST_SITE):
        ok = compileall.compile_dir(
            directory, quiet=2, legacy=True, workers=0, ddir="/" + str(directory.relative_to(root)),
            rx=_Excluding(str(ours)),
        )  # fmt: skip
        if not ok:
            raise PackFailed(
                f"compileall failed under {directory}", hint="a Debian Python file did not compile"
            )
    for source in (root / "usr/lib" / GUEST_PYTHON).rglob("*.py"):
        source.unlink()
    for source in (root / GUEST_SITE).rglob("*.py"):
        if ours not in source.parents:
            source.unlink()
    ok = compileall.compile_dir(
        ours, quiet=2, workers=0, ddir="/" + str(ours.relative_to(root)),
        invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )  # fmt: skip
    if not ok:
        raise PackFailed(
            "guest-init does not compile", hint="run ruff on guest-init/ and fix the syntax error"
        )


class _Excluding:
    """A compileall ``rx`` that skips one directory."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def search(self, path: str) -> bool:
        return path.startswith(self.prefix)


def pack_cpio(root: Path, output: Path) -> int:
    """An uncompressed newc archive of ``root`` (uid/gid 0, sorted, reproducible); returns its size."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".cpio-", delete=False) as partial:
        done = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
            input="\n".join(names).encode() + b"\n", stdout=partial, stderr=subprocess.PIPE,
            cwd=root, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        os.unlink(partial.name)
        raise PackFailed(
            f"cpio failed: {done.stderr.decode(errors='replace')[-500:]}", hint="is cpio installed?"
        )
    os.replace(partial.name, output)
    return output.stat().st_size


LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


def prune_libraries(root: Path) -> int:
    """Remove shared libraries that no kept program or Python extension needs (the DT_NEEDED closure) from the
    multiarch library dirs; returns the bytes removed. Their subfolders (OpenSSL's providers...) stay."""
    libraries: dict[str, list[Path]] = {}
    for directory in LIBRARY_DIRS:
        for path in (root / directory).glob("*.so*") if (root / directory).is_dir() else ():
            libraries.setdefault(path.name, []).append(path)
    candidates = {p for paths in libraries.values() for p in paths}
    pending = [p for p in root.rglob("*") if p not in candidates and _is_elf(p)]
    keep: set[Path] = set()
    while pending:
        for name in _needed(pending.pop()):
            for library in libraries.get(name, []):
                for link in _link_chain(root, library):
                    if link not in keep:
                        keep.add(link)
                        pending.append(link)
    removed = 0
    for library in candidates - keep:
        removed += library.lstat().st_size
        library.unlink()
    return removed


def _needed(path: Path) -> list[str]:
    """The DT_NEEDED entries of an ELF file (none for a symlink: its target is visited itself)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    if path.is_symlink():
        return []
    try:
        with open(path, "rb") as handle:
            elf = ELFFile(handle)
            return [
                tag.needed
                for section in elf.iter_sections()
                if isinstance(section, DynamicSection)
                for tag in section.iter_tags()
                if tag.entry.d_tag == "DT_NEEDED"
            ]
    except (ELFError, OSError):
        return []


def _link_chain(root: Path, path: Path) -> list[Path]:
    """``path`` and every symlink hop after it, resolved inside ``root`` (absolute targets stay inside)."""
    chain = [path]
    while chain[-1].is_symlink() and len(chain) < 16:
        target = Path(os.readlink(chain[-1]))
        chain.append(root / target.relative_to("/") if target.is_absolute() else chain[-1].parent / target)
    return chain


def _is_elf(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


# Applets left out. modprobe: the kernel runs /sbin/modprobe for every module it requests (each crypto
# algorithm it looks up for the first time: 12 times while Debian 13's kernel boots, 4 times for Debian 12's),
# and busybox's could load nothing here (guest-init loads the recipe's modules itself; there is no
# modules.dep). Without it each request fails at once instead of costing an exec of busybox under TCG.
NO_APPLETS = frozenset({"modprobe"})


def install_busybox_links(root: Path) -> None:
    """Symlinks for every busybox applet that the rootfs does not already have (sh, ls, ip, ...), but those
    in ``NO_APPLETS``."""
    busybox = root / "bin/busybox"
    if not busybox.exists():
        return
    done = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    for applet in done.stdout.split():
        if Path(applet).name in NO_APPLETS:
            continue
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
