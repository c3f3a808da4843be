"""Typed QEMU ``-object`` values: memory backends (ram, memfd, file), confidential guests (SNP, TDX)."""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from harness.host.hugepages import pool_knob
from harness.host.model import Accel, HostInfo, size_text
from harness.qemu.errors import (
    HugepagesShort,
    HugetlbfsNotMounted,
    MemorySizeError,
    OptionInvalid,
    SevSnpUnavailable,
    SpecError,
    TdxUnavailable,
)
from harness.qemu.options import (
    check_id,
    escape,
    onoff,
    qemu_version,
    require_type,
    size_mib,
    truefalse,
)

NumaPolicy = Literal["bind", "preferred", "interleave"]


@dataclass(frozen=True)
class HugepageDemand:
    """Hugepages a backend takes: ``pages`` of ``page_kib`` from ``nodes`` (empty: any node)."""

    page_kib: int
    pages: int
    nodes: tuple[int, ...] = ()


def check_hugepages(host: HostInfo, demand: HugepageDemand, what: str) -> None:
    """Raise HugepagesShort when the host has fewer free pages than ``demand`` on its nodes."""
    nodes: tuple[int | None, ...] = demand.nodes or (None,)
    free = sum(host.free_hugepages(demand.page_kib, node) for node in nodes)
    if free >= demand.pages:
        return
    node = demand.nodes[0] if len(demand.nodes) == 1 else None  # one node: grow that node's own pool
    total = sum(p.total for p in host.hugepage_pools_of(demand.page_kib, node))
    knob = pool_knob(demand.page_kib, node)
    where = f" on node {','.join(map(str, demand.nodes))}" if demand.nodes else ""
    raise HugepagesShort(
        f"{what} needs {demand.pages} hugepages of {demand.page_kib} KiB{where} but {free} are free",
        hint=f"reserve {demand.pages - free} more as root: echo {total + demand.pages - free} > {knob}",
        needed=demand.pages,
        free=free,
        page_kib=demand.page_kib,
        nodes=demand.nodes,
    )


def check_numa_binding(
    backend: str, host_nodes: tuple[int, ...], policy: NumaPolicy | None, host: HostInfo
) -> None:
    """OptionInvalid unless ``host_nodes`` and ``policy`` come together and name nodes the host has."""
    if bool(host_nodes) != (policy is not None):
        raise OptionInvalid(
            f"memory backend {backend}: host_nodes and policy go together "
            f"(host_nodes={host_nodes}, policy={policy})",
            hint="give both host_nodes=(0,) and policy='bind', or neither",
            id=backend,
        )
    unknown = sorted(set(host_nodes) - set(host.numa_nodes))
    if unknown:
        raise OptionInvalid(
            f"memory backend {backend}: host NUMA node(s) {unknown} do not exist "
            f"(host has {list(host.numa_nodes)})",
            hint=f"choose host_nodes among {list(host.numa_nodes)}",
            id=backend,
        )


class MemoryBackend(ABC):
    """A ``memory-backend-*`` object holding guest RAM."""

    id: str
    size_mib: int
    qemu_type: ClassVar[str]

    @property
    def shared(self) -> bool:
        """Whether another process (a vhost-user backend) can map this memory."""
        return False

    def hugepage_demand(self) -> HugepageDemand | None:
        return None

    def validate(self, host: HostInfo) -> None:
        check_id("object", self.id)
        if self.size_mib < 1:
            raise MemorySizeError(
                f"memory backend {self.id} has size {self.size_mib} MiB",
                hint="give the backend a positive size_mib",
                id=self.id,
            )
        hint = f"install a QEMU that offers -object {self.qemu_type} or use another memory backend"
        require_type(host, "object", self.qemu_type, hint)
        demand = self.hugepage_demand()
        if demand is not None:
            if (self.size_mib * 1024) % demand.page_kib:
                raise MemorySizeError(
                    f"memory backend {self.id}: {self.size_mib} MiB is not a multiple of the "
                    f"{demand.page_kib} KiB hugepage size",
                    hint=f"round size_mib up to a multiple of {demand.page_kib // 1024 or 1} MiB",
                    id=self.id,
                )
            check_hugepages(host, demand, f"memory backend {self.id}")

    @abstractmethod
    def options(self) -> list[str]:
        """Options after ``type,id=..,size=..``."""

    def args(self) -> list[str]:
        head = [self.qemu_type, f"id={self.id}", f"size={size_mib(self.size_mib)}"]
        return ["-object", ",".join(head + self.options())]


