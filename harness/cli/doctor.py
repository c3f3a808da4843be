"""``teelab doctor``: what this host can give a VM, as a table or ``--json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from harness import config
from harness.cli.arguments import existing_directory
from harness.cli.render import console, print_json
from harness.enclave.pool import pool_summary
from harness.host import capability
from harness.host.errors import CapabilityMissing
from harness.host.ledger import Ledger
from harness.host.model import HostInfo
from harness.host.probe import probe
from harness.tee.measure import snp_firmware_measures

INTERESTING_TYPES = (
    *(
        "sev-guest",
        "sev-snp-guest",
        "tdx-guest",
        "memory-backend-epc",
        "memory-backend-memfd",
        "memory-backend-file",
    ),
    *("vhost-vsock-pci", "vhost-user-vsock-pci", "virtio-mem-pci", "virtserialport"),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="probe the host: accelerator, vsock, hugepages, CPUs, TEEs, QEMU")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--root", type=existing_directory, default=Path("/"), help="probe a fixture tree instead of this host"
    )
    parser.add_argument(
        "--require",
        choices=capability.GROUPS,
        metavar="GROUP",
        help=f"fail (E206, exit 2) unless the host gives what GROUP promises: {', '.join(capability.GROUPS)}",
    )
    parser.set_defaults(func=run)


def firmware_missing(group: str) -> list[str]:
    """What is wrong with the firmware teelab.toml (``[snp] ovmf``, ``[tdx] ovmf``) names for ``group``."""
    if group not in ("snp", "tdx"):
        return []
    variable = config.env_name(group, "ovmf")
    value = config.setting(group, "ovmf")
    if not value:
        return [f"no {group.upper()} firmware configured ({variable} or [{group}] ovmf in teelab.toml)"]
    path = Path(value)
    if not path.is_file():
        return [f"{variable} names {path}, which is not a file"]
    if group == "snp" and not snp_firmware_measures(path, kernel=True):
        return [f"{path} is not an AmdSev OVMF: no SNP_KERNEL_HASHES section, so -kernel would go unmeasured"]
    return []


def require(group: str, host: HostInfo) -> None:
    """Raise ``CapabilityMissing`` naming every piece ``host`` lacks for ``group``."""
    missing = capability.missing(group, host) + firmware_missing(group)  # type: ignore[arg-type]
    if missing:
        raise CapabilityMissing(
            f"this host lacks what the {group} group promises: " + "; ".join(missing),
            hint="docs/hardware.md says how to provision each piece (ansible/site.yml does it per group)",
            group=group,
            missing=missing,
        )


def run(args: argparse.Namespace) -> int:
    host = probe(args.root)
    if args.require:
        require(args.require, host)
    claims = Ledger().claims() if args.root == Path("/") else []
    if args.json:
        data = host.to_dict()
        data["enclave_pool"] = pool_summary(host)
        data["groups"] = {group: capability.missing(group, host) for group in capability.GROUPS}  # []: has it
        data["ledger"] = [{"kind": c.kind, "value": c.value, "owner": c.owner, "pid": c.pid} for c in claims]
        print_json(data)
        return 0
    console.print(host_table(host))
    if claims:
        table = Table(title="ledger claims")
        for column in ("kind", "value", "owner", "pid"):
            table.add_column(column)
        for claim in claims:
            table.add_row(claim.kind, str(claim.value), claim.owner, str(claim.pid))
        console.print(table)
    return 0


def host_table(host: HostInfo) -> Table:
    def yes(flag: bool) -> str:
        return "[green]yes[/]" if flag else "[red]no[/]"

    table = Table(title="teelab doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("found")
    table.add_row("accelerator", f"{host.accel.upper()}: {host.accel_reason}")
    table.add_row(
        "/dev/vhost-vsock", yes(host.vhost_vsock) + ("" if host.vhost_vsock else " (user-space vsock)")
    )
    online = [c.cpu for c in host.cpus if c.online]
    smt = any(len(c.siblings) > 1 for c in host.cpus)
    table.add_row("CPUs", f"{len(online)} online of {len(host.cpus)}, NUMA nodes {list(host.numa_nodes)}, "
                  f"SMT {'on' if smt else 'off'}")  # fmt: skip
    for node in host.numa_nodes:
        cpus = [c for c in host.cpus if c.node == node]
        cores = sorted({tuple(c.siblings) for c in cpus})
        table.add_row(f"  node {node}", " ".join("+".join(map(str, core)) for core in cores) or "-")
    pools = ", ".join(
        f"{p.size_kib // 1024} MiB{'' if p.node is None else f' node {p.node}'}: {p.free}/{p.total} free"
        for p in host.hugepages
    )
    table.add_row("hugepages", pools or "none")
    mounts = ", ".join(f"{m.path} ({m.pagesize_kib // 1024} MiB)" for m in host.hugetlbfs)
    table.add_row("hugetlbfs", mounts or "[yellow]not mounted[/] (teelab mounts one under /run/teelab)")
    tee = host.tee
    table.add_row("SEV / SEV-ES / SNP", f"{yes(tee.sev)} / {yes(tee.sev_es)} / {yes(tee.sev_snp)}"
                  + (f", cbitpos {tee.cbitpos}" if tee.cbitpos is not None else ""))  # fmt: skip
    table.add_row("TDX", yes(tee.tdx))
    epc = ", ".join(f"node {e.node} {e.size_kib // 1024} MiB" for e in tee.sgx_epc) or "none"
    table.add_row("SGX / FLC / vepc", f"{yes(tee.sgx)} / {yes(tee.sgx_flc)} / {yes(tee.sgx_vepc)}, EPC {epc}")
    qemu = host.qemu
    version = ".".join(map(str, qemu.version)) if qemu.version else "?"
    table.add_row("QEMU", f"{qemu.binary or '[red]not found[/]'} {version if qemu.binary else ''}")
    for type_name in INTERESTING_TYPES:
        table.add_row(f"  {type_name}", yes(qemu.has(type_name)))
    pool = pool_summary(host)
    table.add_row("enclave pool", f"{pool['reason']}; a carve takes vCPUs by {pool['cpu_release']}")
    libvirt = host.libvirt
    table.add_row(
        "libvirt", f"{yes(libvirt.available)} {libvirt.version or ''} {libvirt.reason or ''}".strip()
    )
    return table
