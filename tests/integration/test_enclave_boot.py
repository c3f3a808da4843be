"""An enclave image built from the hello recipe, booted under TCG with its emulated security module: the
document its /app/run reports verifies with the lab root and the image's PCRs, and fails with a distinct
reason for another PCR0, debug mode, a stale nonce, a policy naming only the Nitro root, and truncation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from teelab_guest.enclave_app import AppDocument, parse_document_line

from harness.attest import LAB, NonceBook, Policy, default_lab_dir, verify
from harness.enclave import pcr3_of_parent_role, pcr4_of_parent_instance
from harness.enclave.plan import launch_of, wait_for_app
from harness.enclave.recipes import BuiltEnclave, build_enclave_image
from harness.lab import GuestBoot, Lab

pytestmark = pytest.mark.vm

PARENT_ROLE = "arn:aws:iam::123456789012:role/teelab-parent"
PARENT_INSTANCE = "i-0123456789abcdef0"
VM_NAME = "enclave-hello-test"


@pytest.fixture(scope="module")
def hello() -> BuiltEnclave:
    return build_enclave_image("hello")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def enclave(lab: Lab, hello: BuiltEnclave) -> GuestBoot:
    return lab.boot_enclave(
        hello.path, parent_role=PARENT_ROLE, parent_instance=PARENT_INSTANCE, name=VM_NAME, vcpus=2
    )


@pytest.fixture(scope="module")
def fresh(enclave: GuestBoot) -> tuple[AppDocument, NonceBook, list[float]]:
    """/app/run asked again through the agent, bound to a nonce from a host nonce book (clock under test)."""
    clock = [0.0]
    book = NonceBook(ttl=60, clock=lambda: clock[0])
    nonce = book.issue()
    assert enclave.agent is not None
    result = enclave.agent.exec(["/app/run", nonce.hex()], check=True, timeout=60)
    app = parse_document_line(result.text)
    assert app is not None and app.nonce == nonce
    return app, book, clock


def lab_policy(**fields: Any) -> Policy:
    return Policy(roots=(LAB,), lab_dir=default_lab_dir(), **fields)


def test_the_app_attests_at_boot_and_its_document_verifies_with_the_lab_root_and_all_pcrs(
    enclave: GuestBoot, hello: BuiltEnclave
) -> None:
    assert enclave.role == "enclave"
    app = wait_for_app(enclave.machine, timeout=60)
    console = enclave.machine.console_text()
    assert console.index("TEELAB-READY") < console.index("TEELAB-APP-DOCUMENT")  # run after readiness
    expected = {
        **hello.measurements.as_pcrs(),
        3: pcr3_of_parent_role(PARENT_ROLE),
        4: pcr4_of_parent_instance(PARENT_INSTANCE),
    }
    policy = lab_policy(pcrs=expected, nonce=app.nonce, public_key=app.public_key, user_data=b"hello")
    verdict = verify(app.document, policy)
    assert verdict.ok, verdict.reasons
    launch = launch_of(enclave.machine)
    assert launch is not None and launch.enclave_id.startswith(f"{PARENT_INSTANCE}-enc")
    assert verdict.root == LAB and verdict.claims["module_id"] == launch.enclave_id


def test_a_fresh_nonce_verifies_and_each_wrong_expectation_fails_for_its_own_reason(
    fresh: tuple[AppDocument, NonceBook, list[float]], hello: BuiltEnclave
) -> None:
    app, book, clock = fresh
    pcr0 = {0: hello.measurements.pcr0}
    bound = {"nonce": app.nonce, "public_key": app.public_key}
    other_image = {0: hashlib.sha384(b"another enclave image").digest()}
    failures = {
        "another PCR0": verify(app.document, lab_policy(pcrs=other_image, **bound)),
        "only the Nitro root": verify(app.document, Policy(roots=("aws-nitro",), pcrs=pcr0, **bound)),
        "truncated": verify(app.document[: len(app.document) // 2], lab_policy(pcrs=pcr0, **bound)),
    }
    clock[0] = 61.0  # the nonce's minute is over
    failures["stale nonce"] = verify(app.document, lab_policy(pcrs=pcr0, nonce_book=book, **bound))
    codes = {case: verdict.codes for case, verdict in failures.items()}
    assert codes == {
        "another PCR0": {"pcr-mismatch"},
        "only the Nitro root": {"untrusted-root"},
        "truncated": {"truncated"},
        "stale nonce": {"nonce-stale"},
    }
    clock[0] = 1.0
    verdict = verify(app.document, lab_policy(pcrs=pcr0, nonce_book=book, **bound))
    assert verdict.ok, verdict.reasons  # in time, the same document verifies (and uses the nonce up)
    assert verify(app.document, lab_policy(pcrs=pcr0, nonce_book=book, **bound)).codes == {"nonce-reused"}


def test_boot_cli_in_debug_mode_reports_zero_pcrs_and_a_debug_refusal(hello: BuiltEnclave) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "enclave", "boot", str(hello.path), "--debug", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # it booted and attested; the verdict refuses debug mode
    report = json.loads(done.stdout)
    assert report["DebugMode"] is True and report["Measurements"]["PCR0"] == hello.measurements.pcr0.hex()
    claims = report["Verdict"]["claims"]
    assert claims["debug"] is True and {claims["pcrs"][i] for i in "012"} == {"00" * 48}
    assert "debug-not-allowed" in {r["code"] for r in report["Verdict"]["reasons"]}
    document = base64.b64decode(report["Document"])
    assert verify(document, lab_policy()).codes == {"debug-not-allowed"}  # debug alone is the reason
    assert verify(document, lab_policy(allow_debug=True)).ok


def test_stopping_the_enclave_ends_qemu_the_module_service_and_the_image_files(
    lab: Lab, enclave: GuestBoot
) -> None:
    machine = enclave.machine
    launch = launch_of(machine)
    assert launch is not None and launch.spec.name == VM_NAME
    service = launch.attachment.service
    assert service is not None and service.serving
    assert service.stats.answered >= 4  # describe + attestation, at boot and through the agent
    assert not memfds()  # the kernel and initrd were released once QEMU had loaded them
    lab.stop(machine)
    assert not machine.running and machine.exit_info is not None
    deadline = time.monotonic() + 5
    while service.serving and time.monotonic() < deadline:  # it reads EOF from QEMU's end of the port
        time.sleep(0.01)
    assert not service.serving


def memfds() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [link for link in links if link.startswith("/memfd:teelab-enclave")]
