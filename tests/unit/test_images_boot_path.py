"""What the image builder does for boot time under TCG: the kernel's PVH ELF taken out of its bzImage, module
signatures left off where the kernel does not enforce them, no busybox modprobe, and guest-init's platform
drivers loaded only on their platform."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from teelab_guest import init as guest_init

from harness.images import BuiltImage
from harness.images.errors import RecipeInvalid
from harness.images.kernel import SIGNATURE_MAGIC, KernelTree, without_signature
from harness.images.pvh import has_pvh_entry, pvh_elf
from harness.images.rootfs import install_busybox_links


def elf_with_notes(*notes: tuple[bytes, int]) -> bytes:
    """An x86-64 ELF: header, one PT_NOTE segment holding ``notes`` (name, type), then a loadable body."""
    body = b"".join(
        struct.pack("<III", len(name), 4, kind)
        + name.ljust((len(name) + 3) & ~3, b"\0")
        + b"\x00\x00\x00\x01"
        for name, kind in notes
    )
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<HH", header, 0x10, 2, 62)  # ET_EXEC, EM_X86_64
    struct.pack_into("<QQ", header, 0x20, 64, 0)  # program headers at 64, no section headers
    struct.pack_into("<HHHH", header, 0x36, 56, 2, 64, 0)
    notes_at = 64 + 2 * 56
    load_at = notes_at + len(body)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(body), len(body), 4)  # PT_NOTE
    load = struct.pack("<IIQQQQQQ", 1, 5, load_at, 0x1000000, 0x1000000, 4096, 4096, 0x1000)  # PT_LOAD
    return bytes(header) + note + load + body + bytes(range(256)) * 16


def bzimage(payload: bytes, setup_sectors: int = 3) -> bytes:
    """A bzImage's shape: setup sectors with the header, then the protected-mode code holding ``payload``."""
    image = bytearray((setup_sectors + 1) * 512 + 0x200)
    image[0x1F1] = setup_sectors
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<II", image, 0x248, 0x200, len(payload))
    return bytes(image) + payload + b"stub code after the payload"


PVH_NOTE = (b"Xen\0", 18)
RELOCATIONS = b"\x10\x20\x30\x40" * 1000  # what the kernel build appends to vmlinux.bin before compressing


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(
    "compress",
    [gzip.compress, lambda d: lzma.compress(d, lzma.FORMAT_XZ, lzma.CHECK_CRC32), zstd],
    ids=["gzip", "xz", "zstd"],
)
def test_the_pvh_kernel_is_the_bzimage_payload_cut_to_its_elf(compress: Callable[[bytes], bytes]) -> None:
    if compress is zstd and shutil.which("zstd") is None:
        pytest.skip("no zstd here (the host packages list has it)")
    elf = elf_with_notes((b"GNU\0", 3), PVH_NOTE)
    payload = compress(elf + RELOCATIONS) + struct.pack("<I", len(elf) + len(RELOCATIONS))
    assert pvh_elf(bzimage(payload)) == elf


def test_no_pvh_kernel_without_the_note_a_header_or_a_known_format() -> None:
    plain = elf_with_notes((b"GNU\0", 3), (b"Xen\0", 6))  # Xen notes, but no PHYS32_ENTRY
    assert has_pvh_entry(elf_with_notes(PVH_NOTE)) and not has_pvh_entry(plain)
    assert pvh_elf(bzimage(gzip.compress(plain))) is None
    assert pvh_elf(bzimage(b"LZMX unknown compression")) is None
    assert pvh_elf(b"\x7fELF" + bytes(4096)) is None  # not a bzImage at all
    assert pvh_elf(bzimage(gzip.compress(elf_with_notes(PVH_NOTE)))[:900]) is None  # truncated


def signed(elf: bytes, signature: bytes) -> bytes:
    """What sign-file appends: the PKCS#7 blob, struct module_signature (length last, big-endian), magic."""
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(signature))
    return elf + signature + info + SIGNATURE_MAGIC


def test_module_signatures_come_off_exactly() -> None:
    elf = b"\x7fELF" + bytes(range(200))
    assert without_signature(signed(elf, b"\x30\x82" + bytes(101))) == elf
    assert without_signature(elf) == elf  # an unsigned module stays as it is
    with pytest.raises(RecipeInvalid, match="signature trailer"):
        without_signature(b"\x00" * 8 + struct.pack(">I", 4096) + SIGNATURE_MAGIC)


@pytest.mark.parametrize("force", ["y", None])
def test_a_kernel_that_enforces_signatures_keeps_them(tmp_path: Path, force: str | None) -> None:
    (tmp_path / "boot").mkdir()
    config = [
        "CONFIG_MODULE_SIG=y",
        f"CONFIG_MODULE_SIG_FORCE={force}" if force else "# CONFIG_MODULE_SIG_FORCE",
    ]
    (tmp_path / "boot" / "config-6.12.0-test").write_text("\n".join(config) + "\n")
    module = tmp_path / "m.ko"
    elf = b"\x7fELF module"
    module.write_bytes(signed(elf, b"sig" * 30))
    tree = KernelTree(tmp_path, tmp_path / "vmlinuz", {"m": module}, frozenset())
    assert tree.enforces_module_signatures is (force == "y")
    installed = tree.module_image("m", keep_signature=tree.enforces_module_signatures)
    assert installed == (module.read_bytes() if force else elf)


def test_the_pvh_kernel_boots_only_under_tcg(tmp_path: Path) -> None:
    kernel, pvh = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    image = BuiltImage(
        "cvm", "k" * 64, "cvm", kernel, tmp_path / "initrd.cpio", "console=ttyS0", 1, False, 0.0
    )
    assert image.boot_kernel("tcg") == kernel  # no PVH kernel: the bzImage everywhere
    with_pvh = BuiltImage(**{**image.__dict__, "pvh_kernel": pvh})
    assert (with_pvh.boot_kernel("tcg"), with_pvh.boot_kernel("kvm")) == (pvh, kernel)


def test_busybox_links_leave_out_modprobe(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("no busybox here (the host packages list has busybox-static)")
    (tmp_path / "bin").mkdir()
    shutil.copyfile(busybox, tmp_path / "bin" / "busybox")
    (tmp_path / "bin" / "busybox").chmod(0o755)
    install_busybox_links(tmp_path)
    links = {p.name for p in tmp_path.rglob("*") if p.is_symlink()}
    assert {"sh", "insmod", "mount"} <= links and "modprobe" not in links


def test_guest_init_loads_platform_drivers_only_on_their_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "fpu" in guest_init.cpu_flags()  # this machine's /proc/cpuinfo
    device = tmp_path / "sev-guest"
    monkeypatch.setitem(guest_init.PLATFORM_MODULES, "sev_guest", ("device", str(device)))
    flags = {"fpu", "sse2"}
    monkeypatch.setattr(guest_init, "cpu_flags", lambda: flags)
    assert not guest_init.platform_present("sev_guest") and not guest_init.platform_present("tdx_guest")
    assert guest_init.platform_present("virtio_net")  # not a platform driver: always loaded
    device.touch()
    flags.add("tdx_guest")
    assert guest_init.platform_present("sev_guest") and guest_init.platform_present("tdx_guest")
