"""The main job, end to end: the lab KMS serves the expected CVM and refuses the modified one."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from contextlib import ExitStack

import pytest
from teelab_guest import protocol

from harness.attest import default_lab_dir
from harness.bench.unseal import seal_secret
from harness.kms import KmsServer, Listen
from harness.kms.tls import ca_certificate_pem, ca_pin
from harness.lab import Lab

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_demo_serves_the_expected_cvm_and_enclave_and_refuses_the_modified_ones() -> None:
    argv = [sys.executable, "-m", "harness.cli", "demo", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, check=False)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], done.stdout[-3000:] + done.stderr[-2000:]
    expected, modified = result["cvms"]["expected"], result["cvms"]["modified"]
    assert expected["outcome"] == "served" and expected["evidence"] == "snp" and len(expected["sha256"]) == 64
    assert expected["tls"] is True  # guest to KMS in TLS, through the host's vsock-proxy
    assert modified["outcome"] == "refused" and modified["error"] == "AccessDeniedException"
    assert expected["measurement"] != modified["measurement"]
    phases = {p["name"]: p for p in result["phases"]}
    assert set(phases) >= {"host", "image", "kms", "plan", "boot", "unseal", "audit", "teardown"}
    assert set(phases) >= {"enclave-image", "parent", "carve", "enclave-unseal"}
    assert phases["parent"]["tee"] == phases["host"]["tee"]  # the parent is an SEV-SNP guest like the CVMs
    assert all(p["seconds"] >= 0 for p in phases.values())
    assert "..." not in json.dumps(result["phases"])  # --json carries values whole; only the live view cuts
    assert phases["plan"]["measurement"] == expected["measurement"]
    legs = result["legs"]
    assert legs["cvm"] == pytest.approx(
        sum(p["seconds"] for p in phases.values() if p["leg"] == "cvm"), abs=0.05
    )
    assert legs["enclave"] > 0 and legs["enclave_over_cvm"] == pytest.approx(
        legs["enclave"] / legs["cvm"], 0.02
    )
    # The enclave leg: an enclave carved from the parent is served its key in TLS through the parent's and
    # the host's vsock-proxies (its pin matched); one from a modified image (another PCR0) is refused.
    enclave, tampered = result["enclaves"]["expected"], result["enclaves"]["modified"]
    assert enclave["outcome"] == "served" and enclave["evidence"] == "nitro" and enclave["tls"] is True
    assert enclave["sha256"] == expected["sha256"]  # the same secret, sealed under the enclave's own key
    assert tampered["outcome"] == "refused" and tampered["error"] == "AccessDeniedException"
    assert enclave["pcr0"] != tampered["pcr0"] and enclave["enclave_id"] != tampered["enclave_id"]
    assert enclave["carve"] > 0 and tampered["carve"] > 0 and enclave["cid"] != tampered["cid"]
    assert (
        phases["enclave-unseal"]["expected"] == "served" and phases["enclave-unseal"]["modified"] == "refused"
    )
    enclave_decisions = phases["audit"]["enclave_decisions"]
    assert sorted(d["decision"] for d in enclave_decisions) == ["allow", "deny"]
    refused = next(d for d in enclave_decisions if d["decision"] == "deny")
    assert any("recipientattestation:pcr0" in reason.lower() for reason in refused["reasons"])
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


def test_a_cvm_talks_only_to_the_kms_its_command_line_pins(cvm_image, tmp_path) -> None:
    """One CVM pinned to the real KMS's CA, three KMSes behind the host's vsock-proxy: the real one (TLS), a
    fake one (TLS, its own CA, holding a key for this very measurement) and a plain HTTP one. The guest is
    served only by the real one, and by the plain one only when explicitly told --plain."""
    secret = b"s" * 32
    with Lab() as lab, ExitStack() as stack:
        ports = {"real": 8443, "fake": 8444, "plain": 8000}
        servers = {}
        for name, port in ports.items():
            listen = Listen(tls=name != "plain")
            servers[name] = stack.enter_context(
                KmsServer.start(tmp_path / name, listen, lab_dir=default_lab_dir())
            )
            host, remote = servers[name].endpoint.split("://")[1].rsplit(":", 1)
            stack.enter_context(lab.vsock_proxy(port, (host, int(remote))))
        pin = f"{protocol.KMS_CA_KEY}={ca_pin(tmp_path / 'real')}"
        plan = lab.plan_cvm(cvm_image, name="pinned-cvm", kind="snp", vcpus=1, cmdline_extra=pin)
        blobs = {
            name: seal_secret(server, plan.measurement_hex(), secret) for name, server in servers.items()
        }
        boot = lab.boot_planned(plan)

        def unseal(kms: str, *extra: str) -> dict:
            argv = ["python3", "-m", "teelab_guest.unseal", "--kms", f"vsock:2:{ports[kms]}",
                    "--ciphertext", blobs[kms], *extra]  # fmt: skip
            return json.loads(boot.agent.exec(argv, timeout=120).stdout.decode().strip().splitlines()[-1])

        real_ca, fake_ca = ca_certificate_pem(tmp_path / "real"), ca_certificate_pem(tmp_path / "fake")
        served = unseal("real", "--kms-ca", real_ca)
        assert served["outcome"] == "served" and served["tls"] is True, served
        assert served["sha256"] == hashlib.sha256(secret).hexdigest()
        outcomes = {
            "fake, own CA": unseal("fake", "--kms-ca", fake_ca),
            "fake, real CA": unseal("fake", "--kms-ca", real_ca),
            "plain": unseal("plain", "--kms-ca", real_ca),
            "no CA": unseal("real"),
        }
        reasons = {case: (o["outcome"], o["error"]) for case, o in outcomes.items()}
        assert reasons == {
            "fake, own CA": ("untrusted", "pin-mismatch"),
            "fake, real CA": ("untrusted", "untrusted-server"),
            "plain": ("untrusted", "handshake-failed"),
            "no CA": ("untrusted", "bad-ca"),
        }
        assert not [r for r in servers["fake"].store.audit() if r.operation == "Decrypt"]  # none reached it
        explicit = unseal("plain", "--plain")
        assert explicit["outcome"] == "served" and explicit["tls"] is False, explicit
        lab.stop(boot.machine)
