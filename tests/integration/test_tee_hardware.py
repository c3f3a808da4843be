"""Real confidential guests on capable hosts (skipped elsewhere, with the reason): the same guest code and the
same verifier as the emulated tests, with vendor roots. The firmware comes from teelab's configuration, as the
Ansible role writes it ([snp] ovmf: an AmdSev OVMF.fd with kernel hashes; [tdx] ovmf: a TDVF), or from
TEELAB_SNP_OVMF / TEELAB_TDX_OVMF."""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest

from harness import config
from harness.attest import Policy, verify
from harness.lab import Lab
from harness.tee.measure import DEFAULT_GUEST_FEATURES, SnpMeasurement
from harness.tee.platforms import SnpBackend, TdxBackend

pytestmark = pytest.mark.vm

HOST_DATA = bytes.fromhex("a5" * 32)
GET_EVIDENCE = """
import sys, cbor2
from teelab_guest.evidence import get_evidence
e = get_evidence(bytes.fromhex(sys.argv[1]))
sys.stdout.buffer.write(cbor2.dumps({"kind": e.kind, "blob": e.blob, "aux": e.aux, "source": e.source}))
"""


def _firmware(variable: str) -> Path:
    section = variable.split("_")[1].lower()
    value = config.setting(section, "ovmf")
    if not value or not Path(value).is_file():
        pytest.skip(f"set {variable} or [{section}] ovmf in teelab.toml to the firmware this test boots")
    return Path(value)


@pytest.mark.snp
def test_real_snp_guest_reports_the_measurement_teelab_expects(enclave_image) -> None:
    firmware = _firmware("TEELAB_SNP_OVMF")
    features = int(os.environ.get("TEELAB_SNP_GUEST_FEATURES", hex(DEFAULT_GUEST_FEATURES)), 0)
    backend = SnpBackend(firmware=firmware, host_data=HOST_DATA, guest_features=features)
    with Lab() as lab:
        spec = lab.spec_for_image(enclave_image, name="snp-real", role="cvm", memory_mib=2048)
        with backend.attach(spec, lab.host) as attachment:
            boot = lab.boot(attachment.spec, timeout=180)
            info = attachment.after_launch(boot.machine)
            assert boot.agent is not None
            out = boot.agent.exec(["python3", "-c", GET_EVIDENCE, (b"\x5a" * 64).hex()], check=True)
            console = boot.machine.console_text()
    got = cbor2.loads(out.stdout)
    assert info["sev-type"] == "sev-snp" and got["kind"] == "snp", console[-2000:]
    assert isinstance(attachment.measurement, SnpMeasurement)
    policy = Policy(
        measurement=attachment.measurement.measurement, host_data=HOST_DATA, report_data=b"\x5a" * 64
    )
    verdict = verify(got["blob"], policy, certificates=got["aux"])
    assert verdict.ok, verdict.reasons


@pytest.mark.tdx
def test_real_tdx_guest_launches_and_binds_report_data(enclave_image) -> None:
    firmware = _firmware("TEELAB_TDX_OVMF")
    with Lab() as lab:
        spec = lab.spec_for_image(enclave_image, name="tdx-real", role="cvm", memory_mib=2048)
        with TdxBackend(firmware=firmware).attach(spec, lab.host) as attachment:
            boot = lab.boot(attachment.spec, timeout=180)
            info = attachment.after_launch(boot.machine)
            assert boot.agent is not None
            out = boot.agent.exec(["python3", "-c", GET_EVIDENCE, (b"\x3c" * 64).hex()], check=True)
    got = cbor2.loads(out.stdout)
    assert info["type"] == "child<tdx-guest>"
    if got["kind"] == "tdx":  # a quote (configfs-tsm): REPORTDATA at 0x238
        assert got["blob"][0x238:0x278] == b"\x3c" * 64
    else:  # a TD report from /dev/tdx_guest: REPORTMACSTRUCT.reportdata at 128
        assert got["kind"] == "tdx-report" and got["blob"][128:192] == b"\x3c" * 64
