"""SGX enclaves in the lab: MRENCLAVE from an enclave description (the ECREATE/EADD/EEXTEND sequence the CPU
hashes while the enclave is built), the identity a lab quote carries, and the emulated security processor that
quotes it for a guest process, as a DCAP quoting library would.

An enclave description is TOML::

    size = 0x200000        # the enclave's address range (SECS.SIZE): a power of two, at least 2 pages
    ssa_frame_size = 1     # pages per SSA frame (SECS.SSAFRAMESIZE)
    [[region]]
    offset = 0x1000        # page-aligned, inside size
    file = "text.bin"      # the content (relative to the description), or hex = "..."; zero-padded to pages
    pages = 4              # optional: the region's page count (default: the content's)
    permissions = "rx"     # r, w, x (a TCS page has none)
    type = "reg"           # "reg" or "tcs"
    measure = true         # EEXTEND the content; false: EADD only (heap pages loaders leave unmeasured)

MRENCLAVE (Intel SDM vol. 3D, "Enclave measurement"): SHA-256 over 64-byte blocks,
``"ECREATE\\0" || SSAFRAMESIZE u32 || SIZE u64 || 0^44``, then per page
``"EADD\\0\\0\\0\\0" || offset u64 || SECINFO.FLAGS u64 || 0^40`` and, for measured pages, per 256 bytes
``"EEXTEND\\0" || offset u64 || 0^48`` followed by the 256 bytes.
"""

from __future__ import annotations

import hashlib
import struct
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from harness.host.model import HostInfo
from harness.qemu.epc import EpcSection
from harness.qemu.spec import VMSpec
from harness.tee.errors import DeviceConfigError, EnclaveDescriptionInvalid, TeeLaunchMismatch
from harness.tee.measure import Measurement
from harness.tee.platforms import (
    EmulatedBackend,
    Kind,
    Launched,
    TeeAttachment,
    TeeBackend,
    lab_authority,
)
from harness.tee.processor import SecurityProcessor

PAGE = 4096
EEXTEND_CHUNK = 256
PERMISSION_BITS = {"r": 1 << 0, "w": 1 << 1, "x": 1 << 2}
PAGE_TYPES = {"tcs": 1, "reg": 2}  # SECINFO.FLAGS.PAGE_TYPE (bits 8-15): PT_TCS, PT_REG


@dataclass(frozen=True)
class EnclaveRegion:
    """Pages added at ``offset`` (content zero-padded to whole pages), their SECINFO, whether EEXTENDed."""

    offset: int
    content: bytes
    permissions: str = "r"
    page_type: str = "reg"
    measured: bool = True

    @property
    def secinfo_flags(self) -> int:
        return sum(PERMISSION_BITS[p] for p in set(self.permissions)) | PAGE_TYPES[self.page_type] << 8


@dataclass(frozen=True)
class EnclaveLayout:
    """What MRENCLAVE covers: the enclave's size, SSA frame size and its regions in the order added."""

    size: int
    ssa_frame_size: int
    regions: tuple[EnclaveRegion, ...]

    def __post_init__(self) -> None:
        if self.size < 2 * PAGE or self.size & (self.size - 1):
            _invalid(f"enclave size {self.size:#x} is not a power of two of at least two pages", "size")
        if not 1 <= self.ssa_frame_size <= 0xFFFFFFFF:
            _invalid(f"ssa_frame_size {self.ssa_frame_size} is not 1..2^32-1", "ssa_frame_size")
        taken: list[tuple[int, int]] = []
        for index, region in enumerate(self.regions):
            where = f"region[{index}]"
            if region.offset % PAGE or len(region.content) % PAGE or not region.content:
                _invalid(f"{where}: offset and length must be whole, non-empty pages", where)
            end = region.offset + len(region.content)
            if region.offset < 0 or end > self.size:
                _invalid(
                    f"{where}: {region.offset:#x}..{end:#x} is outside the enclave (size {self.size:#x})",
                    where,
                )
            if any(region.offset < stop and start < end for start, stop in taken):
                _invalid(f"{where}: {region.offset:#x}..{end:#x} overlaps an earlier region", where)
            if set(region.permissions) - set(PERMISSION_BITS) or region.page_type not in PAGE_TYPES:
                _invalid(f"{where}: permissions {region.permissions!r} / type {region.page_type!r}", where)
            if region.page_type == "tcs" and region.permissions:
                _invalid(f"{where}: a TCS page has no permissions", where)
            taken.append((region.offset, end))

    def mrenclave(self) -> bytes:
        digest = hashlib.sha256(b"ECREATE\0" + struct.pack("<IQ", self.ssa_frame_size, self.size) + bytes(44))
        for region in self.regions:
            for start in range(0, len(region.content), PAGE):
                offset = region.offset + start
                digest.update(b"EADD\0\0\0\0" + struct.pack("<QQ", offset, region.secinfo_flags) + bytes(40))
                if not region.measured:
                    continue
                for chunk in range(0, PAGE, EEXTEND_CHUNK):
                    digest.update(b"EEXTEND\0" + struct.pack("<Q", offset + chunk) + bytes(48))
                    digest.update(region.content[start + chunk : start + chunk + EEXTEND_CHUNK])
        return digest.digest()


