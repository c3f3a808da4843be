"""Coded errors of the TEE layer (E950-E999): measurements, backends and the emulated security processor."""

from __future__ import annotations

from harness.errors import LabError


class TeeError(LabError):
    code = "E950"
    title = "TEE error"
    explanation = "Something went wrong while measuring, configuring or emulating a confidential guest."


class MeasureInputMissing(TeeError):
    code = "E951"
    title = "launch input file missing"
    explanation = (
        "A launch input that a measurement covers (firmware, kernel, initrd) does not exist or cannot be "
        "read, so no expected measurement can be computed. Nothing was measured."
    )
    exit_status = 2


class MeasureInputInvalid(TeeError):
    code = "E952"
    title = "bad launch input"
    explanation = (
        "A launch input has a value no measurement can cover: a vCPU count outside 1..255, a negative or "
        "oversized policy, an unknown TEE kind, a vCPU type sev-snp-measure does not know, or neither a "
        "kernel nor a firmware."
    )
    exit_status = 2


class FirmwareCannotMeasureKernel(TeeError):
    code = "E953"
    title = "firmware cannot measure the kernel"
    explanation = (
        "A real SEV-SNP guest booted with -kernel needs an OVMF whose SEV metadata has an SNP_KERNEL_HASHES "
        "section (the AmdSev build); with any other firmware the kernel, initrd and command line would not "
        "be in the launch measurement, so teelab refuses to launch it."
    )
    exit_status = 2


class TeeUnavailable(TeeError):
    code = "E954"
    title = "TEE backend not available on this host"
    explanation = (
        "A real SEV-SNP or TDX backend was asked for on a host whose kernel, firmware or QEMU lacks it. "
        "Use the emulated backend (mode='emulated' or 'auto'), or run on a capable host."
    )
    exit_status = 2


class TeeLaunchMismatch(TeeError):
    code = "E955"
    title = "confidential guest not launched as asked"
    explanation = (
        "After launch, QEMU's QMP view of the guest (query-sev, the tdx-guest object) does not match the "
        "backend's request: the guest is not the confidential VM the measurement was computed for."
    )


class DeviceServiceError(TeeError):
    code = "E956"
    title = "emulated security processor failed"
    explanation = (
        "The host-side service of the emulated security-processor port could not start, or stopped serving. "
        "The VM that uses it cannot obtain evidence."
    )


class DeviceConfigError(TeeError):
    code = "E957"
    title = "bad emulated device configuration"
    explanation = (
        "An emulated security processor was given a value its evidence cannot carry: host_data that is not "
        "32 bytes, a measurement of the wrong kind or length, an NSM device without a security module."
    )
    exit_status = 2


class EnclaveDescriptionInvalid(TeeError):
    code = "E958"
    title = "bad SGX enclave description"
    explanation = (
        "An SGX enclave description (the pages MRENCLAVE is computed from) is not usable: the enclave size "
        "is not a power of two of at least two pages, a region is not page-aligned, lies outside the enclave "
        "or overlaps another, a permission or page type is unknown, or a content file cannot be read."
    )
    exit_status = 2


class VtpmError(TeeError):
    code = "E960"
    title = "vTPM failed"
    explanation = (
        "The VM's vTPM (swtpm) could not be manufactured (swtpm_setup with the lab TPM manufacturer CA), did "
        "not start, or its state folder is in use by another swtpm. Its log is named in the error; nothing "
        "of it was left running."
    )


class VtpmUnavailable(VtpmError):
    code = "E961"
    title = "swtpm not installed"
    explanation = "A vTPM was asked for but swtpm or swtpm_setup is not on PATH (Debian: swtpm swtpm-tools)."
    exit_status = 2


class VtpmAttestationFailed(VtpmError):
    code = "E962"
    title = "vTPM attestation key not certified"
    explanation = (
        "The lab AK CA refused to certify the guest's attestation key: the EK certificate does not chain to "
        "the lab TPM manufacturer CA, the AK is not a restricted signing key, or the guest's TPM did not "
        "recover the credential made for its EK and AK (credential activation), or its answer was unreadable."
    )


class VtpmOptionInvalid(VtpmError):
    code = "E963"
    title = "bad vTPM option"
    explanation = "A vTPM is either ephemeral (its state goes with the VM) or persistent (kept per VM name)."
    exit_status = 2
