"""The main job, end to end: the lab KMS serves the expected CVM and refuses the modified one."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_demo_serves_the_expected_cvm_and_refuses_the_modified_one() -> None:
    argv = [sys.executable, "-m", "harness.cli", "demo", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], done.stdout[-3000:] + done.stderr[-2000:]
    expected, modified = result["cvms"]["expected"], result["cvms"]["modified"]
    assert expected["outcome"] == "served" and expected["evidence"] == "snp" and len(expected["sha256"]) == 64
    assert expected["tls"] is True  # guest to KMS in TLS, through the host's vsock-proxy
    assert modified["outcome"] == "refused" and modified["error"] == "AccessDeniedException"
    assert expected["measurement"] != modified["measurement"]
    phases = {p["name"]: p for p in result["phases"]}
    assert set(phases) >= {"host", "image", "kms", "plan", "boot", "unseal", "audit", "teardown"}
    assert all(p["seconds"] >= 0 for p in phases.values())
    decisions = [d["decision"] for d in phases["audit"]["decisions"]]
    assert sorted(decisions) == ["allow", "deny"]
    denied = next(d for d in phases["audit"]["decisions"] if d["decision"] == "deny")
    assert any("snpmeasurement" in reason.lower() for reason in denied["reasons"])
    # The KMS CA's pin is on the measured command line, and `teelab measure` given the same launch inputs
    # computes the measurement the key policy named.
    measure = phases["plan"]["measure"]
    cmdline = measure[measure.index("--cmdline") + 1]
    assert re.search(r"(^| )teelab\.kms_ca=sha256:[0-9a-f]{64}( |$)", cmdline), cmdline
    alone = subprocess.run([sys.executable, "-m", "harness.cli", *measure[1:], "--json"],
                           capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert json.loads(alone.stdout)["measurement"] == expected["measurement"]
