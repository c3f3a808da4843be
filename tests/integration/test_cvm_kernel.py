"""The confidential-guest kernel (images/kernel-6.12.toml, the cvm612 image): its config has the SEV-SNP
and TDX guest drivers and TSM reports, and booted under TCG guest-init says configfs-tsm is there but no
provider is bound, so the guest's evidence comes from the emulated port, with that reason."""

from __future__ import annotations

import time

import cbor2
import pytest

from harness import images
from harness.images.build import images_dir
from harness.images.kernel import unpack
from harness.images.recipe import load_kernel_pin
from harness.lab import Lab

pytestmark = pytest.mark.vm
REASON = "configfs-tsm is there but no provider is bound (mkdir: ENXIO)"
GET_EVIDENCE = """
import cbor2, sys
from teelab_guest.evidence import get_evidence
e = get_evidence(b"\\x42" * 64)
sys.stdout.buffer.write(cbor2.dumps({"kind": e.kind, "source": e.source, "passed_over": list(e.passed_over)}))
"""


def test_the_confidential_guest_kernel_has_sev_guest_tdx_guest_and_tsm_reports() -> None:
    tree = unpack(load_kernel_pin("kernel-6.12"), images_dir())
    config = next(tree.root.glob("boot/config-*")).read_text().splitlines()
    for option in ("CONFIG_SEV_GUEST", "CONFIG_TDX_GUEST_DRIVER", "CONFIG_TSM_REPORTS"):
        assert f"{option}=m" in config or f"{option}=y" in config, option
    assert {"sev_guest", "tdx_guest", "tsm"} <= set(tree.modules)


def test_under_tcg_guest_init_reports_configfs_tsm_without_provider_and_uses_the_port() -> None:
    with Lab() as lab:
        boot = lab.boot_cvm(images.build("cvm612"), name="cvm612")
        deadline = time.monotonic() + 30
        while "evidence source:" not in boot.machine.console_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        console = boot.machine.console_text()
        assert f"teelab: evidence source: emulated, because: {REASON}" in console, console[-1500:]
        assert boot.agent is not None
        got = cbor2.loads(boot.agent.exec(["python3", "-c", GET_EVIDENCE], check=True).stdout)
        modules = boot.agent.exec(["cat", "/proc/modules"], check=True).text
    assert got["kind"] == "snp" and got["source"] == "emulated"
    assert got["passed_over"][0] == REASON
    assert "tsm " in modules and "configfs " in modules
