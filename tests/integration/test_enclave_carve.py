"""Enclaves carved from a running parent under TCG: the parent's vCPUs and hugepages move to the enclave and
come back, the ledger says who holds them, the enclave has only vsock and its security module, a broken rule
leaves nothing behind, and a SIGKILLed parent takes its enclaves within 2 s. One parent serves the module."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from teelab_guest.enclave_app import parse_document_line

from harness.attest import LAB, Policy, default_lab_dir, verify
from harness.enclave import errors, pcr4_of_parent_instance
from harness.enclave.carver import ParentVm
from harness.enclave.pool import SLOTS_PER_CPU
from harness.enclave.recipes import BuiltEnclave, build_enclave_image
from harness.host.hugepages import free_pages
from harness.lab import Lab
from harness.vsock import ENCLAVE_GROUP
from harness.vsock.errors import VsockConnectionRefused
from harness.vsock.fake_guest import FakeFront, FakeGuest, GuestPump

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    # the host's request threads must not die (a console reader that left used to raise BrokenPipeError there)
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]
MIB = 1 << 20
PAGE_KIB = 2048
# PCI ids an enclave may show: q35's own host bridge, LPC/ISA bridge, AHCI (no drive) and SMBus; the
# virtio-serial controller of the security module's port; vhost-user vsock.
ALLOWED_PCI = {
    (0x8086, 0x29C0), (0x8086, 0x2918), (0x8086, 0x2922), (0x8086, 0x2930),
    (0x1AF4, 0x1003), (0x1AF4, 0x1043), (0x1AF4, 0x1053),
}  # fmt: skip


@pytest.fixture(scope="module")
def hello() -> BuiltEnclave:
    return build_enclave_image("hello")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def parent(lab: Lab) -> ParentVm:
    return lab.boot_parent(name="carve-parent")


def hugetlb_kib(pid: int | None) -> int:
    """Hugetlb memory mapped by a process (smaps' Shared_Hugetlb + Private_Hugetlb), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (OSError, TypeError):
        return 0
    fields = ("Shared_Hugetlb:", "Private_Hugetlb:")
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(fields))


def online_count(cpus: str) -> int:
    total = 0
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