@dataclass(frozen=True)
class MemoryBackendRam(MemoryBackend):
    """Anonymous private RAM."""

    id: str
    size_mib: int
    qemu_type: ClassVar[str] = "memory-backend-ram"

    def options(self) -> list[str]:
        return []


@dataclass(frozen=True)
class MemoryBackendMemfd(MemoryBackend):
    """RAM in a memfd: shareable with vhost-user backends, optionally on hugetlb pages."""

    id: str
    size_mib: int
    share: bool = True
    hugetlb: bool = False
    hugetlbsize_kib: int | None = None
    prealloc: bool = False  # take every page at launch (an enclave's memory must be there before it runs)
    host_nodes: tuple[int, ...] = ()  # with policy "bind": the pages come from these host NUMA nodes only
    policy: NumaPolicy | None = None
    qemu_type: ClassVar[str] = "memory-backend-memfd"

    @property
    def shared(self) -> bool:
        return self.share

    def hugepage_demand(self) -> HugepageDemand | None:
        if not self.hugetlb:
            return None
        page_kib = self.hugetlbsize_kib or 2048
        nodes = self.host_nodes if self.policy == "bind" else ()
        return HugepageDemand(page_kib, -(-self.size_mib * 1024 // page_kib), nodes)

    def validate(self, host: HostInfo) -> None:
        if self.hugetlbsize_kib is not None and not self.hugetlb:
            raise OptionInvalid(
                f"memory backend {self.id} sets hugetlbsize_kib without hugetlb",
                hint="set hugetlb=True or drop hugetlbsize_kib",
                id=self.id,
            )
        check_numa_binding(self.id, self.host_nodes, self.policy, host)
        super().validate(host)

    def options(self) -> list[str]:
        opts = [f"share={truefalse(self.share)}"]
        if self.hugetlb:
            opts.append("hugetlb=true")
            if self.hugetlbsize_kib is not None:
                opts.append(f"hugetlbsize={size_text(self.hugetlbsize_kib)}")
        if self.prealloc:
            opts.append("prealloc=true")
        opts += [f"host-nodes={node}" for node in self.host_nodes]
        if self.policy is not None:
            opts.append(f"policy={self.policy}")
        return opts


@dataclass(frozen=True)
class MemoryBackendFile(MemoryBackend):
    """RAM in a file under ``mem_path``: a hugetlbfs mount when ``hugepage_kib`` is set, with NUMA binding."""

    id: str
    size_mib: int
    mem_path: Path
    share: bool = True
    prealloc: bool = True
    host_nodes: tuple[int, ...] = ()
    policy: NumaPolicy | None = None
    hugepage_kib: int | None = 2048
    qemu_type: ClassVar[str] = "memory-backend-file"

    @property
    def shared(self) -> bool:
        return self.share

    def hugepage_demand(self) -> HugepageDemand | None:
        if self.hugepage_kib is None:
            return None
        nodes = self.host_nodes if self.policy == "bind" else ()
        return HugepageDemand(self.hugepage_kib, -(-self.size_mib * 1024 // self.hugepage_kib), nodes)

    def validate(self, host: HostInfo) -> None:
        check_id("object", self.id)
        check_numa_binding(self.id, self.host_nodes, self.policy, host)
        if self.hugepage_kib is not None:
            self._check_mount(host, self.hugepage_kib)
        super().validate(host)

    def _check_mount(self, host: HostInfo, page_kib: int) -> None:
        path = Path(self.mem_path)
        mounts = [m for m in host.hugetlbfs if Path(m.path) == path or Path(m.path) in path.parents]
        if any(m.pagesize_kib == page_kib for m in mounts):
            return
        size = size_text(page_kib)
        raise HugetlbfsNotMounted(
            f"memory backend {self.id}: {path} is not a hugetlbfs mount of {page_kib} KiB pages "
            f"(mounts: {', '.join(f'{m.path} ({m.pagesize_kib} KiB)' for m in host.hugetlbfs) or 'none'})",
            hint=f"as root: mkdir -p {path} && mount -t hugetlbfs -o pagesize={size} none {path}",
            id=self.id,
            mem_path=str(path),
        )

    def options(self) -> list[str]:
        opts = [
            f"mem-path={escape(self.mem_path)}",
            f"share={truefalse(self.share)}",
            f"prealloc={truefalse(self.prealloc)}",
        ]
        opts += [f"host-nodes={node}" for node in self.host_nodes]
        if self.policy is not None:
            opts.append(f"policy={self.policy}")
        return opts


class ConfidentialGuest(ABC):
    """A confidential-guest-support object; ``validate`` names everything the host lacks for it."""

    id: str
    qemu_type: ClassVar[str]
    min_qemu: ClassVar[str]
    host_flag: ClassVar[str]
    unavailable: ClassVar[type[SpecError]]
    memory_types: ClassVar[tuple[type[MemoryBackend], ...]] = ()
    needs_shared_memory: ClassVar[bool] = False
    needs_firmware: ClassVar[bool] = True

    @abstractmethod
    def host_supports(self, host: HostInfo) -> bool:
        """The probe's verdict on the host kernel and firmware."""

    def machine_options(self) -> list[str]:
        """``-machine`` options after ``confidential-guest-support`` and ``memory-backend``."""
        return []

    def validate(self, host: HostInfo, accel: Accel | None = None) -> None:
        check_id("object", self.id)
        accel = accel or host.accel
        missing = []
        if host.qemu.object_types and self.qemu_type not in host.qemu.object_types:
            version, wanted = qemu_version(host), self.min_qemu
            missing.append(f"QEMU {version} has no object type {self.qemu_type} (needs QEMU >= {wanted})")
        if not self.host_supports(host):
            missing.append(f"{self.host_flag} is not Y")
        if accel != "kvm":
            why = host.accel_reason if host.accel != "kvm" else "the spec asks for tcg"
            missing.append(f"accel is {accel}, not kvm ({why})")
        if missing:
            raise self.unavailable(
                f"{self.qemu_type} {self.id} cannot run here: " + "; ".join(missing),
                hint=f"run on a host with QEMU >= {self.min_qemu}, {self.host_flag} = Y and usable KVM, "
                "or use the emulated TEE backend",
                missing=missing,
            )

    @abstractmethod
    def options(self) -> list[str]:
        """Options after ``type,id=..``."""

    def args(self) -> list[str]:
        return ["-object", ",".join([self.qemu_type, f"id={self.id}", *self.options()])]


@dataclass(frozen=True)
class SevSnpGuest(ConfidentialGuest):
    """An AMD SEV-SNP guest (QEMU >= 9.1, docs/system/i386/amd-memory-encryption.rst).

    ``host_data`` (32 bytes) is placed in the attestation report; ``id_block`` (96 bytes) and ``id_auth``
    (4096 bytes) are SNP_LAUNCH_FINISH's ID block and its signature, ``author_key_enabled`` when ``id_auth``
    carries an author key. Private memory lives in guest_memfd, so any memory backend holds the shared part:
    plain RAM, a memfd, or hugetlbfs.
    """

    id: str = "sev0"
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    policy: int = 0x30000
    kernel_hashes: bool = True
    host_data: bytes | None = None
    id_block: bytes | None = None
    id_auth: bytes | None = None
    author_key_enabled: bool = False
    qemu_type: ClassVar[str] = "sev-snp-guest"
    min_qemu: ClassVar[str] = "9.1"
    host_flag: ClassVar[str] = "/sys/module/kvm_amd/parameters/sev_snp"
    unavailable: ClassVar[type[SpecError]] = SevSnpUnavailable

    def host_supports(self, host: HostInfo) -> bool:
        return host.tee.sev_snp

    def validate(self, host: HostInfo, accel: Accel | None = None) -> None:
        super().validate(host, accel)
        for name, blob, size in (("host_data", self.host_data, 32), ("id_block", self.id_block, 96),
                                 ("id_auth", self.id_auth, 4096)):  # fmt: skip
            if blob is not None and len(blob) != size:
                raise OptionInvalid(
                    f"{self.id}: {name} is {len(blob)} bytes, SEV-SNP takes exactly {size}",
                    hint=f"pass {size} bytes" + (", e.g. hashlib.sha256(...).digest()" if size == 32 else ""),
                    id=self.id,
                )
        if (self.id_auth is not None or self.author_key_enabled) and self.id_block is None:
            raise OptionInvalid(
                f"{self.id}: id_auth and author_key_enabled sign an ID block, and id_block is not set",
                hint="pass id_block= the 96-byte ID block that id_auth signs",
                id=self.id,
            )
        if self.id_block is not None and self.id_auth is None:
            raise OptionInvalid(
                f"{self.id}: an ID block needs its ID authentication structure",
                hint="pass id_auth= the 4096-byte structure with the ID key's signature of id_block",
                id=self.id,
            )
        if host.tee.cbitpos is not None and self.cbitpos != host.tee.cbitpos:
            raise OptionInvalid(
                f"{self.id}: cbitpos={self.cbitpos} but this host's CPU reports {host.tee.cbitpos}",
                hint=f"set cbitpos={host.tee.cbitpos} (CPUID 0x8000001F EBX[5:0]); QEMU refuses any other",
                id=self.id,
            )
        if not 1 <= self.reduced_phys_bits <= 63:
            raise OptionInvalid(
                f"{self.id}: reduced_phys_bits={self.reduced_phys_bits} is outside 1..63",
                hint="QEMU takes 1..63 (CPUID 0x8000001F EBX[11:6]); 1 is the usual value",
                id=self.id,
            )

    def options(self) -> list[str]:
        opts = [
            f"cbitpos={self.cbitpos}",
            f"reduced-phys-bits={self.reduced_phys_bits}",
            f"policy={self.policy:#x}",
            f"kernel-hashes={onoff(self.kernel_hashes)}",
        ]
        for name, blob in (
            ("host-data", self.host_data),
            ("id-block", self.id_block),
            ("id-auth", self.id_auth),
        ):
            if blob is not None:
                opts.append(f"{name}={base64.b64encode(blob).decode()}")
        if self.author_key_enabled:
            opts.append("author-key-enabled=on")
        return opts


# TD attributes (Intel TDX module ABI, TDCS.ATTRIBUTES); QEMU >= 10.1 takes the raw 64 bits.
TD_DEBUG = 1 << 0
TD_SEPT_VE_DISABLE = 1 << 28
TD_PKS = 1 << 30
TD_PERFMON = 1 << 63
QuoteSocket = tuple[int, int] | Path


@dataclass(frozen=True)
class TdxGuest(ConfidentialGuest):
    """An Intel TDX guest (QEMU >= 10.1, docs/system/i386/tdx.rst).

    ``attributes`` are the raw TD attributes (``TD_DEBUG | TD_PKS | ...``; when None, only ``sept_ve_disable``
    is set); ``mrconfigid``, ``mrowner`` and ``mrownerconfig`` are 48-byte SHA-384 values the quote carries;
    ``quote_generation_socket`` reaches the QGS over vsock ``(cid, port)`` or a Unix socket path.
    """

    id: str = "tdx0"
    quote_generation_socket: QuoteSocket | None = None
    sept_ve_disable: bool = True
    attributes: int | None = None
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    qemu_type: ClassVar[str] = "tdx-guest"
    min_qemu: ClassVar[str] = "10.1"
    host_flag: ClassVar[str] = "/sys/module/kvm_intel/parameters/tdx"
    unavailable: ClassVar[type[SpecError]] = TdxUnavailable

    @property
    def td_attributes(self) -> int:
        """The TD attributes the guest launches with."""
        if self.attributes is not None:
            return self.attributes
        return TD_SEPT_VE_DISABLE if self.sept_ve_disable else 0

    def host_supports(self, host: HostInfo) -> bool:
        return host.tee.tdx

    def machine_options(self) -> list[str]:
        return ["kernel-irqchip=split", "hpet=off"]

    def validate(self, host: HostInfo, accel: Accel | None = None) -> None:
        super().validate(host, accel)
        socket = self.quote_generation_socket
        if isinstance(socket, tuple):
            cid, port = socket
            if not (0 < cid < 2**32 - 1 and 0 <= port < 2**32):
                raise OptionInvalid(
                    f"{self.id}: quote_generation_socket {cid, port} is not a vsock address",
                    hint="use (2, 4050): the host's CID and the QGS port, or the QGS's Unix socket path",
                    id=self.id,
                )
        elif socket is not None and not (isinstance(socket, Path) and socket.is_absolute()):
            raise OptionInvalid(
                f"{self.id}: quote_generation_socket {socket!r} is neither (cid, port) nor an absolute path",
                hint="use (2, 4050) or Path('/var/run/tdx-qgs/qgs.socket')",
                id=self.id,
            )
        if self.attributes is not None:
            if not 0 <= self.attributes < 2**64:
                raise OptionInvalid(
                    f"{self.id}: attributes {self.attributes:#x} do not fit in 64 bits",
                    hint="combine TD_DEBUG, TD_SEPT_VE_DISABLE, TD_PKS, TD_PERFMON",
                    id=self.id,
                )
            if bool(self.attributes & TD_SEPT_VE_DISABLE) != self.sept_ve_disable:
                raise OptionInvalid(
                    f"{self.id}: attributes {self.attributes:#x} and sept_ve_disable={self.sept_ve_disable} "
                    "disagree on bit 28",
                    hint="make sept_ve_disable match bit 28 of attributes (QEMU would apply only one)",
                    id=self.id,
                )
        for name in ("mrconfigid", "mrowner", "mrownerconfig"):
            value = getattr(self, name)
            if value is not None and len(value) != 48:
                raise OptionInvalid(
                    f"{self.id}: {name} is {len(value)} bytes, TDX takes a 48-byte SHA-384 value",
                    hint="pass hashlib.sha384(...).digest()",
                    id=self.id,
                )

    def options(self) -> list[str]:
        opts = [] if self.sept_ve_disable else ["sept-ve-disable=off"]
        if self.attributes is not None:
            opts = [f"attributes={self.attributes:#x}"]
        for name in ("mrconfigid", "mrowner", "mrownerconfig"):
            value = getattr(self, name)
            if value is not None:
                opts.append(f"{name}={base64.b64encode(value).decode()}")
        return opts

    def args(self) -> list[str]:
        socket = self.quote_generation_socket
        if socket is None:
            return super().args()
        obj: dict[str, object] = {"qom-type": self.qemu_type, "id": self.id}
        if isinstance(socket, tuple):
            obj["quote-generation-socket"] = {"type": "vsock", "cid": str(socket[0]), "port": str(socket[1])}
        else:
            obj["quote-generation-socket"] = {"type": "unix", "path": str(socket)}
        if self.attributes is not None:
            obj["attributes"] = self.attributes
        elif not self.sept_ve_disable:
            obj["sept-ve-disable"] = False
        for name in ("mrconfigid", "mrowner", "mrownerconfig"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = base64.b64encode(value).decode()
        return ["-object", json.dumps(obj, separators=(",", ":"))]
