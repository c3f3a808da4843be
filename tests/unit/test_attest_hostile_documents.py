"""Attestation documents damaged where the parser cannot see it (inside certificates, a timestamp past any
calendar) are refused with reasons; ``verify`` never raises."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import paths
from harness.attest import LabAuthority, Policy, verify


@pytest.fixture(scope="module")
def document_parts() -> tuple[list[object], dict[str, object]]:
    lab = LabAuthority.load_or_create(paths.state_dir() / "lab-ca")
    document = lab.attestation_document(pcrs={0: bytes(48)}, public_key=None, user_data=None, nonce=None,
                                        module_id="hostile")  # fmt: skip
    message = cbor2.loads(document)
    message = list(message.value if isinstance(message, cbor2.CBORTag) else message)
    return message, cbor2.loads(message[2])


def rebuilt(message: list[object], payload: dict[str, object]) -> bytes:
    return cbor2.dumps([*message[:2], cbor2.dumps(payload), message[3]])


def test_a_timestamp_no_calendar_holds_is_malformed(document_parts) -> None:
    message, payload = document_parts
    verdict = verify(rebuilt(message, {**payload, "timestamp": 2**62}), Policy(roots=("lab",)))
    assert not verdict.ok and ("malformed", "timestamp") in [(r.code, r.field) for r in verdict.reasons]


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_bit_flips_inside_the_certificates_are_refused_not_raised(
    document_parts, data: st.DataObject
) -> None:
    message, payload = document_parts
    field = data.draw(st.sampled_from(["certificate", "cabundle"]))
    if field == "certificate":
        der = bytearray(payload["certificate"])  # type: ignore[arg-type]
        at = data.draw(st.integers(0, len(der) - 1))
        der[at] ^= 1 << data.draw(st.integers(0, 7))
        damaged = {**payload, "certificate": bytes(der)}
    else:
        bundle = [bytearray(c) for c in payload["cabundle"]]  # type: ignore[union-attr]
        which = data.draw(st.integers(0, len(bundle) - 1))
        at = data.draw(st.integers(0, len(bundle[which]) - 1))
        bundle[which][at] ^= 1 << data.draw(st.integers(0, 7))
        damaged = {**payload, "cabundle": [bytes(c) for c in bundle]}
    verdict = verify(rebuilt(message, damaged), Policy(roots=("lab",)))
    assert not verdict.ok and verdict.reasons
