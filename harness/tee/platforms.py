"""TEE platforms: what each kind of confidential guest adds to a ``VMSpec``, real (SEV-SNP, TDX objects) or
emulated (a virtio-serial port served by the harness's security processor), and the check after launch."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from teelab_guest.tee_wire import TEE_PORT

from harness.aio import EventLoopThread
from harness.host import capability
from harness.host.model import HostInfo
from harness.qemu.chardevs import ChardevChannel
from harness.qemu.devices import VirtioSerialPort
from harness.qemu.objects import (
    TD_SEPT_VE_DISABLE,
    MemoryBackendMemfd,
    MemoryBackendRam,
    QuoteSocket,
    SevSnpGuest,
    TdxGuest,
)
from harness.qemu.spec import VMSpec
from harness.tee.errors import (
    DeviceConfigError,
    FirmwareCannotMeasureKernel,
    MeasureInputInvalid,
    TeeLaunchMismatch,
    TeeUnavailable,
)
from harness.tee.measure import (
    DEFAULT_GUEST_FEATURES,
    DEFAULT_VCPU_TYPE,
    SNP_DEFAULT_POLICY,
    TDX_DEFAULT_ATTRIBUTES,
    LaunchInputs,
    Measurement,
    SnpMeasurement,
    TdxMeasurement,
    measure_snp,
    measure_tdx,
    snp_firmware_measures,
)
from harness.tee.processor import DeviceService, NsmHandler, SecurityProcessor
from harness.tee.tdvf import tdvf_mrtd

Mode = Literal["auto", "real", "emulated"]
Kind = Literal["snp", "tdx", "nsm", "sgx"]
KINDS: tuple[Kind, ...] = ("snp", "tdx", "nsm", "sgx")
TEE_PORT_ID = "tee0"
TEE_CHANNEL = "tee"


class Launched(Protocol):
    """What ``after_launch`` needs of a machine (``harness.qemu.machine.Machine`` has it)."""

    @property
    def loop(self) -> EventLoopThread: ...

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any: ...

    def channel(self, chardev_id: str) -> socket.socket: ...


def launch_inputs(spec: VMSpec, *, vcpu_type: str, policy: int, guest_features: int) -> LaunchInputs:
    """The launch inputs of ``spec`` as a measurement sees them."""
    return LaunchInputs(
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        vcpus=spec.vcpus,
        vcpu_type=vcpu_type,
        firmware=spec.firmware,
        policy=policy,
        guest_features=guest_features,
    )


def lab_authority() -> Any:
    """The persistent lab CA the verifier trusts by default (under the state dir; created on first use)."""
    from harness.attest import default_lab_dir
    from harness.attest.authority import LabAuthority

    return LabAuthority.load_or_create(default_lab_dir())


@dataclass
class TeeAttachment:
    """A spec made confidential: launch ``spec``, then call ``after_launch(machine)`` (it serves an emulated
    device's port, or checks a real guest over QMP), and ``close()`` when the VM is gone.

    ``measurement`` is what the guest's evidence must carry (None where teelab cannot predict it).
    """

    backend: TeeBackend
    spec: VMSpec
    measurement: Measurement | None
    service: DeviceService | None = None

    def after_launch(self, machine: Launched, timeout: float = 10.0) -> dict[str, Any]:
        """Serve the emulated port, or raise TeeLaunchMismatch unless the launched VM is the confidential
        guest asked for; returns what was checked."""
        return self.backend.after_launch(self, machine, timeout)

    def close(self) -> None:
        if self.service is not None:
            self.service.close()

    def __enter__(self) -> TeeAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TeeBackend(ABC):
    kind: ClassVar[Kind]
    emulated: ClassVar[bool]

    @abstractmethod
    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        """``spec`` with this TEE's parts (not validated: ``attach`` validates)."""

    def expected(self, spec: VMSpec) -> Measurement | None:
        """The measurement the evidence of the configured ``spec`` will carry."""
        return None

    def attach(self, spec: VMSpec, host: HostInfo) -> TeeAttachment:
        """Configure ``spec`` (validated against ``host``) and start what it needs; nothing is left running
        when this raises."""
        configured = self.configure(spec, host)
        configured.validate(host)
        return TeeAttachment(self, configured, self.expected(configured))

    @abstractmethod
    def after_launch(self, attachment: TeeAttachment, machine: Launched, timeout: float) -> dict[str, Any]:
        """Start serving (emulated) or check QMP (real); TeeLaunchMismatch if the guest is not as asked."""


# -- real hardware --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnpBackend(TeeBackend):
    """A real SEV-SNP guest: ``sev-snp-guest``, AmdSev OVMF (kernel hashes), ``-cpu EPYC-v4``. The spec's
    memory backend is kept (hugetlbfs included: guest_memfd holds the private memory), a shared memfd when it
    has none; ``id_block``/``id_auth``/``author_key_enabled`` go to SNP_LAUNCH_FINISH."""

    policy: int = SNP_DEFAULT_POLICY
    host_data: bytes | None = None
    firmware: Path | None = None
    vcpu_type: str = DEFAULT_VCPU_TYPE
    guest_features: int = DEFAULT_GUEST_FEATURES
    id_block: bytes | None = None
    id_auth: bytes | None = None
    author_key_enabled: bool = False
    memory_id: str = "ram1"
    kind: ClassVar[Kind] = "snp"
    emulated: ClassVar[bool] = False

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        firmware = self.firmware or spec.firmware
        if firmware is None:
            raise FirmwareCannotMeasureKernel(
                f"{spec.name}: a real SEV-SNP guest boots through OVMF and no firmware is set",
                hint="pass firmware= an AmdSev OVMF.fd (edk2 OvmfPkg/AmdSev build)",
            )
        if not snp_firmware_measures(Path(firmware), kernel=True):
            raise FirmwareCannotMeasureKernel(
                f"{spec.name}: {firmware} has no SNP_KERNEL_HASHES section, so -kernel/-initrd/-append "
                "would not be measured",
                hint="use the AmdSev OVMF build (edk2 OvmfPkg/AmdSev/AmdSevX64.dsc)",
                firmware=str(firmware),
            )
        memory = spec.memory or MemoryBackendMemfd(self.memory_id, spec.memory_mib, share=True)
        guest = SevSnpGuest(
            cbitpos=host.tee.cbitpos or 51,
            reduced_phys_bits=host.tee.reduced_phys_bits or 1,
            policy=self.policy,
            kernel_hashes=True,
            host_data=self.host_data,
            id_block=self.id_block,
            id_auth=self.id_auth,
            author_key_enabled=self.author_key_enabled,
        )
        return replace(spec, memory=memory, confidential=guest, firmware=firmware, cpu_model=self.vcpu_type)

    def expected(self, spec: VMSpec) -> SnpMeasurement:
        inputs = launch_inputs(
            spec, vcpu_type=self.vcpu_type, policy=self.policy, guest_features=self.guest_features
        )
        return measure_snp(inputs)

    def after_launch(self, attachment: TeeAttachment, machine: Launched, timeout: float) -> dict[str, Any]:
        info = machine.qmp("query-sev", timeout=timeout)
        wanted = {"enabled": True, "sev-type": "sev-snp", "snp-policy": self.policy}
        wrong = {key: info.get(key) for key, value in wanted.items() if info.get(key) != value}
        if wrong:
            raise TeeLaunchMismatch(
                f"{attachment.spec.name}: query-sev says {wrong}, expected {wanted}",
                hint="check the host's SNP firmware and QEMU's stderr in the artifact folder",
                received=info,
            )
        return dict(info)


@dataclass(frozen=True)
class TdxBackend(TeeBackend):
    """A real TDX guest: ``tdx-guest`` (raw TD attributes, MRCONFIGID/MROWNER/MROWNERCONFIG, quote generation
    over vsock ``(cid, port)`` or a Unix socket path to the QGS) + a TDX OVMF (TDVF).

    ``expected`` is None: RTMR0-2 come from TDVF's event log, which teelab does not model; ``expected_mrtd``
    gives the MRTD (from the TDVF's metadata, as the TDX module measures it).
    """

    attributes: int = TDX_DEFAULT_ATTRIBUTES
    firmware: Path | None = None
    quote_generation_socket: QuoteSocket | None = (2, 4050)
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    memory_id: str = "mem0"
    kind: ClassVar[Kind] = "tdx"
    emulated: ClassVar[bool] = False

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        firmware = self.firmware or spec.firmware
        if firmware is None:
            raise MeasureInputInvalid(
                f"{spec.name}: a real TDX guest boots through a TDX-enabled OVMF and no firmware is set",
                hint="pass firmware= an OVMF.fd built with TDX support",
            )
        memory = spec.memory or MemoryBackendRam(self.memory_id, spec.memory_mib)
        guest = TdxGuest(
            quote_generation_socket=self.quote_generation_socket,
            sept_ve_disable=bool(self.attributes & TD_SEPT_VE_DISABLE),
            # (attributes that sept-ve-disable alone expresses keep QEMU's key=value/JSON form minimal)
            attributes=None if self.attributes in (0, TD_SEPT_VE_DISABLE) else self.attributes,
            mrconfigid=self.mrconfigid,
            mrowner=self.mrowner,
            mrownerconfig=self.mrownerconfig,
        )
        return replace(spec, memory=memory, confidential=guest, firmware=firmware)

    def expected_mrtd(self, spec: VMSpec) -> bytes:
        """The MRTD a TD launched from this backend's (or the spec's) TDVF carries."""
        firmware = self.firmware or spec.firmware
        if firmware is None:
            raise MeasureInputInvalid(f"{spec.name}: no TDVF to measure", hint="pass firmware= the TDVF")
        return tdvf_mrtd(Path(firmware))

    def after_launch(self, attachment: TeeAttachment, machine: Launched, timeout: float) -> dict[str, Any]:
        guest = attachment.spec.confidential
        assert guest is not None
        objects = machine.qmp("qom-list", timeout=timeout, path="/objects")
        found = [o for o in objects if o.get("name") == guest.id]
        if not found or found[0].get("type") != "child<tdx-guest>":
            raise TeeLaunchMismatch(
                f"{attachment.spec.name}: /objects has no tdx-guest {guest.id}",
                hint="check QEMU's stderr in the artifact folder",
                received=objects,
            )
        return dict(found[0])


# -- emulated -------------------------------------------------------------------------------------------


class EmulatedBackend(TeeBackend):
    """A virtio-serial port ``org.teelab.tee.0`` on a ``ChardevChannel``, answered by a DeviceService."""

    emulated: ClassVar[bool] = True

    @abstractmethod
    def processor(self, spec: VMSpec, measurement: Measurement | None) -> SecurityProcessor:
        """The security processor for the configured ``spec``."""

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        device = VirtioSerialPort(TEE_PORT_ID, TEE_PORT, ChardevChannel(TEE_CHANNEL))
        return replace(spec, confidential=None, devices=(*spec.devices, device))

    def attach(self, spec: VMSpec, host: HostInfo) -> TeeAttachment:
        attachment = super().attach(spec, host)
        processor = self.processor(attachment.spec, attachment.measurement)
        attachment.service = DeviceService(processor, name=f"{spec.name}-tee")
        return attachment

    def after_launch(self, attachment: TeeAttachment, machine: Launched, timeout: float) -> dict[str, Any]:
        service = attachment.service
        assert service is not None
        if not service.serving:
            service.serve_socket(machine.channel(TEE_CHANNEL), machine.loop)
        return {"kind": self.kind, "emulated": True, "port": TEE_PORT}


@dataclass(frozen=True)
class EmulatedSnpBackend(EmulatedBackend):
    """SEV-SNP evidence from the lab VCEK, carrying this VM's launch measurement, policy and host_data.

    ``vcpu_type`` is a declared launch input, as the VMSA's CPUID signature is on real SNP: the measurement
    covers it while the emulator runs its own CPU model (TCG's ``max``; QEMU 7.2 has no EPYC-v4)."""

    policy: int = SNP_DEFAULT_POLICY
    host_data: bytes = bytes(32)
    vcpu_type: str = DEFAULT_VCPU_TYPE
    guest_features: int = DEFAULT_GUEST_FEATURES
    authority: Any = field(default=None, compare=False, repr=False)
    kind: ClassVar[Kind] = "snp"

    def configure(self, spec: VMSpec, host: HostInfo) -> VMSpec:
        if len(self.host_data) != 32:
            raise DeviceConfigError(
                f"{spec.name}: host_data is {len(self.host_data)} bytes, SEV-SNP carries exactly 32",
                hint="pass 32 bytes, e.g. hashlib.sha256(...).digest()",
            )
        return super().configure(spec, host)

    def expected(self, spec: VMSpec) -> SnpMeasurement:
        inputs = launch_inputs(
            spec, vcpu_type=self.vcpu_type, policy=self.policy, guest_features=self.guest_features
        )
        return measure_snp(inputs)

    def processor(self, spec: VMSpec, measurement: Measurement | None) -> SecurityProcessor:
        assert isinstance(measurement, SnpMeasurement)
        return SecurityProcessor(
            "snp", snp=lab_snp_issuer(self.authority or lab_authority(), measurement, self.host_data)
        )


@dataclass(frozen=True)
class EmulatedTdxBackend(EmulatedBackend):
    """TDX quotes from the lab PCK chain, carrying this VM's lab MRTD/RTMRs and TD attributes."""

    attributes: int = TDX_DEFAULT_ATTRIBUTES
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    authority: Any = field(default=None, compare=False, repr=False)
    kind: ClassVar[Kind] = "tdx"

    def expected(self, spec: VMSpec) -> TdxMeasurement:
        inputs = launch_inputs(
            spec, vcpu_type=DEFAULT_VCPU_TYPE, policy=self.attributes, guest_features=DEFAULT_GUEST_FEATURES
        )
        return measure_tdx(inputs)

    def processor(self, spec: VMSpec, measurement: Measurement | None) -> SecurityProcessor:
        assert isinstance(measurement, TdxMeasurement)
        owner = {name: getattr(self, name) for name in ("mrconfigid", "mrowner", "mrownerconfig")}
        issuer = lab_tdx_issuer(self.authority or lab_authority(), measurement, **owner)
        return SecurityProcessor("tdx", tdx=issuer)


@dataclass(frozen=True)
class EmulatedNsmBackend(EmulatedBackend):
    """An enclave's security module (``harness.enclave.nsm.SecurityModule``) behind the port."""

    module: NsmHandler | None = field(default=None, compare=False)
    kind: ClassVar[Kind] = "nsm"

    def processor(self, spec: VMSpec, measurement: Measurement | None) -> SecurityProcessor:
        return SecurityProcessor("nsm", nsm=self.module)


def lab_snp_issuer(authority: Any, measurement: SnpMeasurement, host_data: bytes) -> Any:
    """Signs SNP reports with the lab VCEK for one VM: its measurement, policy and host_data."""
    certs = authority.snp_cert_table()

    def issue(*, report_data: bytes, vmpl: int) -> tuple[bytes, bytes]:
        report = authority.snp_report(
            report_data,
            measurement=measurement.measurement,
            vmpl=vmpl,
            policy=measurement.policy,
            host_data=host_data,
        )
        return report, certs

    return issue


def lab_tdx_issuer(authority: Any, measurement: TdxMeasurement, **owner: bytes | None) -> Any:
    """Signs TDX quotes with the lab attestation key for one VM: its MRTD, RTMRs, TD attributes and the
    MRCONFIGID/MROWNER/MROWNERCONFIG given in ``owner`` (zero when None)."""
    values = {name: value for name, value in owner.items() if value is not None}

    def issue(*, report_data: bytes) -> bytes:
        return bytes(
            authority.tdx_quote(
                report_data,
                mrtd=measurement.mrtd,
                rtmrs=measurement.rtmrs,
                td_attributes=measurement.td_attributes,
                **values,
            )
        )

    return issue


# -- choice ---------------------------------------------------------------------------------------------


def real_tee_missing(kind: Kind, host: HostInfo) -> list[str]:
    """Why ``host`` cannot run a real ``kind`` guest (empty when it can)."""
    if kind == "nsm":
        return ["an enclave security module is always emulated"]
    return capability.missing(kind, host)


def choose_backend(kind: Kind, host: HostInfo, mode: Mode = "auto", **options: Any) -> TeeBackend:
    """The backend for ``kind`` on ``host``: real where the host can (``auto``) or must (``real``), else
    emulated. ``options`` go to the backend (policy, host_data, firmware, attributes, module, identity,
    epc...); options only the other backend takes are dropped (an emulated guest has no firmware or EPC)."""
    if kind not in KINDS or mode not in ("auto", "real", "emulated"):
        raise MeasureInputInvalid(
            f"no TEE backend for kind={kind!r} mode={mode!r}",
            hint="kind is snp, tdx, sgx or nsm; mode is auto, real or emulated",
        )
    missing = real_tee_missing(kind, host)
    if mode == "real" and missing:
        doctor = "" if kind == "nsm" else f", or run on a capable host (`teelab doctor --require {kind}`)"
        raise TeeUnavailable(
            f"a real {kind} guest cannot run here: " + "; ".join(missing),
            hint=f"use mode='emulated' (or 'auto'){doctor}",
            missing=missing,
        )
    try:
        return _backend(kind, mode != "emulated" and not missing, options)
    except TypeError as exc:
        raise MeasureInputInvalid(
            f"bad option for the {kind} backend: {exc}", hint="see the backend options in docs/tee.md"
        ) from None


def _backend(kind: Kind, real: bool, options: dict[str, Any]) -> TeeBackend:
    if kind == "snp":
        return SnpBackend(**options) if real else EmulatedSnpBackend(**_emulated_snp_options(options))
    if kind == "tdx":
        return TdxBackend(**options) if real else EmulatedTdxBackend(**_emulated_tdx_options(options))
    if kind == "sgx":
        from harness.tee.sgx import sgx_backend  # (harness.tee.sgx builds on this module)

        return sgx_backend(real, options)
    return EmulatedNsmBackend(**options)


def _emulated_snp_options(options: dict[str, Any]) -> dict[str, Any]:
    # (the emulated report carries no ID block: its family_id, image_id and id_key_digest stay zero)
    real_only = ("firmware", "memory_id", "id_block", "id_auth", "author_key_enabled")
    options = {k: v for k, v in options.items() if k not in real_only}
    if options.get("host_data") is None:
        options.pop("host_data", None)
    return options


def _emulated_tdx_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("firmware", "memory_id", "quote_generation_socket")}