def holders(parent: ParentVm) -> dict[str, int]:
    """Ledger owner -> how many values it holds, for this parent's CPUs and hugepages."""
    counts: dict[str, int] = {}
    for kind in (parent.layout.ledger_kind, parent.layout.page_kind):
        for claim in parent.ledger.claims(kind):
            if parent.name in claim.owner:
                key = f"{kind}:{claim.owner.split(':')[0]}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def test_carve_moves_cpus_and_hugepages_to_the_enclave_and_terminate_brings_them_back(
    parent: ParentVm, hello: BuiltEnclave
) -> None:
    before = parent.order({"op": "status"})
    free_before = free_pages(PAGE_KIB)
    parent_before = hugetlb_kib(parent.machine.pid)
    ledger_before = holders(parent)
    assert ledger_before == {
        f"{parent.layout.ledger_kind}:parent": 4,
        f"{parent.layout.page_kind}:parent": (512 + 256) // 2,
    }

    lab_wide = parent.vsock.listen(7777)  # a host port every VM of the lab may reach (a vsock-proxy's)
    enclave = parent.carve(hello.path, memory_mib=256, cpu_count=2)
    after = parent.order({"op": "status"})
    uds = {name: a.uds for name, a in parent.vsock.attachments.items()}
    assert Path(f"{uds[parent.name]}_7777").exists()
    assert not Path(f"{uds[enclave.name]}_7777").exists()  # the enclave reaches its parent, never the host
    lab_wide.close()
    assert_a_sibling_enclave_cannot_reach(parent, enclave.name, enclave.cid)
    assert online_count(before["online"]) - online_count(after["online"]) == 2
    assert before["mem_total_kib"] - after["mem_total_kib"] >= 256 * 1024
    assert parent_before - hugetlb_kib(parent.machine.pid) == 256 * 1024
    assert hugetlb_kib(enclave.machine.pid) == 256 * 1024
    assert free_pages(PAGE_KIB) == free_before  # the pages moved: none were added, none are lost
    assert holders(parent) == {
        f"{parent.layout.ledger_kind}:parent": 2,
        f"{parent.layout.ledger_kind}:enclave": 2,
        f"{parent.layout.page_kind}:parent": 512 // 2,
        f"{parent.layout.page_kind}:enclave": 256 // 2,
    }
    # each enclave vCPU thread runs exactly on the host CPU the ledger gave it (its parent vCPU's)
    booked = [c.value for c in parent.ledger.claims(parent.layout.ledger_kind) if c.owner == enclave.owner]
    host_cpus = sorted(v // SLOTS_PER_CPU if parent.layout.overcommit else v for v in booked)
    threads = enclave.machine.vcpu_threads()
    assert len(threads) == 2
    for index, tid in threads.items():
        assert os.sched_getaffinity(tid) == {enclave.cpus[index].host_cpu}
    assert sorted(c.host_cpu for c in enclave.cpus) == host_cpus
    assert sorted(parent.layout.vcpu_host[c.vcpu] for c in enclave.cpus) == host_cpus
    # only vsock, the security module's port and the machine's own devices; no disk, no agent
    pci = enclave.machine.qmp("query-pci")
    ids = {(d["id"]["vendor"], d["id"]["device"]) for bus in pci for d in bus["devices"]}
    assert ids <= ALLOWED_PCI, ids - ALLOWED_PCI
    assert (0x1AF4, 0x1053) in ids
    assert enclave.machine.qmp("query-block") == []
    assert "agent" not in str(enclave.machine.qmp("query-chardev"))
    assert "-serial" not in enclave.machine.argv  # production: no console
    (described,) = parent.describe()
    assert described["EnclaveCID"] == enclave.cid and described["State"] == "RUNNING"
    assert described["Flags"] == "NONE" and described["CPUIDs"] == [c.vcpu for c in enclave.cpus]
    assert described["Measurements"]["PCR0"] == hello.measurements.pcr0.hex()
    assert enclave.enclave_id.startswith(f"{parent.name}-enc")  # Nitro's <instance>-enc<hex>
    assert enclave.launch.pcrs[4] == pcr4_of_parent_instance(parent.name)
    assert ("overcommit" in described["CPUMapping"]) == parent.layout.overcommit

    pid = enclave.machine.pid
    parent.terminate(enclave)
    back = parent.order({"op": "status"})
    assert back["online"] == before["online"]
    assert back["mem_total_kib"] == before["mem_total_kib"]
    assert hugetlb_kib(parent.machine.pid) == parent_before
    assert not Path(f"/proc/{pid}").exists()
    assert free_pages(PAGE_KIB) == free_before
    assert holders(parent) == ledger_before
    assert parent.describe() == []


def assert_a_sibling_enclave_cannot_reach(parent: ParentVm, name: str, cid: int) -> None:
    """A second enclave of the parent cannot connect to the first, nor the host to either. The second is
    the fake guest on the parent's switch (a second carve would cost a boot and a pool twice the size)."""
    with pytest.raises(VsockConnectionRefused, match="only its parent"):
        parent.vsock.connect(cid, 5000, group=parent.group)
    sibling = parent.vsock.attach(f"{name}-sibling", group=parent.group, group_kind=ENCLAVE_GROUP)
    guest = FakeGuest(sibling.cid, memfd=True, ram_kib=4096)
    front = FakeFront(guest, str(parent.vsock.runtime_dir / f"{sibling.name}.vhost"))
    try:
        front.start()
        pump = GuestPump(guest)
        try:
            with pump.lock:
                conn = guest.connect(cid, 5000)
            pump.wait(lambda: conn.reset)
        finally:
            pump.stop()
        vms = parent.vsock.stats()["vms"]
        assert vms[sibling.name]["drops"] == {"enclave_isolation": 1}  # type: ignore[index]
        assert vms[name]["drops"] == {} and vms[name]["role"] == "enclave"  # type: ignore[index]
        assert vms[parent.name]["role"] == "parent"  # type: ignore[index]
    finally:
        front.close()
        guest.close_ram()
        parent.vsock.detach(sibling.name)


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"cpu_count": 4}, "E937"),  # the parent would keep 0 vCPUs
        ({"cpu_count": 3}, "E933"),
        ({"cpu_ids": (0, 1)}, "E939"),  # not pool vCPUs
        ({"memory_mib": 255}, "E945"),
        ({"memory_mib": 514}, "E941"),
        ({"memory_mib": 64}, "E932"),
        ({"memory_mib": 384}, "E938"),  # the parent would keep 384 MiB
        ({"cid": 3}, "E946"),  # the parent's own CID
        ({"name": "../../escape"}, "E946"),  # a name becomes a VM name and a socket file name
    ],
)
def test_each_broken_rule_is_refused_with_its_code_and_leaves_nothing(
    parent: ParentVm, hello: BuiltEnclave, options: dict[str, object], code: str
) -> None:
    options = {"memory_mib": 256, **options}
    ledger = parent.ledger.claims()
    free = free_pages(PAGE_KIB)
    attached = set(parent.vsock.attachments)
    children = set(os.listdir("/proc"))
    with pytest.raises(errors.EnclaveError) as caught:
        parent.carve(hello.path, **options)  # type: ignore[arg-type]
    assert caught.value.code == code
    assert parent.ledger.claims() == ledger
    assert free_pages(PAGE_KIB) == free
    assert set(parent.vsock.attachments) == attached
    assert parent.enclaves == {}
    new = [p for p in set(os.listdir("/proc")) - children if p.isdigit() and _is_our_qemu(int(p))]
    assert new == []


