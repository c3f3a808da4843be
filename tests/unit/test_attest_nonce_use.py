"""A nonce is used up only by evidence that is authentic so far: forged, malformed or revoked evidence cannot
burn a real nonce."""

from __future__ import annotations

import pytest

from harness.attest import NonceBook, Policy
from harness.attest.checks import Findings, check_nonce_book


@pytest.mark.parametrize(
    "failure", ["signature-invalid", "malformed", "untrusted-root", "certificate-revoked"]
)
def test_unauthentic_evidence_leaves_the_nonce_unused(failure: str) -> None:
    book = NonceBook()
    nonce = book.issue()
    found = Findings()
    found.fail(failure, "evidence", "made up for the test")
    check_nonce_book(found, Policy(nonce_book=book), nonce)
    assert book.check(nonce) is None, "the nonce was used up"


def test_authentic_evidence_uses_the_nonce_up_once() -> None:
    book = NonceBook()
    nonce = book.issue()
    found = Findings()
    found.fail("measurement-mismatch", "measurement", "authentic, but not what the policy wants")
    check_nonce_book(found, Policy(nonce_book=book), nonce)
    assert book.check(nonce) == "nonce-reused"
