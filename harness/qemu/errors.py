"""Coded errors of the QEMU layer: VM specs (E3xx), raised by ``VMSpec.validate`` before any QEMU process
starts, and QEMU processes (E4xx), raised by ``Machine`` while it drives one."""

from __future__ import annotations

from harness.errors import LabError


class SpecError(LabError):
    code = "E300"
    title = "invalid VM spec"
    explanation = "A VMSpec asks for something QEMU or this host cannot give; nothing was started."
    exit_status = 2


class VcpuCountError(SpecError):
    code = "E301"
    title = "bad vCPU count"
    explanation = "vcpus must be 1..255 and max_vcpus, when set, at least vcpus and at most 255."


class MemorySizeError(SpecError):
    code = "E302"
    title = "bad memory size"
    explanation = (
        "Guest memory must be at least 64 MiB; a memory backend must be exactly memory_mib (the boot part); "
        "virtio-mem sizes must fit their backend and be multiples of the block size."
    )


class SpecFileMissing(SpecError):
    code = "E303"
    title = "kernel, initrd or firmware file missing"
    explanation = "A file the spec names (kernel, initrd, firmware) does not exist or is not a regular file."


class CmdlineError(SpecError):
    code = "E304"
    title = "bad kernel command line"
    explanation = "The kernel command line must be a single line of at most 2048 bytes."


class MachineTypeUnknown(SpecError):
    code = "E305"
    title = "unknown machine type"
    explanation = "The QEMU binary found by the host probe does not offer the requested -machine type."


class DuplicateId(SpecError):
    code = "E306"
    title = "duplicate id"
    explanation = "Two chardevs, two objects or two devices of one VM share an id; QEMU needs them unique."


class MissingRequirement(SpecError):
    code = "E307"
    title = "spec lacks something a device or guest needs"
    explanation = (
        "A device or confidential guest needs another part of the spec: a shared memory backend "
        "(vhost-user), a memfd backend and firmware (SEV-SNP), firmware (TDX)."
    )


class HugetlbfsNotMounted(SpecError):
    code = "E308"
    title = "no hugetlbfs mount for the page size"
    explanation = "A file memory backend wants hugepages but its mem_path is no hugetlbfs mount of that size."


class HugepagesShort(SpecError):
    code = "E309"
    title = "not enough free hugepages"
    explanation = "The memory backends need more free hugepages of a size (on a NUMA node) than the host has."


class AccelUnavailable(SpecError):
    code = "E310"
    title = "accelerator not available"
    explanation = "The spec asks for KVM but the host probe chose TCG; the probe's reason says why."


class QemuTypeMissing(SpecError):
    code = "E311"
    title = "QEMU lacks a device or object type"
    explanation = "The QEMU binary found by the host probe lacks a -device or -object type the spec uses."


class SevSnpUnavailable(SpecError):
    code = "E312"
    title = "SEV-SNP not available on this host"
    explanation = (
        "An SEV-SNP guest needs QEMU >= 9.1 (object type sev-snp-guest), a host kernel with "
        "/sys/module/kvm_amd/parameters/sev_snp = Y, and KVM."
    )


class TdxUnavailable(SpecError):
    code = "E313"
    title = "TDX not available on this host"
    explanation = (
        "A TDX guest needs QEMU >= 10.1 (object type tdx-guest), a host kernel with "
        "/sys/module/kvm_intel/parameters/tdx = Y, and KVM."
    )


class VhostVsockUnavailable(SpecError):
    code = "E314"
    title = "kernel vhost-vsock not available"
    explanation = "vhost-vsock-pci needs /dev/vhost-vsock on the host; without it use vhost-user vsock."


class SgxUnavailable(SpecError):
    code = "E319"
    title = "SGX EPC not available on this host"
    explanation = (
        "A guest with SGX EPC sections needs the CPU's SGX with flexible launch control, /dev/sgx_vepc, "
        "enough EPC on each node a section names (nodeN/x86/sgx_total_bytes), QEMU >= 7.0 "
        "(memory-backend-epc) and KVM; `teelab doctor --require sgx` lists what is missing."
    )


class OptionInvalid(SpecError):
    code = "E315"
    title = "bad option value"
    explanation = "An id, name, CID or other option of an object, chardev or device is invalid."


# -- QEMU processes (E4xx) ---------------------------------------------------------------------------------
class MachineError(LabError):
    code = "E400"
    title = "QEMU machine error"
    explanation = "Something went wrong while driving a QEMU process; the artifact folder has its logs."


class LaunchError(MachineError):
    code = "E401"
    title = "QEMU failed to start"
    explanation = (
        "QEMU exited or did not answer on QMP during launch. The error carries the command line and QEMU's "
        "stderr; run.sh in the artifact folder reproduces the launch by hand."
    )


class UnexpectedExit(MachineError):
    code = "E402"
    title = "QEMU exited unexpectedly"
    explanation = "The QEMU process ended while the harness was still using it (a guest crash, a kill, OOM)."


class ConsoleTimeout(MachineError):
    code = "E403"
    title = "console pattern not seen in time"
    explanation = "The guest did not print the expected console line before the timeout; see console.log."


class QMPCommandError(MachineError):
    code = "E404"
    title = "QMP command failed"
    explanation = "QEMU refused a QMP command or the QMP connection broke; the error keeps what was sent."


class MachineStateError(MachineError):
    code = "E405"
    title = "machine not in the right state"
    explanation = "A call needs a running machine (or one not launched yet)."
