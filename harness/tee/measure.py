"""Expected launch measurements of a guest from its launch inputs: the SEV-SNP launch digest and the TDX
MRTD and RTMR0-3 (with the event list that replays them). docs/tee.md defines the lab derivations."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.tee.errors import MeasureInputInvalid, MeasureInputMissing

TeeKind = Literal["snp", "tdx"]

SNP_DEFAULT_POLICY = 0x30000
TDX_DEFAULT_ATTRIBUTES = 0x10000000  # SEPT_VE_DISABLE
DEFAULT_VCPU_TYPE = "EPYC-v4"
DEFAULT_GUEST_FEATURES = 0x1  # SEV_FEATURES: SNPActive
MAX_VCPUS = 255
RTMR_COUNT = 4
DIGEST_BYTES = 48

METHOD_SEV_SNP_MEASURE = "sev-snp-measure"
METHOD_LAB = "lab-v1"

SNP_LAB_DOMAIN = b"teelab/snp-launch-digest/v1"
TDX_MRTD_DOMAIN = b"teelab/tdx-mrtd/v1"
TDX_CONFIG_DOMAIN = b"teelab/tdx-td-config/v1"


@dataclass(frozen=True)
class LaunchInputs:
    """What a guest is launched from. ``policy`` is the SNP guest policy, or for TDX the TD attributes;
    None takes the kind's default. ``vcpu_type`` and ``guest_features`` only enter SNP measurements."""

    kernel: Path | None
    initrd: Path | None = None
    cmdline: str = ""
    vcpus: int = 1
    vcpu_type: str = DEFAULT_VCPU_TYPE
    firmware: Path | None = None
    policy: int | None = None
    guest_features: int = DEFAULT_GUEST_FEATURES

    def policy_for(self, kind: TeeKind) -> int:
        if self.policy is not None:
            return self.policy
        return SNP_DEFAULT_POLICY if kind == "snp" else TDX_DEFAULT_ATTRIBUTES

    def files(self) -> dict[str, Path]:
        named = {"firmware": self.firmware, "kernel": self.kernel, "initrd": self.initrd}
        return {name: Path(path) for name, path in named.items() if path is not None}


@dataclass(frozen=True)
class SnpMeasurement:
    """The expected SEV-SNP launch digest (the report's MEASUREMENT field) and how it was computed."""

    measurement: bytes
    method: str
    policy: int
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> the digest or value measured
    kind: Literal["snp"] = "snp"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "method": self.method,
            "measurement": self.measurement.hex(),
            "policy": f"{self.policy:#x}",
            "inputs": dict(self.inputs),
        }


@dataclass(frozen=True)
class MeasuredEvent:
    """One extend of an RTMR: ``rtmr = SHA384(rtmr || digest)``; ``digest`` is SHA-384 of the event data."""

    rtmr: int
    name: str
    digest: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"rtmr": self.rtmr, "name": self.name, "digest": self.digest.hex()}


@dataclass(frozen=True)
class TdxMeasurement:
    """The expected TDX MRTD and RTMR0-3, with the event list a verifier can replay."""

    mrtd: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    events: tuple[MeasuredEvent, ...]
    td_attributes: int
    method: str = METHOD_LAB
    kind: Literal["tdx"] = "tdx"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "method": self.method, "mrtd": self.mrtd.hex()}
        data.update({f"rtmr{i}": value.hex() for i, value in enumerate(self.rtmrs)})
        data["td_attributes"] = f"{self.td_attributes:#x}"
        data["events"] = [event.to_dict() for event in self.events]
        return data


Measurement = SnpMeasurement | TdxMeasurement


def measure(kind: TeeKind, inputs: LaunchInputs) -> Measurement:
    """The expected measurement of ``inputs`` for ``kind``; raises E951/E952 on bad input."""
    if kind == "snp":
        return measure_snp(inputs)
    if kind == "tdx":
        return measure_tdx(inputs)
    raise MeasureInputInvalid(f"unknown TEE kind {kind!r}", hint="use kind 'snp' or 'tdx'", kind=kind)


# -- SEV-SNP ------------------------------------------------------------------------------------------


def measure_snp(inputs: LaunchInputs) -> SnpMeasurement:
    """sev-snp-measure when the firmware is an SNP OVMF able to measure this boot, else the lab digest."""
    _check(inputs, "snp")
    policy = inputs.policy_for("snp")
    view = _snp_input_view(inputs)
    firmware, has_kernel = inputs.firmware, inputs.kernel is not None
    if firmware is not None and snp_firmware_measures(firmware, kernel=has_kernel):
        return SnpMeasurement(_sev_snp_measure(inputs), METHOD_SEV_SNP_MEASURE, policy, view)
    return SnpMeasurement(snp_lab_digest(inputs), METHOD_LAB, policy, view)