def backend_for_spec(spec: VMSpec, host: HostInfo, mode: Mode = "auto", **options: Any) -> TeeBackend:
    """The backend for the confidential guest ``spec.confidential`` names (its policy, host_data, TDX
    attributes), or SGX for a spec with EPC sections, real or emulated by ``mode``: one spec runs on SNP, TDX
    or SGX hardware and on a TCG host alike."""
    guest = spec.confidential
    if isinstance(guest, SevSnpGuest):
        options.setdefault("policy", guest.policy)
        for name in ("host_data", "id_block", "id_auth"):
            if getattr(guest, name) is not None:
                options.setdefault(name, getattr(guest, name))
        if guest.author_key_enabled:
            options.setdefault("author_key_enabled", True)
        return choose_backend("snp", host, mode, **options)
    if isinstance(guest, TdxGuest):
        options.setdefault("attributes", guest.td_attributes)
        for name in ("quote_generation_socket", "mrconfigid", "mrowner", "mrownerconfig"):
            if getattr(guest, name) is not None:
                options.setdefault(name, getattr(guest, name))
        return choose_backend("tdx", host, mode, **options)
    if spec.epc:
        return choose_backend("sgx", host, mode, **options)
    raise MeasureInputInvalid(
        f"{spec.name} names no confidential guest",
        hint="set confidential=SevSnpGuest(...) or TdxGuest(...), or epc=(EpcSection(...),) for SGX",
    )
