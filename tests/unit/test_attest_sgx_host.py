"""Real SGX hosts: the probe reports SGX, flexible launch control, /dev/sgx_vepc and the EPC of each NUMA
node; `teelab doctor --require sgx` names what a host lacks (everything, on this TCG machine); a VMSpec's EPC
sections (memory-backend-epc + sgx-epc on the machine, the CPU's SGX features) are checked against the host
and rendered as QEMU's docs/system/i386/sgx.rst writes them (golden argv, two sections on two nodes);
``choose_backend("sgx")`` takes the real backend on an SGX host (golden argv, the query-sgx launch check),
the emulated security processor elsewhere, and refuses real SGX where the host lacks it."""

from __future__ import annotations

import datetime as dt
import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from host_trees import PVM_HOST, HostTree, put
from qemu_hosts import tcg_host
from test_qemu_argv import CONSOLE, QMP, assert_golden, boot, plain

from harness.aio import shared_loop
from harness.attest import verify
from harness.attest.sgx import parse_sgx_quote
from harness.cli import main
from harness.host import capability
from harness.host.model import EpcSection as HostEpc
from harness.host.model import HostCpu, HostInfo, TeeSupport
from harness.host.probe import probe
from harness.qemu import SevSnpGuest, build_argv
from harness.qemu.epc import EpcSection
from harness.qemu.errors import MemorySizeError, OptionInvalid, SgxUnavailable
from harness.tee.errors import DeviceConfigError, MeasureInputInvalid, TeeLaunchMismatch, TeeUnavailable
from harness.tee.platforms import backend_for_spec, choose_backend
from harness.tee.sgx import EmulatedSgxBackend, SgxBackend, SgxIdentity

__all__ = ["boot"]  # the fixture, shared with test_qemu_argv
SGX_TREE = HostTree(nodes=2, flags=("fpu", "vmx", "sgx", "sgx_lc"), kvm=True, qemu_version="8.2.2",
                    extra_objects=("memory-backend-epc",))  # fmt: skip
EPC_BYTES = {0: 64 << 20, 1: 128 << 20}


def sgx_tree(tmp_path: Path, tree: HostTree = SGX_TREE, *, vepc: bool = True) -> Path:
    """``tree`` written under tmp_path with /dev/sgx_vepc and the kernel's per-node EPC sizes."""
    root = tree.write(tmp_path / "host")
    if vepc:
        put(root / "dev/sgx_vepc", "")
    for node, size in EPC_BYTES.items():
        put(root / f"sys/devices/system/node/node{node}/x86/sgx_total_bytes", f"{size}\n")
    return root


