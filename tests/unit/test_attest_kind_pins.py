"""A policy written for one kind of evidence does not pass evidence of another kind: its pins are unmet."""

from __future__ import annotations

import pytest

from harness.attest import LAB, LabAuthority, Policy, verify


@pytest.fixture(scope="module")
def evidence(lab: LabAuthority) -> dict[str, bytes]:
    return {
        "snp": lab.snp_report(bytes(64), measurement=b"\x11" * 48),
        "tdx": lab.tdx_quote(bytes(64), mrtd=b"\x22" * 48, rtmrs=[bytes(48)] * 4),
        "nitro": lab.attestation_document(
            pcrs={0: b"\x33" * 48}, public_key=None, user_data=None, nonce=None, module_id="pins"
        ),
    }


PINS = {
    "snp": {"measurement": b"\x11" * 48},
    "tdx": {"mrtd": b"\x22" * 48},
    "nitro": {"pcrs": {0: b"\x33" * 48}},
}


@pytest.mark.parametrize("kind", PINS)
@pytest.mark.parametrize("written_for", PINS)
def test_pins_hold_only_for_their_own_kind(evidence, lab: LabAuthority, kind: str, written_for: str) -> None:
    policy = Policy(roots=(LAB,), lab_dir=lab.directory, **PINS[written_for])  # type: ignore[arg-type]
    verdict = verify(evidence[kind], policy)
    if kind == written_for:
        assert verdict.ok, verdict.reasons
    else:
        assert not verdict.ok
        assert [(r.code, r.field) for r in verdict.reasons] == [
            ("policy-kind-mismatch", next(iter(PINS[written_for])))
        ]
