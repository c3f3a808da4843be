"""The host probe: what this machine can give a VM, read from files under a root directory.

Everything is read under ``root`` (``/`` on a real host), so tests point the probe at fixture trees: an
SEV-SNP host, a TDX host, a two-node SMT host. QEMU's capabilities come from running the binary found under
``root``.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.host.model import (
    Accel,
    EpcSection,
    HostCpu,
    HostInfo,
    HugepagePool,
    HugetlbfsMount,
    LibvirtInfo,
    QemuInfo,
    TeeSupport,
)

QEMU_BINARY = "qemu-system-x86_64"
BIN_DIRS = ("usr/bin", "usr/local/bin", "bin")
DATA_DIRS = ("usr/share/qemu", "usr/local/share/qemu")
LIBVIRT_SOCKETS = ("run/libvirt/libvirt-sock", "var/run/libvirt/libvirt-sock")
_QEMU_TIMEOUT = 10.0


def probe(root: str | Path = "/") -> HostInfo:
    """Probe the host under ``root``; never raises for a missing file, it reports the capability as absent."""
    root = Path(root)
    flags = cpu_flags(root)
    kvm_device = _usable_device(root / "dev/kvm")
    accel, reason = choose_accel(flags, kvm_device)
    cpus = cpu_topology(root)
    return HostInfo(
        accel=accel,
        accel_reason=reason,
        kvm_device=kvm_device,
        vhost_vsock=(root / "dev/vhost-vsock").exists(),
        cpus=cpus,
        hugepages=hugepage_pools(root),
        hugetlbfs=hugetlbfs_mounts(root),
        tee=tee_support(root, flags),
        qemu=qemu_info(root),
        libvirt=libvirt_info(root),
        numa_nodes=numa_nodes(root) or (0,),
        cpu_flags=flags,
    )


def choose_accel(flags: frozenset[str], kvm_device: bool) -> tuple[Accel, str]:
    """KVM only where the CPU exposes vmx or svm and /dev/kvm is read-write; TCG otherwise, with the reason.

    A KVM whose guests see no vmx/svm (PVM-based KVM, nested setups without them) hangs stock kernels, so
    /dev/kvm alone is not enough.
    """
    virt = sorted(flags & {"vmx", "svm"})
    if virt and kvm_device:
        return "kvm", f"{virt[0]} in /proc/cpuinfo and /dev/kvm is read-write"
    if not virt and kvm_device:
        return "tcg", "/dev/kvm exists but /proc/cpuinfo has no vmx or svm (PVM-based KVM?): using TCG"
    if virt:
        return "tcg", f"{virt[0]} in /proc/cpuinfo but /dev/kvm is missing or not read-write: using TCG"
    return "tcg", "no vmx or svm in /proc/cpuinfo and no usable /dev/kvm: using TCG"


def cpu_flags(root: Path) -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo."""
    for line in _read(root / "proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``0-3,8,10-11`` as a sorted tuple of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(cpus))


def numa_nodes(root: Path) -> tuple[int, ...]:
    base = root / "sys/devices/system/node"
    return tuple(sorted(_numbered(base, "node")))


def cpu_topology(root: Path) -> tuple[HostCpu, ...]:
    """Every CPU present: core, package, NUMA node, thread siblings, online state."""
    base = root / "sys/devices/system/cpu"
    online_text = _read(base / "online")
    online = set(parse_cpu_list(online_text)) if online_text.strip() else None
    node_of: dict[int, int] = {}
    for node in numa_nodes(root):
        for cpu in parse_cpu_list(_read(root / f"sys/devices/system/node/node{node}/cpulist")):
            node_of[cpu] = node
    cpus = []
    for cpu in sorted(_numbered(base, "cpu")):
        topo = base / f"cpu{cpu}/topology"
        siblings = parse_cpu_list(_read(topo / "thread_siblings_list")) or (cpu,)
        cpus.append(
            HostCpu(
                cpu=cpu,
                core=_int(_read(topo / "core_id"), cpu),
                package=_int(_read(topo / "physical_package_id"), 0),
                node=node_of.get(cpu, 0),
                siblings=siblings,
                online=online is None or cpu in online,
            )
        )
    return tuple(cpus)


def hugepage_pools(root: Path) -> tuple[HugepagePool, ...]:
    """Per-node pools where the kernel reports them, else the system-wide pool of each size."""
    pools: list[HugepagePool] = []
    for node in numa_nodes(root):
        pools += _pools(root / f"sys/devices/system/node/node{node}/hugepages", node)
    return tuple(pools) or tuple(_pools(root / "sys/kernel/mm/hugepages", None))


def _pools(base: Path, node: int | None) -> list[HugepagePool]:
    pools = []
    for entry in sorted(_listdir(base)):
        match = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if match:
            pools.append(
                HugepagePool(
                    size_kib=int(match[1]),
                    node=node,
                    total=_int(_read(base / entry / "nr_hugepages"), 0),
                    free=_int(_read(base / entry / "free_hugepages"), 0),
                )
            )
    return pools


def default_hugepage_kib(root: Path) -> int:
    match = re.search(r"^Hugepagesize:\s+(\d+) kB", _read(root / "proc/meminfo"), re.M)
    return int(match[1]) if match else 2048


def hugetlbfs_mounts(root: Path) -> tuple[HugetlbfsMount, ...]:
    """hugetlbfs mounts from /proc/mounts with their page size (the default size when none is given)."""
    default = default_hugepage_kib(root)
    mounts = []
    for line in _read(root / "proc/mounts").splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "hugetlbfs":
            size = default
            for option in fields[3].split(","):
                if option.startswith("pagesize="):
                    size = parse_size_kib(option.split("=", 1)[1])
            mounts.append(HugetlbfsMount(fields[1].replace("\\040", " "), size))
    return tuple(mounts)


def parse_size_kib(text: str) -> int:
    """``2M``, ``1G``, ``2048k`` or a byte count, in KiB."""
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)[bB]?", text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = int(match[1]), match[2].upper()
    return {"K": number, "M": number * 1024, "G": number * 1024 * 1024, "": number // 1024}[unit]


def tee_support(root: Path, flags: frozenset[str]) -> TeeSupport:
    """SEV/SEV-ES/SNP from kvm_amd's parameters, TDX from kvm_intel's."""
    amd = root / "sys/module/kvm_amd/parameters"
    intel = root / "sys/module/kvm_intel/parameters"
    sev = _yes(amd / "sev")
    encryption = cpuid(root, 0x8000001F)  # AMD memory encryption: EBX[5:0] C-bit, EBX[11:6] reduced bits
    return TeeSupport(
        sev=sev,
        sev_es=_yes(amd / "sev_es"),
        sev_snp=_yes(amd / "sev_snp") and (root / "dev/sev").exists(),
        tdx=_yes(intel / "tdx"),
        cbitpos=encryption[1] & 0x3F if sev and encryption else None,
        reduced_phys_bits=(encryption[1] >> 6) & 0x3F if sev and encryption else None,
        sgx="sgx" in flags,
        sgx_flc="sgx_lc" in flags,
        sgx_vepc=(root / "dev/sgx_vepc").exists(),
        sgx_epc=epc_sections(root),
    )


def epc_sections(root: Path) -> tuple[EpcSection, ...]:
    """The SGX EPC of each NUMA node that has some (the kernel's nodeN/x86/sgx_total_bytes)."""
    sections = []
    for path in sorted((root / "sys/devices/system/node").glob("node[0-9]*/x86/sgx_total_bytes")):
        try:
            size = int(_read(path).strip() or 0)
        except ValueError:
            continue
        if size > 0:
            sections.append(EpcSection(int(path.parent.parent.name.removeprefix("node")), size // 1024))
    return tuple(sorted(sections, key=lambda section: section.node))


def cpuid(root: Path, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """EAX, EBX, ECX, EDX of a CPUID leaf from /dev/cpu/0/cpuid (the cpuid module), or None."""
    try:
        with open(root / "dev/cpu/0/cpuid", "rb") as dev:
            dev.seek(leaf | subleaf << 32)
            data = dev.read(16)
    except OSError:
        return None
    if len(data) != 16:
        return None
    return struct.unpack("<4I", data)  # type: ignore[return-value]


def qemu_info(root: Path, binary: str = QEMU_BINARY) -> QemuInfo:
    """The QEMU binary under ``root``: its version and the object, device and machine types it offers."""
    path = next((root / d / binary for d in BIN_DIRS if (root / d / binary).is_file()), None)
    if path is None:
        return QemuInfo(binary=None, version=None)
    queries = {"version": ["--version"], "object": ["-object", "help"], "device": ["-device", "help"],
               "machine": ["-machine", "help"]}  # fmt: skip
    with ThreadPoolExecutor(len(queries)) as pool:
        answers = pool.map(lambda args: _run([str(path), *args]), queries.values())
        outputs = dict(zip(queries, answers, strict=True))
    version = re.search(r"version (\d+)\.(\d+)\.(\d+)", outputs["version"])
    data_dir = next((root / d for d in DATA_DIRS if (root / d).is_dir()), None)
    return QemuInfo(
        binary=str(path),
        data_dir=str(data_dir) if data_dir else None,
        firmware_files=frozenset(_listdir(data_dir)) if data_dir else frozenset(),
        version=(int(version[1]), int(version[2]), int(version[3])) if version else None,
        object_types=frozenset(_object_types(outputs["object"])),
        device_types=frozenset(re.findall(r'^name "([^"]+)"', outputs["device"], re.M)),
        machine_types=frozenset(_machine_types(outputs["machine"])),
    )


def _object_types(text: str) -> Iterable[str]:
    for line in text.splitlines():
        if line.startswith("  ") and line.strip():
            yield line.split()[0]


def _machine_types(text: str) -> Iterable[str]:
    for line in text.splitlines()[1:]:
        if line.strip():
            yield line.split()[0]


def libvirt_info(root: Path) -> LibvirtInfo:
    """libvirt is available when libvirt-python imports and libvirtd's socket is there."""
    try:
        import libvirt
    except ImportError:
        reason = "libvirt-python is not installed (pip install teelab[libvirt])"
        return LibvirtInfo(available=False, reason=reason)
    major, rest = divmod(libvirt.getVersion(), 1_000_000)
    version = f"{major}.{rest // 1000}.{rest % 1000}"
    socks = [root / s for s in LIBVIRT_SOCKETS if (root / s).exists()]
    if not socks:
        reason = "libvirtd is not running (no libvirt-sock)"
        return LibvirtInfo(available=False, version=version, reason=reason)
    if not any(socket_answers(sock) for sock in socks):
        reason = f"libvirtd is not running ({socks[0]} refuses connections: a stale socket)"
        return LibvirtInfo(available=False, version=version, reason=reason)
    return LibvirtInfo(available=True, version=version, uri="qemu:///system")


def socket_answers(sock: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``sock`` (a file alone may be stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def _usable_device(path: Path) -> bool:
    return path.exists() and os.access(path, os.R_OK | os.W_OK)


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_QEMU_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _yes(path: Path) -> bool:
    return _read(path).strip() in ("Y", "y", "1")


def _int(text: str, default: int) -> int:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else default


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _numbered(base: Path, prefix: str) -> Iterable[int]:
    for entry in _listdir(base):
        if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
            yield int(entry[len(prefix) :])
