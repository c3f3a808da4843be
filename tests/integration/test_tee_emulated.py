"""Emulated confidential guests under TCG: the guest fetches evidence with ``get_evidence`` over its
virtio-serial port, and the host verifies it (lab root named in the policy) against the measurement
``teelab measure`` computes for that boot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import cbor2
import pytest

from harness.attest import LAB, Policy, default_lab_dir, parse_snp_report, verify
from harness.lab import GuestBoot, Lab
from harness.qemu.spec import VMSpec
from harness.tee.platforms import EmulatedSnpBackend, EmulatedTdxBackend, TeeAttachment

pytestmark = pytest.mark.vm

HOST_DATA = bytes.fromhex("5e" * 32)
TEELAB = str(Path(sys.executable).with_name("teelab"))
GET_EVIDENCE = """
import sys, cbor2
from teelab_guest.evidence import get_evidence
e = get_evidence(bytes.fromhex(sys.argv[1]), vmpl=int(sys.argv[2]) if len(sys.argv) > 2 else None)
sys.stdout.buffer.write(cbor2.dumps({"kind": e.kind, "blob": e.blob, "aux": e.aux, "source": e.source}))
"""


@dataclass
class TeeGuest:
    boot: GuestBoot
    attachment: TeeAttachment

    def evidence(self, report_data: bytes, *args: str) -> dict[str, object]:
        assert self.boot.agent is not None
        argv = ["python3", "-c", GET_EVIDENCE, report_data.hex(), *args]
        return cbor2.loads(self.boot.agent.exec(argv, check=True, timeout=60).stdout)


def teelab_measure(kind: str, spec: VMSpec) -> dict[str, str]:
    """What the `teelab measure` command prints for the launch inputs of ``spec``."""
    argv = [TEELAB, "measure", "--kind", kind, "--kernel", str(spec.kernel), "--initrd", str(spec.initrd),
            "--cmdline", spec.cmdline, "--vcpus", str(spec.vcpus), "--json"]  # fmt: skip
    if spec.firmware is not None:
        argv += ["--firmware", str(spec.firmware)]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


@pytest.fixture(scope="module")
def snp_guest(enclave_image, vm_backend: str) -> Iterator[TeeGuest]:
    with Lab(backend=vm_backend) as lab:
        spec = lab.spec_for_image(enclave_image, name="tee-snp", role="cvm", vcpus=2)
        with EmulatedSnpBackend(host_data=HOST_DATA).attach(spec, lab.host) as attachment:
            boot = lab.boot(attachment.spec)
            attachment.after_launch(boot.machine)
            yield TeeGuest(boot, attachment)


def test_snp_evidence_from_inside_the_guest_verifies_against_teelab_measure(snp_guest: TeeGuest) -> None:
    nonce = bytes(range(64))
    got = snp_guest.evidence(nonce, "0")
    assert (got["kind"], got["source"]) == ("snp", "emulated")
    expected = teelab_measure("snp", snp_guest.attachment.spec)
    policy = Policy(
        roots=(LAB,),
        measurement=bytes.fromhex(expected["measurement"]),
        host_data=HOST_DATA,
        report_data=nonce,
        lab_dir=default_lab_dir(),
    )
    verdict = verify(got["blob"], policy, certificates=got["aux"])  # type: ignore[arg-type]
    assert verdict.ok, verdict.reasons
    # the same evidence fails a policy that does not name the lab root, or expects another boot
    assert not verify(got["blob"], Policy(), certificates=got["aux"]).ok  # type: ignore[arg-type]
    spec = snp_guest.attachment.spec
    other = teelab_measure("snp", replace(spec, cmdline=spec.cmdline + " x=1"))
    wrong = Policy(roots=(LAB,), measurement=bytes.fromhex(other["measurement"]), lab_dir=policy.lab_dir)
    assert not verify(got["blob"], wrong, certificates=got["aux"]).ok  # type: ignore[arg-type]


def test_vmpl_and_report_data_reach_the_report(snp_guest: TeeGuest) -> None:
    report = parse_snp_report(snp_guest.evidence(b"short", "2")["blob"])  # type: ignore[arg-type]
    assert (report.vmpl, report.report_data, report.host_data) == (2, b"short" + bytes(59), HOST_DATA)


def test_a_guest_writing_garbage_to_the_port_does_not_break_it(snp_guest: TeeGuest) -> None:
    agent = snp_guest.boot.agent
    assert agent is not None
    agent.exec(["sh", "-c", "head -c 70000 /dev/urandom > /dev/virtio-ports/org.teelab.tee.0"], check=True)
    assert snp_guest.evidence(b"after garbage")["kind"] == "snp"
    assert snp_guest.attachment.service is not None and snp_guest.attachment.service.serving


def test_tdx_quote_from_inside_the_guest_verifies_against_teelab_measure(enclave_image) -> None:
    with Lab() as lab:
        spec = lab.spec_for_image(enclave_image, name="tee-tdx", role="cvm", vcpus=1)
        with EmulatedTdxBackend().attach(spec, lab.host) as attachment:
            boot = lab.boot(attachment.spec)
            attachment.after_launch(boot.machine)
            got = TeeGuest(boot, attachment).evidence(b"\xaa" * 64)
    assert got["kind"] == "tdx"
    expected = teelab_measure("tdx", attachment.spec)
    policy = Policy(
        roots=(LAB,),
        mrtd=bytes.fromhex(expected["mrtd"]),
        rtmrs={i: bytes.fromhex(expected[f"rtmr{i}"]) for i in range(4)},
        report_data=b"\xaa" * 64,
        lab_dir=default_lab_dir(),
    )
    verdict = verify(got["blob"], policy)  # type: ignore[arg-type]
    assert verdict.ok, verdict.reasons


def test_measure_of_a_lab_image_is_what_a_lab_cvm_of_it_reports(cvm_image) -> None:
    """`teelab measure --image NAME --cmdline-extra ...` takes the lab's own launch inputs: no guessing of
    vCPUs, firmware or command line to reproduce a lab guest's measurement."""
    argv = [TEELAB, "measure", "--kind", "snp", "--image", "cvm", "--cmdline-extra", "lab.test=1", "--json"]
    expected = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    with Lab() as lab:
        guest = lab.boot_cvm(
            cvm_image, name="measured-cvm", kind="snp", cmdline_extra="lab.test=1", vsock=False
        )
        assert guest.agent is not None
        argv = ["python3", "-c", GET_EVIDENCE, bytes(64).hex()]
        got = cbor2.loads(guest.agent.exec(argv, check=True, timeout=60).stdout)
    assert expected["cmdline"].endswith(" lab.test=1")
    assert parse_snp_report(got["blob"]).measurement.hex() == expected["measurement"]