def snp_firmware_measures(firmware: Path, *, kernel: bool) -> bool:
    """Whether ``firmware`` is an OVMF with SEV-SNP metadata (and, when ``kernel``, an SNP_KERNEL_HASHES
    section, so that -kernel/-initrd/-append enter the launch digest)."""
    from sevsnpmeasure.ovmf import OVMF, SectionType

    try:
        ovmf = OVMF(str(firmware))
        ovmf.sev_es_reset_eip()
    except (RuntimeError, ValueError, KeyError, OSError):
        return False
    if not ovmf.metadata_items():
        return False
    return not kernel or ovmf.has_metadata_section(SectionType.SNP_KERNEL_HASHES)


def snp_vcpu_signature(vcpu_type: str) -> int:
    """The CPUID signature sev-snp-measure puts in the VMSA for QEMU's ``-cpu vcpu_type``."""
    from sevsnpmeasure.vcpu_types import CPU_SIGS

    if vcpu_type not in CPU_SIGS:
        raise MeasureInputInvalid(
            f"sev-snp-measure does not know the vCPU type {vcpu_type!r}",
            hint=f"use one of: {', '.join(sorted(CPU_SIGS))}",
            vcpu_type=vcpu_type,
        )
    return int(CPU_SIGS[vcpu_type])


def _sev_snp_measure(inputs: LaunchInputs) -> bytes:
    from sevsnpmeasure.guest import calc_launch_digest
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType

    assert inputs.firmware is not None
    return bytes(
        calc_launch_digest(
            SevMode.SEV_SNP,
            inputs.vcpus,
            snp_vcpu_signature(inputs.vcpu_type),
            str(inputs.firmware),
            str(inputs.kernel) if inputs.kernel is not None else None,  # type: ignore[arg-type]
            str(inputs.initrd) if inputs.initrd is not None else None,  # type: ignore[arg-type]
            inputs.cmdline,
            inputs.guest_features,
            vmm_type=VMMType.QEMU,
        )
    )


def snp_lab_digest(inputs: LaunchInputs) -> bytes:
    """The lab launch digest: SHA-384 over the domain and each input, length-prefixed, in a fixed order."""
    return tagged_sha384(SNP_LAB_DOMAIN, _snp_lab_fields(inputs))


def _snp_lab_fields(inputs: LaunchInputs) -> list[tuple[str, bytes]]:
    return [
        ("firmware", file_digest(inputs.firmware, "sha384") if inputs.firmware else b""),
        ("kernel", file_digest(inputs.kernel, "sha256") if inputs.kernel else b""),
        ("initrd", file_digest(inputs.initrd, "sha256") if inputs.initrd else b""),
        ("cmdline", cmdline_sha256(inputs.cmdline)),
        ("vcpus", struct.pack(">I", inputs.vcpus)),
        ("vcpu_type", inputs.vcpu_type.encode()),
        ("guest_features", struct.pack(">Q", inputs.guest_features)),
        ("policy", struct.pack(">Q", inputs.policy_for("snp"))),
    ]


def _snp_input_view(inputs: LaunchInputs) -> dict[str, str]:
    view = {name: value.hex() or "absent" for name, value in _snp_lab_fields(inputs)[:4]}
    view.update(
        vcpus=str(inputs.vcpus),
        vcpu_type=inputs.vcpu_type,
        guest_features=f"{inputs.guest_features:#x}",
        policy=f"{inputs.policy_for('snp'):#x}",
    )
    return view


def cmdline_sha256(cmdline: str) -> bytes:
    """SHA-256 of the command line with its NUL terminator, as QEMU's SEV hashes table has it."""
    return hashlib.sha256(cmdline.encode() + b"\0").digest()


# -- TDX ----------------------------------------------------------------------------------------------


def measure_tdx(inputs: LaunchInputs) -> TdxMeasurement:
    """The lab MRTD (over the firmware, or the kernel when booted without one) and RTMR0-3 from events."""
    _check(inputs, "tdx")
    attributes = inputs.policy_for("tdx")
    events = tdx_events(inputs)
    return TdxMeasurement(tdx_lab_mrtd(inputs), replay_rtmrs(events), tuple(events), attributes)


def tdx_lab_mrtd(inputs: LaunchInputs) -> bytes:
    image, source = (inputs.firmware, b"firmware") if inputs.firmware else (inputs.kernel, b"kernel")
    assert image is not None
    return tagged_sha384(TDX_MRTD_DOMAIN, [("source", source), ("image", file_digest(image, "sha384"))])