def _is_our_qemu(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return "qemu" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def test_an_enclave_without_a_heartbeat_in_time_is_e947_and_everything_goes_back(
    parent: ParentVm, hello: BuiltEnclave
) -> None:
    status = parent.order({"op": "status"})
    ledger = {(c.kind, c.value, c.owner, c.pid) for c in parent.ledger.claims()}
    free = free_pages(PAGE_KIB)
    attached = set(parent.vsock.attachments)
    parent_kib = hugetlb_kib(parent.machine.pid)
    with pytest.raises(errors.EnclaveBootFailed) as caught:
        parent.carve(hello.path, memory_mib=256, cpu_count=2, timeout=0.5)
    assert caught.value.code == "E947"
    assert parent.order({"op": "status"}) == status
    assert hugetlb_kib(parent.machine.pid) == parent_kib
    assert free_pages(PAGE_KIB) == free
    assert {(c.kind, c.value, c.owner, c.pid) for c in parent.ledger.claims()} == ledger  # handed back
    assert set(parent.vsock.attachments) == attached and parent.enclaves == {}


# In the parent: accept one connection on vsock port 5005 and print the line it carries.
RECEIVE_REPORT = """
import socket, sys
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 5005))
listener.listen(1)
conn, _ = listener.accept()
data = b""
while not data.endswith(b"\\n") and (chunk := conn.recv(65536)):
    data += chunk
sys.stdout.buffer.write(data)
"""


@pytest.fixture(scope="module")
def report() -> BuiltEnclave:
    return build_enclave_image("report")


def test_a_carved_enclave_attests_to_its_parent_over_vsock_and_debug_mode_is_refused_by_policy(
    parent: ParentVm, report: BuiltEnclave
) -> None:
    reported = {}
    for debug in (False, True):
        job = parent.boot.agent.start(["python3", "-c", RECEIVE_REPORT], timeout=180)
        enclave = parent.carve(report.path, memory_mib=256, cpu_count=2, debug=debug)
        app = parse_document_line(job.result(120).text)
        assert app is not None, job.result(0).text
        reported[debug] = (app, enclave.enclave_id)
        parent.terminate(enclave)
    (app, enclave_id), (debug_app, _) = reported[False], reported[True]
    pcrs = {**report.measurements.as_pcrs(), 4: pcr4_of_parent_instance(parent.name)}
    lab = {"roots": (LAB,), "lab_dir": default_lab_dir()}
    bound = {"nonce": app.nonce, "public_key": app.public_key, "user_data": b"report"}
    verdict = verify(app.document, Policy(**lab, pcrs=pcrs, **bound))
    assert verdict.ok, verdict.reasons
    assert verdict.claims["module_id"] == enclave_id
    assert verify(debug_app.document, Policy(**lab)).codes == {"debug-not-allowed"}


def enclave_cli(parent: ParentVm, *args: str, timeout: float = 180.0) -> tuple[int, str, str]:
    """``teelab-enclave ARGS`` run in the parent through its agent: (status, stdout, stderr)."""
    agent = parent.boot.agent
    result = agent.exec(["teelab-enclave", *args], timeout=timeout)
    return result.returncode, result.text, result.stderr.decode(errors="replace")


def test_teelab_enclave_in_the_parent_runs_describes_and_terminates_with_nitro_clis_json(
    parent: ParentVm, hello: BuiltEnclave
) -> None:
    parent.boot.agent.exec(["sh", "-c", "cat > /tmp/app.eif"], stdin=hello.path.read_bytes(), check=True)
    status, out, err = enclave_cli(parent, "describe-eif", "--eif-path", "/tmp/app.eif")
    assert status == 0, err
    assert json.loads(out)["Measurements"]["PCR0"] == hello.measurements.pcr0.hex()

    status, out, err = enclave_cli(
        parent, "run-enclave", "--eif-path", "/tmp/app.eif", "--cpu-count", "2", "--memory", "256",
        "--enclave-name", "app",
    )  # fmt: skip
    assert status == 0, err
    ran = json.loads(out)
    assert ran["EnclaveName"] == "app" and ran["NumberOfCPUs"] == 2 and ran["MemoryMiB"] == 256
    status, out, _ = enclave_cli(parent, "describe-enclaves")
    (described,) = json.loads(out)
    assert described["EnclaveID"] == ran["EnclaveID"] and described["State"] == "RUNNING"
    assert described["Flags"] == "NONE" and "CPUMapping" in described

    status, out, err = enclave_cli(parent, "console", "--enclave-name", "app")
    assert status == 2 and err.startswith("[ E948 ]") and out == ""
    status, _, err = enclave_cli(parent, "run-enclave", "--eif-path", "/tmp/app.eif", "--cpu-count", "2",
                                 "--memory", "256")  # fmt: skip
    assert status == 2 and err.startswith("[ E937 ]")  # the pool's vCPUs are taken: the parent keeps 2

    status, out, err = enclave_cli(parent, "terminate-enclave", "--enclave-name", "app")
    assert status == 0 and json.loads(out)["Terminated"] is True, err
    assert json.loads(enclave_cli(parent, "describe-enclaves")[1]) == []
    status, _, err = enclave_cli(parent, "terminate-enclave", "--enclave-id", ran["EnclaveID"])
    assert status == 2 and err.startswith("[ E949 ]")


def test_a_debug_enclaves_console_streams(parent: ParentVm) -> None:
    status, _, err = enclave_cli(
        parent, "run-enclave", "--eif-path", "/tmp/app.eif", "--cpu-count", "2", "--memory", "256",
        "--enclave-name", "dbg", "--debug-mode",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads(enclave_cli(parent, "describe-enclaves")[1])[0]["Flags"] == "DEBUG_MODE"
    result = parent.boot.agent.exec(["timeout", "3", "teelab-enclave", "console", "--enclave-name", "dbg"])
    assert "TEELAB-READY role=enclave" in result.text
    assert enclave_cli(parent, "terminate-enclave", "--all")[0] == 0


def test_a_sigkilled_parent_takes_its_enclaves_within_2_s(
    lab: Lab, parent: ParentVm, hello: BuiltEnclave
) -> None:
    """Last in the module: it kills the shared parent."""
    enclave = parent.carve(hello.path, memory_mib=256, cpu_count=2)
    pid = enclave.machine.pid
    pages = hugetlb_kib(pid) // PAGE_KIB + hugetlb_kib(parent.machine.pid) // PAGE_KIB
    free = free_pages(PAGE_KIB)
    assert parent.machine.pid is not None
    os.kill(parent.machine.pid, signal.SIGKILL)
    killed = time.monotonic()
    while Path(f"/proc/{pid}").exists() and _alive(pid):
        assert time.monotonic() - killed < 2.0, "the enclave outlived its parent by 2 s"
        time.sleep(0.02)
    deadline = time.monotonic() + 2.0
    while free_pages(PAGE_KIB) < free + pages and time.monotonic() < deadline:
        time.sleep(0.05)
    assert free_pages(PAGE_KIB) >= free + pages  # the enclave's and the parent's hugepages are back
    lab.stop(parent.machine, powerdown_timeout=0)
    assert [c for c in parent.ledger.claims() if parent.name in c.owner] == []


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
