"""Coded errors of the host layer (E2xx): hugepages, hugetlbfs mounts, the ledger."""

from __future__ import annotations

from harness.errors import LabError


class HostError(LabError):
    code = "E200"
    title = "host cannot provide a resource"
    explanation = "The host lacks something a VM needs, or teelab could not set it up."


class NeedsRoot(HostError):
    code = "E201"
    title = "needs root"
    explanation = "Reserving hugepages and mounting hugetlbfs need root (or a pool and mount set up by root)."
    exit_status = 2


class HugepageReserveFailed(HostError):
    code = "E202"
    title = "could not reserve hugepages"
    explanation = (
        "The kernel did not grant the hugepages asked for: memory is short or too fragmented. Reserve them "
        "early after boot, or ask for fewer."
    )


class HugetlbfsMountFailed(HostError):
    code = "E203"
    title = "could not mount hugetlbfs"
    explanation = "mount -t hugetlbfs failed; the kernel may lack hugetlbfs or the page size."


class LedgerExhausted(HostError):
    code = "E204"
    title = "no free value in the host ledger"
    explanation = (
        "Every candidate CPU, CID, port or page range of that kind is claimed by a live process; "
        "`teelab doctor` lists the claims."
    )


class LedgerCorrupt(HostError):
    code = "E205"
    title = "host ledger unreadable"
    explanation = "The ledger file under the state dir is not valid JSON; move it aside to start afresh."


class CapabilityMissing(HostError):
    code = "E206"
    title = "host lacks what its capability group promises"
    explanation = (
        "`teelab doctor --require GROUP` found this host short of what hosts of that group (tcg, kvm, snp, "
        "tdx, vhost-vsock) must offer: the message lists each missing piece (kernel switch, device node, "
        "QEMU object or version, firmware). docs/hardware.md says how a host gets each one."
    )
    exit_status = 2