def _invalid(message: str, field_name: str) -> NoReturn:
    raise EnclaveDescriptionInvalid(
        message, hint="see the enclave description format in docs/attestation.md", field=field_name
    )


def load_enclave_description(path: Path) -> EnclaveLayout:
    """Read an enclave description (TOML, the module docstring's format); E958 names what is wrong."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnclaveDescriptionInvalid(
            f"cannot read enclave description {path}: {exc}", hint="give a TOML file", path=str(path)
        ) from None
    unknown = set(data) - {"size", "ssa_frame_size", "region"}
    if unknown:
        _invalid(f"unknown keys {sorted(unknown)} (size, ssa_frame_size, region)", sorted(unknown)[0])
    regions = data.get("region", [])
    if not isinstance(regions, list) or not regions:
        _invalid("an enclave needs at least one [[region]]", "region")
    return EnclaveLayout(
        size=_int(data, "size", None),
        ssa_frame_size=_int(data, "ssa_frame_size", 1),
        regions=tuple(_region(item, index, Path(path).parent) for index, item in enumerate(regions)),
    )


def _int(data: Mapping[str, Any], key: str, default: int | None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        _invalid(f"{key} must be an integer, got {value!r}", key)
    return value


def _region(item: Any, index: int, base: Path) -> EnclaveRegion:
    where = f"region[{index}]"
    if not isinstance(item, dict):
        _invalid(f"{where} must be a table", where)
    unknown = set(item) - {"offset", "file", "hex", "pages", "permissions", "type", "measure"}
    if unknown or ("file" in item) == ("hex" in item):
        _invalid(f"{where}: one of file or hex, and no unknown keys ({sorted(unknown)})", where)
    try:
        content = (base / item["file"]).read_bytes() if "file" in item else bytes.fromhex(item["hex"])
    except (OSError, ValueError, TypeError) as exc:
        _invalid(f"{where}: cannot read its content ({exc})", where)
    pages = _int(item, "pages", -(-len(content) // PAGE) or 1)
    if pages * PAGE < len(content):
        _invalid(f"{where}: {len(content)} bytes of content do not fit in {pages} pages", where)
    permissions, page_type, measured = (
        item.get("permissions", "r"),
        item.get("type", "reg"),
        item.get("measure", True),
    )
    if not isinstance(permissions, str) or not isinstance(page_type, str) or not isinstance(measured, bool):
        _invalid(f"{where}: permissions and type are text, measure is true or false", where)
    return EnclaveRegion(
        _int(item, "offset", None), content.ljust(pages * PAGE, b"\0"), permissions, page_type, measured
    )


@dataclass(frozen=True)
class SgxIdentity:
    """The enclave a VM's emulated SGX quotes are for (MRSIGNER and the ISV values come from its SIGSTRUCT
    on real hardware; the lab takes them as given)."""

    mrenclave: bytes
    mrsigner: bytes = bytes(32)
    isv_prod_id: int = 0
    isv_svn: int = 0
    debug: bool = False

    def __post_init__(self) -> None:
        for name in ("mrenclave", "mrsigner"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise DeviceConfigError(f"SGX {name} must be 32 bytes", hint="a SHA-256 digest")
        for name in ("isv_prod_id", "isv_svn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise DeviceConfigError(f"SGX {name} must be 0..65535, got {value!r}", hint="a u16")

    def to_dict(self) -> dict[str, Any]:
        return {"mrenclave": self.mrenclave.hex(), "mrsigner": self.mrsigner.hex(),
                "isv_prod_id": self.isv_prod_id, "isv_svn": self.isv_svn, "debug": self.debug}  # fmt: skip


def lab_sgx_issuer(authority: Any, identity: SgxIdentity) -> Any:
    """Signs SGX quotes of ``identity``'s enclave with the lab attestation key over the caller's data."""

    def issue(*, report_data: bytes) -> bytes:
        return bytes(
            authority.sgx_quote(
                report_data,
                mrenclave=identity.mrenclave,
                mrsigner=identity.mrsigner,
                isv_prod_id=identity.isv_prod_id,
                isv_svn=identity.isv_svn,
                debug=identity.debug,
            )
        )

    return issue


@dataclass(frozen=True)
class EmulatedSgxBackend(EmulatedBackend):
    """SGX quotes from the lab PCK chain for the enclave ``identity``: a guest process asks the port for a
    quote over its report_data (``teelab_guest.evidence.get_evidence``) as an enclave asks a quoting
    library. The spec's EPC sections are dropped: an emulated guest runs no enclave (TCG has no SGX)."""

    identity: SgxIdentity = field(default_factory=lambda: SgxIdentity(bytes(32)))
    authority: Any = field(default=None, compare=False, repr=False)
    kind: ClassVar[Kind] = "sgx"

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        return replace(super().configure(spec, host), epc=())

    def expected(self, spec: VMSpec) -> Measurement | None:
        return None  # the enclave identity is an input (``identity``), not derived from the VM's launch

    def processor(self, spec: VMSpec, measurement: Measurement | None) -> SecurityProcessor:
        return SecurityProcessor("sgx", sgx=lab_sgx_issuer(self.authority or lab_authority(), self.identity))


