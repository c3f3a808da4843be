"""The demo's live view and summary read well at 80 columns: each phase on one line, the table whole, the
outcomes and both legs' times there, the ``teelab measure`` command on one line to copy."""

from __future__ import annotations

import hashlib

from rich.console import Console

from harness.cli.demo import phase_line, print_summary
from harness.demo import DemoResult, Phase

WIDTH = 80
MEASUREMENT = "ab" * 48
PCR0 = "cd" * 48
SECRET_SHA = hashlib.sha256(b"secret").hexdigest()
KEY = "0b1e4f3c-5d6e-4a7b-8c9d-0e1f2a3b4c5d"
IMAGE = "/var/cache/teelab/images/cvm-0123456789abcdef"
CMDLINE = "console=ttyS0 teelab.role=cvm teelab.kms_ca=" + "ef" * 32
MEASURE = ["teelab", "measure", "--kind", "snp", "--kernel", f"{IMAGE}/vmlinuz", "--initrd",
           f"{IMAGE}/initrd.img", "--cmdline", CMDLINE, "--vcpus", "1"]  # fmt: skip
DECISIONS = [
    {"decision": "allow", "reasons": ["policy allows: SnpMeasurement"]},
    {"decision": "deny", "reasons": [f"SnpMeasurement {MEASUREMENT[:20]} does not hold"]},
]


def demo_result() -> DemoResult:
    """A result shaped as run_demo fills it: every phase with the details it records."""
    result = DemoResult(ok=True, seconds=41.7)
    mapping = "overcommit: 2 host CPUs for 6 vCPUs (no core kept whole)"
    result.phases = [
        Phase("host", 0.01, {"accel": "tcg", "vsock": "user", "tee": "emulated"}),
        Phase("image", 0.4, {"image": "cvm", "cached": True, "initrd_mib": 39.4}),
        Phase("kms", 0.6, {"endpoint": "https://127.0.0.1:40211", "vsock_port": 5000, "ca": "12" * 32}),
        Phase("plan", 0.3, {"key": KEY, "measurement": MEASUREMENT, "measure": MEASURE}),
        Phase("boot", 12.5, {"expected": 12.1, "modified": 12.4}),
        Phase("unseal", 2.2, {"expected": "served", "modified": "refused"}),
        Phase("enclave-image", 0.9, {"recipe": "unseal", "cached": True, "key": KEY, "pcr0": PCR0}),
        Phase("parent", 11.8, {"boot": 11.2, "tee": "emulated", "cpu_mapping": mapping}),
        Phase("carve", 6.1, {"expected": 5.9, "modified": 6.0}),
        Phase("enclave-unseal", 3.4, {"expected": "served", "modified": "refused"}),
        Phase("audit", 0.02, {"decisions": DECISIONS, "enclave_decisions": []}),
        Phase("teardown", 1.1, {}),
    ]
    served = {"outcome": "served", "tls": True, "sha256": SECRET_SHA}
    refused = {"outcome": "refused", "error": "AccessDeniedException"}
    result.cvms = {
        "expected": {**served, "measurement": MEASUREMENT},
        "modified": {**refused, "measurement": "0"},
    }
    result.enclaves = {"expected": {**served, "pcr0": PCR0}, "modified": {**refused, "pcr0": "1" * 96}}
    return result


def rendered(write) -> str:
    out = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    write(out)
    return out.export_text()


def test_each_phase_is_one_line_within_80_columns() -> None:
    for phase in demo_result().phases:
        text = rendered(lambda out, phase=phase: out.print(phase_line(phase, WIDTH), highlight=False))
        assert len(text.splitlines()) == 1 and len(text.rstrip("\n")) <= WIDTH, text
        assert text.startswith(f"✓ {phase.name}")


def test_the_summary_fits_80_columns_and_says_who_was_served() -> None:
    text = rendered(lambda out: print_summary(demo_result(), out))
    lines = text.splitlines()
    copyable = [line for line in lines if "expected measurement, on its own" in line]
    assert len(copyable) == 1 and copyable[0].endswith("--vcpus 1"), "the measure command stays one line"
    assert [line for line in lines if len(line) > WIDTH and line not in copyable] == []
    assert text.count("served") >= 2 and text.count("refused") >= 2 and "AccessDeniedException" in text
    assert "CVM leg 15.4 s: image 0.4, plan 0.3, boot 12.5, unseal 2.2\n" in text
    assert "enclave leg 22.2 s: image 0.9, parent 11.8, carve 6.1, unseal 3.4\n" in text
    assert "enclave leg / CVM leg: 1.44" in text
    assert "demo OK" in text
