"""Evidence fetched inside booted TCG guests (emulated SNP and TDX) verifies with the lab root, and fails with
one distinct reason each for: another measurement, debug, a stale nonce, another root, truncation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import cbor2
import pytest
from teelab_guest.binding import report_data

from harness.attest import LAB, NonceBook, Policy, default_lab_dir, verify
from harness.lab import CvmPlan, GuestBoot, Lab

pytestmark = pytest.mark.vm

SNP_DEBUG = 0x30000 | 1 << 19  # guest policy bit 19: DEBUG
TDX_DEBUG = 1  # TD attribute bit 0: DEBUG
GET_EVIDENCE = """
import sys, cbor2
from teelab_guest.evidence import get_evidence
e = get_evidence(bytes.fromhex(sys.argv[1]))
sys.stdout.buffer.write(cbor2.dumps({"kind": e.kind, "blob": e.blob, "aux": e.aux}))
"""


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Guest:
    plan: CvmPlan
    boot: GuestBoot

    def evidence(self, nonce: bytes, key: bytes) -> dict[str, bytes]:
        assert self.boot.agent is not None
        argv = ["python3", "-c", GET_EVIDENCE, report_data(nonce, key).hex()]
        return cbor2.loads(self.boot.agent.exec(argv, check=True, timeout=60).stdout)


@pytest.fixture(scope="module")
def guests(cvm_image) -> Iterator[dict[str, Guest]]:
    """Four emulated confidential guests: SNP and TDX, each plain and in debug mode."""
    options = {
        "snp": {"kind": "snp"},
        "snp-debug": {"kind": "snp", "policy": SNP_DEBUG},
        "tdx": {"kind": "tdx"},
        "tdx-debug": {"kind": "tdx", "attributes": TDX_DEBUG},
    }
    with Lab() as lab:
        booted = {}
        for name, tee in options.items():
            plan = lab.plan_cvm(
                cvm_image, name=f"reasons-{name}", mode="emulated", vcpus=1, vsock=False, **tee
            )
            booted[name] = Guest(plan, lab.boot_planned(plan))
        yield booted


def reference(plan: CvmPlan) -> dict[str, object]:
    """The policy fields that pin the plan's launch measurement."""
    expected = plan.tee.measurement
    if plan.tee.backend.kind == "snp":
        return {"measurement": expected.measurement}  # type: ignore[union-attr]
    return {"mrtd": expected.mrtd, "rtmrs": dict(enumerate(expected.rtmrs))}  # type: ignore[union-attr]


def other_root(kind: str) -> tuple[str, ...]:
    return ("amd-milan",) if kind.startswith("snp") else ("intel-sgx",)


@pytest.mark.parametrize("kind", ["snp", "tdx"])
def test_each_failure_has_its_own_reason(guests: dict[str, Guest], kind: str) -> None:
    guest, debug_guest = guests[kind], guests[f"{kind}-debug"]
    key = os.urandom(91)  # stands for the guest's public key: only its binding into report_data matters here
    clock = Clock()
    book = NonceBook(ttl=60, clock=clock)

    def attempt(target: Guest, **changes: object) -> tuple[bool, set[str]]:
        nonce = book.issue()
        got = target.evidence(nonce, key)
        assert got["kind"] == kind
        blob = got["blob"]
        if changes.pop("truncate", False):
            blob = blob[: len(blob) // 2]
        if changes.pop("stale", False):
            clock.now += 120
        fields = {"roots": (LAB,), "nonce": nonce, "public_key": key, "nonce_book": book,
                  "lab_dir": default_lab_dir(), **reference(target.plan), **changes}  # fmt: skip
        verdict = verify(blob, Policy(**fields), certificates=got["aux"] or ())
        return verdict.ok, {r.code for r in verdict.reasons}

    assert attempt(guest) == (True, set())
    wrong = {"measurement": bytes(48)} if kind == "snp" else {"mrtd": bytes(48)}
    failures = {
        "measurement": attempt(guest, **wrong),
        "debug": attempt(debug_guest),
        "stale nonce": attempt(guest, stale=True),
        "another root": attempt(guest, roots=other_root(kind)),
        "truncated": attempt(guest, truncate=True),
    }
    for what, (ok, codes) in failures.items():
        assert not ok and codes, what
    only = {what: next(iter(codes)) for what, (_, codes) in failures.items() if len(codes) == 1}
    assert only == {
        "measurement": "measurement-mismatch" if kind == "snp" else "mrtd-mismatch",
        "debug": "debug-not-allowed",
        "stale nonce": "nonce-stale",
        "another root": "untrusted-root",
        "truncated": "truncated",
    }