def tdx_events(inputs: LaunchInputs) -> list[MeasuredEvent]:
    """The boot's measured events: TD configuration into RTMR0; kernel then initrd into RTMR1; the
    command line into RTMR2. RTMR3 is left to the guest at run time."""
    config = tagged_sha384(
        TDX_CONFIG_DOMAIN,
        [
            ("vcpus", struct.pack(">I", inputs.vcpus)),
            ("td_attributes", struct.pack(">Q", inputs.policy_for("tdx"))),
            ("firmware", file_digest(inputs.firmware, "sha384") if inputs.firmware else b""),
        ],
    )
    events = [MeasuredEvent(0, "td-config", hashlib.sha384(config).digest())]
    if inputs.kernel is not None:
        events.append(MeasuredEvent(1, "kernel", file_digest(inputs.kernel, "sha384")))
    if inputs.initrd is not None:
        events.append(MeasuredEvent(1, "initrd", file_digest(inputs.initrd, "sha384")))
    events.append(MeasuredEvent(2, "cmdline", hashlib.sha384(inputs.cmdline.encode() + b"\0").digest()))
    return events


def replay_rtmrs(events: Iterable[MeasuredEvent]) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR0-3 after extending each event in order, from 48 zero bytes."""
    rtmrs = [bytes(DIGEST_BYTES)] * RTMR_COUNT
    for event in events:
        if not 0 <= event.rtmr < RTMR_COUNT or len(event.digest) != DIGEST_BYTES:
            raise MeasureInputInvalid(
                f"event {event.name!r} extends RTMR{event.rtmr} with {len(event.digest)} bytes",
                hint="events extend RTMR0-3 with 48-byte SHA-384 digests",
            )
        rtmrs[event.rtmr] = hashlib.sha384(rtmrs[event.rtmr] + event.digest).digest()
    return (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3])


# -- shared -------------------------------------------------------------------------------------------


def tagged_sha384(domain: bytes, fields: Sequence[tuple[str, bytes]]) -> bytes:
    """SHA-384 of ``u32(len(domain)) domain`` then, per field, ``u16(len(name)) name u32(len(value)) value``
    (big-endian lengths): no two different field lists share an encoding."""
    digest = hashlib.sha384(struct.pack(">I", len(domain)) + domain)
    for name, value in fields:
        raw = name.encode()
        digest.update(struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(value)) + value)
    return digest.digest()


_digest_cache: dict[tuple[str, str, int, int, int, int], bytes] = {}
_digest_lock = threading.Lock()


def file_digest(path: Path, algorithm: str) -> bytes:
    """The digest of a file's content, cached by path, inode, size and mtime (kernels and initrds are big)."""
    try:
        stat = os.stat(path)
        key = (str(Path(path).resolve()), algorithm, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with _digest_lock:
            cached = _digest_cache.get(key)
        if cached is not None:
            return cached
        with open(path, "rb") as stream:
            value = hashlib.file_digest(stream, algorithm).digest()
    except OSError as exc:
        raise MeasureInputMissing(
            f"cannot read launch input {path}: {exc.strerror or exc}",
            hint="build or fetch the file first, or point the input at an existing file",
            path=str(path),
        ) from exc
    with _digest_lock:
        if len(_digest_cache) > 256:
            _digest_cache.clear()
        _digest_cache[key] = value
    return value


def _check(inputs: LaunchInputs, kind: TeeKind) -> None:
    if inputs.kernel is None and inputs.firmware is None:
        raise MeasureInputInvalid(
            "a launch needs a kernel or a firmware to measure",
            hint="give --kernel (and --initrd) or --firmware",
        )
    if inputs.kernel is None and (inputs.initrd is not None or inputs.cmdline):
        raise MeasureInputInvalid(
            "an initrd or command line without a kernel is not a launch input",
            hint="give --kernel with --initrd and --cmdline",
        )
    if not 1 <= inputs.vcpus <= MAX_VCPUS:
        raise MeasureInputInvalid(
            f"vcpus={inputs.vcpus}", hint=f"use 1 to {MAX_VCPUS} vCPUs", vcpus=inputs.vcpus
        )
    policy = inputs.policy_for(kind)
    if not 0 <= policy < 2**64 or not 0 <= inputs.guest_features < 2**64:
        raise MeasureInputInvalid(
            f"policy {policy:#x} / guest_features {inputs.guest_features:#x} do not fit 64 bits",
            hint="give a 64-bit value such as 0x30000",
        )
    if kind == "snp" and not inputs.vcpu_type:
        raise MeasureInputInvalid("empty vCPU type", hint=f"use e.g. --vcpu-type {DEFAULT_VCPU_TYPE}")
    for name, path in inputs.files().items():
        if not path.is_file():
            raise MeasureInputMissing(
                f"{name} {path} does not exist",
                hint=f"build or fetch the {name} first, or point --{name} at an existing file",
                path=str(path),
            )