def sgx_host() -> HostInfo:
    """A two-node KVM host with SGX (FLC, vepc), 64 MiB of EPC on node 0 and 128 MiB on node 1, QEMU 8.2."""
    host = tcg_host()
    epc = tuple(HostEpc(node, size // 1024) for node, size in EPC_BYTES.items())
    return replace(
        host,
        accel="kvm",
        accel_reason="vmx in /proc/cpuinfo and /dev/kvm is read-write",
        cpus=(*host.cpus, HostCpu(cpu=2, core=2, package=1, node=1, siblings=(2,))),
        numa_nodes=(0, 1),
        tee=TeeSupport(sgx=True, sgx_flc=True, sgx_vepc=True, sgx_epc=epc),
        qemu=replace(
            host.qemu, version=(8, 2, 2), object_types=host.qemu.object_types | {"memory-backend-epc"}
        ),
        cpu_flags=frozenset({"vmx", "sgx", "sgx_lc"}),
    )


def test_the_probe_reports_sgx_flc_vepc_and_the_epc_of_each_node(tmp_path: Path) -> None:
    host = probe(sgx_tree(tmp_path))
    assert (host.tee.sgx, host.tee.sgx_flc, host.tee.sgx_vepc) == (True, True, True)
    assert host.tee.sgx_epc == (HostEpc(0, 65536), HostEpc(1, 131072))
    assert (host.tee.epc_kib(1), host.tee.epc_kib(2)) == (131072, 0)
    assert capability.missing("sgx", host) == []
    assert list(host.to_dict()["tee"]["sgx_epc"]) == [
        {"node": 0, "size_kib": 65536},
        {"node": 1, "size_kib": 131072},
    ]


def test_doctor_require_sgx_refuses_here_and_names_every_missing_piece(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["doctor", "--require", "sgx"]) == 2
    err = capsys.readouterr().err
    assert "[ E206 ] this host lacks what the sgx group promises" in err
    for reason in (
        "does not offer SGX",
        "flexible launch control",
        "/dev/sgx_vepc",
        "no EPC",
        "memory-backend-epc",
    ):
        assert reason in err


@pytest.mark.parametrize(
    ("tree", "vepc", "reasons"),
    [
        (SGX_TREE, True, []),
        (SGX_TREE, False, ["/dev/sgx_vepc"]),
        (replace(SGX_TREE, flags=("fpu", "vmx", "sgx")), True, ["flexible launch control"]),
        (replace(SGX_TREE, qemu_version="6.2.0"), True, ["older than 7.0"]),
        (replace(SGX_TREE, extra_objects=()), True, ["no memory-backend-epc"]),
        (PVM_HOST, True, ["does not offer SGX", "no usable KVM"]),
    ],
)
def test_doctor_require_sgx_on_fixture_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tree: HostTree, vepc: bool, reasons: list[str]
) -> None:
    status = main(["doctor", "--require", "sgx", "--root", str(sgx_tree(tmp_path, tree, vepc=vepc))])
    output = "".join(capsys.readouterr())
    assert status == (2 if reasons else 0), output
    for reason in reasons:
        assert reason in output
    if not reasons:  # the host table shows SGX and the EPC of each node
        assert "yes / yes / yes, EPC node 0 64 MiB, node 1 128 MiB" in output


TWO_SECTIONS = (EpcSection("epc0", 32, host_node=0), EpcSection("epc1", 96, host_node=1))


def test_two_epc_sections_on_two_nodes_match_golden(boot: dict[str, Path], tmp_path: Path) -> None:
    spec = plain(boot, vcpus=2, memory_mib=1024, epc=TWO_SECTIONS)
    argv = build_argv(spec, sgx_host(), qmp=QMP, console=CONSOLE)
    assert_golden("sgx_epc_two_nodes", argv, tmp_path)
    machine = argv[argv.index("-machine") + 1].split(",")
    assert machine[1:] == [
        "sgx-epc.0.memdev=epc0",
        "sgx-epc.0.node=0",
        "sgx-epc.1.memdev=epc1",
        "sgx-epc.1.node=0",
    ]
    assert argv[argv.index("-cpu") + 1] == "host,+sgx,+sgxlc,+sgx-provisionkey"
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"]
    assert objects == [
        "memory-backend-epc,id=epc0,size=32M,prealloc=on,host-nodes=0,policy=bind",
        "memory-backend-epc,id=epc1,size=96M,prealloc=on,host-nodes=1,policy=bind",
    ]


@pytest.mark.parametrize(
    ("sections", "host", "needle"),
    [
        (TWO_SECTIONS, tcg_host(), "does not offer SGX"),
        (TWO_SECTIONS, tcg_host(), "runs under tcg"),
        ((EpcSection("epc0", 65, host_node=0),), sgx_host(), "65 MiB of EPC asked on node 0, which has 64"),
        (
            (EpcSection("a", 40, host_node=1), EpcSection("b", 90, host_node=1)),
            sgx_host(),
            "130 MiB of EPC asked on node 1",
        ),
        ((EpcSection("epc0", 8, host_node=2),), sgx_host(), "node 2, which the host does not have"),
        (TWO_SECTIONS, replace(sgx_host(), tee=replace(sgx_host().tee, sgx_vepc=False)), "/dev/sgx_vepc"),
    ],
)
def test_epc_the_host_cannot_give_is_refused_before_anything_runs(
    boot: dict[str, Path], sections: tuple[EpcSection, ...], host: HostInfo, needle: str
) -> None:
    with pytest.raises(SgxUnavailable) as caught:
        build_argv(plain(boot, epc=sections), host, qmp=QMP, console=CONSOLE)
    assert caught.value.code == "E319" and needle in caught.value.message


def test_an_empty_section_or_one_for_a_guest_node_a_spec_lacks_is_refused(boot: dict[str, Path]) -> None:
    with pytest.raises(MemorySizeError):
        build_argv(plain(boot, epc=(EpcSection("epc0", 0),)), sgx_host(), qmp=QMP, console=CONSOLE)
    with pytest.raises(OptionInvalid):
        build_argv(
            plain(boot, epc=(EpcSection("epc0", 8, guest_node=1),)), sgx_host(), qmp=QMP, console=CONSOLE
        )


# -- the real SGX backend: choose_backend("sgx") on an SGX host, the emulated processor elsewhere ----------


def test_an_sgx_host_gets_the_real_backend_and_its_default_epc_matches_golden(
    boot: dict[str, Path], tmp_path: Path
) -> None:
    """No EPC in the spec: one 64 MiB section from the host node with the most EPC (node 1, 128 MiB), the
    CPU's SGX features, KVM, and no emulated port (the guest's own DCAP stack quotes its enclaves)."""
    backend = choose_backend("sgx", sgx_host())
    assert isinstance(backend, SgxBackend) and not backend.emulated
    with backend.attach(plain(boot, vcpus=2, memory_mib=1024), sgx_host()) as attachment:
        assert attachment.spec.epc == (EpcSection("epc0", 64, host_node=1),)
        assert attachment.measurement is None and attachment.service is None
        argv = build_argv(attachment.spec, sgx_host(), qmp=QMP, console=CONSOLE)
    assert_golden("sgx_backend_default_epc", argv, tmp_path)
    assert argv[argv.index("-cpu") + 1] == "host,+sgx,+sgxlc,+sgx-provisionkey"
    assert not any("virtserialport" in a or "confidential-guest-support" in a for a in argv)


def test_one_spec_with_epc_is_real_on_an_sgx_host_and_emulated_elsewhere(
    boot: dict[str, Path], tmp_path: Path
) -> None:
    spec = plain(boot, vcpus=2, memory_mib=1024, epc=TWO_SECTIONS)
    identity = SgxIdentity(mrenclave=b"\x42" * 32, mrsigner=b"\x24" * 32, isv_prod_id=7)
    real = backend_for_spec(spec, sgx_host(), identity=identity, authority=None)
    assert isinstance(real, SgxBackend) and real.identity == identity
    argv = build_argv(real.attach(spec, sgx_host()).spec, sgx_host(), qmp=QMP, console=CONSOLE)
    assert_golden("sgx_epc_two_nodes", argv, tmp_path)  # the spec's own sections, untouched
    emulated = backend_for_spec(spec, tcg_host(), identity=identity, epc_mib=32)
    assert isinstance(emulated, EmulatedSgxBackend) and emulated.identity == identity
    with emulated.attach(spec, tcg_host()) as attachment:
        assert attachment.spec.epc == () and attachment.service is not None
        argv = build_argv(attachment.spec, tcg_host(), qmp=QMP, console=CONSOLE, channels={"tee": 7})
    assert argv[argv.index("-cpu") + 1] == "max" and "sgx-epc" not in " ".join(argv)
    assert argv[-1] == "virtserialport,id=tee0,bus=virtio-serial0.0,chardev=tee,name=org.teelab.tee.0"


def test_real_sgx_on_a_host_without_it_is_e954_with_every_reason_not_a_fallback() -> None:
    assert isinstance(choose_backend("sgx", tcg_host()), EmulatedSgxBackend)  # auto: emulate
    assert isinstance(choose_backend("sgx", sgx_host(), "emulated"), EmulatedSgxBackend)
    for host in (tcg_host(), replace(sgx_host(), tee=replace(sgx_host().tee, sgx_flc=False))):
        with pytest.raises(TeeUnavailable) as caught:
            choose_backend("sgx", host, "real")
        assert caught.value.code == "E954" and "doctor --require sgx" in (caught.value.hint or "")
    assert caught.value.evidence["missing"] == [
        "no flexible launch control (sgx_lc), which KVM needs to run guest enclaves"
    ]
    with pytest.raises(MeasureInputInvalid):
        choose_backend("sgx", sgx_host(), policy=1)


def test_the_real_backend_refuses_what_hardware_could_not_give(boot: dict[str, Path]) -> None:
    with pytest.raises(SgxUnavailable) as caught:  # more EPC than any node has: refused before launch
        SgxBackend(epc_mib=256).attach(plain(boot), sgx_host())
    assert "256 MiB of EPC asked on node 1, which has 128" in caught.value.message
    with pytest.raises(DeviceConfigError):
        SgxBackend().attach(plain(boot, confidential=SevSnpGuest()), sgx_host())


class QueryMachine:
    """A launched machine whose QMP answers ``query-sgx`` with ``answer``."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.loop = shared_loop()

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        assert command == "query-sgx" and not arguments
        return self.answer

    def channel(self, chardev_id: str) -> socket.socket:
        raise AssertionError("a real SGX guest has no tee channel")


QUERY_SGX = {"sgx": True, "sgx1": True, "sgx2": True, "flc": True,
             "sections": [{"node": 0, "size": 96 << 20}, {"node": 0, "size": 32 << 20}]}  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (QUERY_SGX, True),
        ({**QUERY_SGX, "flc": False}, False),
        ({**QUERY_SGX, "sgx": False, "sections": []}, False),
        ({**QUERY_SGX, "sections": [{"node": 0, "size": 32 << 20}]}, False),
        ({**QUERY_SGX, "sections": [{"node": 1, "size": 96 << 20}, {"node": 0, "size": 32 << 20}]}, False),
    ],
)
def test_the_launch_check_reads_query_sgx(boot: dict[str, Path], answer: dict[str, Any], ok: bool) -> None:
    attachment = SgxBackend().attach(plain(boot, epc=TWO_SECTIONS), sgx_host())
    if ok:
        assert attachment.after_launch(QueryMachine(answer))["flc"] is True
        return
    with pytest.raises(TeeLaunchMismatch) as caught:
        attachment.after_launch(QueryMachine(answer))
    assert caught.value.code == "E955" and caught.value.evidence["received"] == answer


def test_the_verify_policy_pins_the_expected_enclave_under_the_intel_root() -> None:
    identity = SgxIdentity(mrenclave=b"\x42" * 32, mrsigner=b"\x24" * 32, isv_prod_id=7, isv_svn=3)
    policy = SgxBackend(identity=identity).verify_policy(report_data=b"\x01" * 64)
    assert policy.roots == ("intel-sgx",) and not policy.trusts_lab
    assert (policy.mrenclave, policy.mrsigner, policy.isv_prod_id, policy.min_isv_svn) == (
        identity.mrenclave, identity.mrsigner, 7, 3)  # fmt: skip
    assert policy.report_data == b"\x01" * 64 and not policy.allow_debug
    assert SgxBackend().verify_policy().mrenclave is None


def test_a_genuine_sgx_quote_verifies_under_the_real_backends_policy_and_only_for_its_enclave() -> None:
    """The real path's evidence is an Intel-rooted quote: the genuine vector passes the policy of a backend
    expecting its enclave (time pinned inside its collateral window) and fails one expecting another."""
    vectors = Path(__file__).parents[1] / "vectors" / "sgx"
    quote = (vectors / "quote.bin").read_bytes()
    collateral = json.loads((vectors / "collateral.json").read_text())
    body = parse_sgx_quote(quote).body
    identity = SgxIdentity(body.mrenclave, body.mrsigner, body.isv_prod_id, body.isv_svn)
    statuses = ("UpToDate", "ConfigurationAndSWHardeningNeeded")
    at = dt.datetime(2025, 6, 20, tzinfo=dt.UTC)

    def check(expected: SgxIdentity) -> Any:
        policy = SgxBackend(identity=expected).verify_policy(tcb_statuses=statuses)
        return verify(quote, policy, now=at, collateral=collateral)

    assert check(identity).ok, check(identity).reasons
    assert "mrenclave-mismatch" in check(replace(identity, mrenclave=b"\x00" * 32)).codes