@dataclass(frozen=True)
class SgxBackend(TeeBackend):
    """A real SGX-capable guest on an SGX host: EPC sections (``memory-backend-epc`` bound to the host node
    whose EPC each takes, ``sgx-epc.N`` on the machine) and the CPU's SGX features (``+sgx,+sgxlc,
    +sgx-provisionkey``) under KVM. The EPC is the spec's sections, else ``epc``, else one section of
    ``epc_mib`` MiB from the host node with the most EPC.

    The guest's enclaves are built and measured by the CPU and quoted by the guest's own DCAP stack (its
    quoting enclave, and a quote provider library fetching the PCK certificate from a PCCS): evidence
    verifies with the Intel SGX root, not the lab's, and no emulated port is attached. ``identity``, when
    given, is the enclave a verifier should expect (``verify_policy``); nothing in the launch sets it.
    """

    epc: tuple[EpcSection, ...] = ()
    epc_mib: int = 64
    identity: SgxIdentity | None = None
    kind: ClassVar[Kind] = "sgx"
    emulated: ClassVar[bool] = False

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        if spec.confidential is not None:
            raise DeviceConfigError(
                f"{spec.name}: an SGX guest is an ordinary KVM guest with EPC, not also a "
                f"{type(spec.confidential).__name__}",
                hint="drop confidential= from the spec (enclaves run inside the guest)",
            )
        return replace(spec, epc=spec.epc or self.epc or (self._default_section(host),))

    def _default_section(self, host: HostInfo) -> EpcSection:
        sections = sorted(host.tee.sgx_epc, key=lambda section: (-section.size_kib, section.node))
        return EpcSection("epc0", self.epc_mib, host_node=sections[0].node if sections else 0)

    def verify_policy(self, **pins: Any) -> Any:
        """A verifier policy for this guest's quotes: the Intel SGX root, ``identity``'s MRENCLAVE, MRSIGNER,
        ISVPRODID, ISVSVN (as the least accepted) and debug when given, and ``pins`` (report_data...)."""
        from harness.attest import Policy

        if self.identity is not None:
            identity = self.identity
            expected = {"mrenclave": identity.mrenclave, "mrsigner": identity.mrsigner,
                        "isv_prod_id": identity.isv_prod_id, "min_isv_svn": identity.isv_svn,
                        "allow_debug": identity.debug}  # fmt: skip
            pins = expected | pins
        return Policy(roots=("intel-sgx",), **pins)

    def after_launch(self, attachment: TeeAttachment, machine: Launched, timeout: float) -> dict[str, Any]:
        """QMP ``query-sgx`` must say SGX and FLC are on and list the spec's EPC sections (node, bytes)."""
        info = machine.qmp("query-sgx", timeout=timeout)
        wanted = sorted((section.guest_node, section.size_mib << 20) for section in attachment.spec.epc)
        found = sorted((s.get("node"), s.get("size")) for s in info.get("sections") or ())
        if not (info.get("sgx") and info.get("flc")) or found != wanted:
            raise TeeLaunchMismatch(
                f"{attachment.spec.name}: query-sgx says sgx={info.get('sgx')} flc={info.get('flc')} "
                f"sections={found}, expected SGX with FLC and sections {wanted} (node, bytes)",
                hint="check `teelab doctor --require sgx` and QEMU's stderr in the artifact folder",
                received=info,
            )
        return dict(info)


REAL_ONLY = ("epc", "epc_mib")
EMULATED_ONLY = ("authority",)


def sgx_backend(real: bool, options: dict[str, Any]) -> TeeBackend:
    """``SgxBackend`` (real) or ``EmulatedSgxBackend`` from ``choose_backend``'s options, each without the
    options only the other takes."""
    if real:
        return SgxBackend(**{k: v for k, v in options.items() if k not in EMULATED_ONLY})
    emulated = {k: v for k, v in options.items() if k not in REAL_ONLY}
    if "identity" in emulated and emulated["identity"] is None:
        del emulated["identity"]  # (the emulated quote then carries a zero MRENCLAVE)
    return EmulatedSgxBackend(**emulated)
