"""vTPM attestation against a real swtpm (no VM): the guest's own code measures, creates and activates its AK
and quotes; the AK CA certifies by credential activation; ``verify_tpm`` names every refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from teelab_guest import binding, tpm_attest, tpm_boot, tpm_wire
from teelab_guest.tpm_device import Tpm, TpmError
from tpm_sim import swtpm

from harness.attest import LabAuthority
from harness.attest.policy import NonceBook, Policy
from harness.attest.tpm import TpmEvidence
from harness.attest.tpm_ca import TpmAuthority
from harness.attest.verifier import detect_kind, verify
from harness.attest.verify_tpm import verify_tpm
from harness.tee import tpm_measure
from harness.tee.errors import VtpmAttestationFailed
from harness.tee.vtpm_attest import CertifiedAk, certify_ak, quote

CMDLINE = "console=ttyS0 quiet teelab.role=cvm"


@pytest.fixture(scope="module")
def authority(lab: LabAuthority) -> TpmAuthority:
    return TpmAuthority.load_or_create(lab.directory / "tpm")


def guest_tree(root: Path, cmdline: str = CMDLINE) -> Path:
    """A guest's measured files (what an image's initramfs holds) and its /proc/cmdline."""
    files = {
        "init": b"#!/usr/bin/python3.11 -IS\n",
        "etc/teelab/modules": b"virtio_pci\n",
        "usr/lib/python3/dist-packages/teelab_guest/init.py": b"print('init')\n",
        "lib/modules/teelab/virtio_pci.ko": b"\x7fELF module",
        "usr/bin/python3.11": b"not measured",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "cmdline").write_text(cmdline + "\n")
    return root


def pack(root: Path, output: Path) -> Path:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "cmdline")
    with open(output, "wb") as out:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], input="\n".join(names).encode(), stdout=out,
                       cwd=root, check=True)  # fmt: skip
    return output


@dataclasses.dataclass
class Guest:
    tpm: Tpm
    event_log: Path

    def __call__(self, args: Sequence[str]) -> dict[str, Any]:
        return tpm_attest.run(self.tpm, list(args), event_log=str(self.event_log))


@pytest.fixture(scope="module")
def booted(authority: TpmAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guest, Path]]:
    """A TPM whose 'guest' measured guest_tree at boot; the tree's initramfs beside it."""
    root = guest_tree(tmp_path_factory.mktemp("guest"))
    log = root.parent / "events.json"
    with swtpm(authority) as tpm:
        tpm_boot.measure_boot(
            tpm.pcr_extend, tpm_boot.boot_events(str(root), str(root / "cmdline")), str(log)
        )
        yield Guest(tpm, log), pack(root, root.parent / "initrd.cpio")


@pytest.fixture(scope="module")
def ak(booted: tuple[Guest, Path], authority: TpmAuthority) -> CertifiedAk:
    return certify_ak(booted[0], authority)


def policy(lab: LabAuthority, nonce: bytes, **changes: Any) -> Policy:
    if "initrd" in changes:
        changes["pcrs"] = tpm_measure.predict(CMDLINE, changes.pop("initrd")).pcrs
    return Policy(roots=("lab",), lab_dir=lab.directory, nonce=nonce, **changes)


def test_prediction_equals_the_pcrs_the_guest_measured(booted: tuple[Guest, Path]) -> None:
    guest, initrd = booted
    predicted = tpm_measure.predict(CMDLINE, initrd)
    assert guest.tpm.pcr_read(list(tpm_boot.QUOTED_PCRS)) == predicted.pcrs
    assert predicted.pcrs[8] != bytes(32) and predicted.pcrs[9] != bytes(32)
    assert [e["type"] for e in predicted.events] == ["kernel-cmdline", "guest-init", "kernel-modules"]
    assert "usr/bin/python3.11" not in str(predicted.events)


def test_a_quote_from_the_measured_tpm_verifies(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    guest, initrd = booted
    book = NonceBook()
    nonce = book.issue()
    evidence = quote(guest, ak, nonce)
    verdict = verify_tpm(evidence.to_bytes(), policy(lab, nonce, initrd=initrd, nonce_book=book))
    assert verdict.ok, verdict.reasons
    assert verdict.root == "lab" and verdict.claims["cmdline"] == CMDLINE
    assert verdict.claims["nonce"] == nonce.hex()
    replayed = verify_tpm(evidence.to_bytes(), policy(lab, nonce, initrd=initrd, nonce_book=book))
    assert replayed.codes == {"nonce-reused"}


@pytest.mark.parametrize("changed", ["cmdline", "guest-init", "kernel-modules"])
def test_a_changed_measured_input_is_refused_naming_its_pcr(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority, tmp_path: Path, changed: str
) -> None:
    """The policy predicted from other inputs: one command-line word, one guest-init byte, one module byte."""
    root = guest_tree(tmp_path / "other", CMDLINE)
    cmdline = CMDLINE
    if changed == "cmdline":
        cmdline += " debug"
    else:
        name = (
            "usr/lib/python3/dist-packages/teelab_guest/init.py"
            if changed == "guest-init"
            else "lib/modules/teelab/virtio_pci.ko"
        )
        (root / name).write_bytes((root / name).read_bytes() + b"#")
    expected = tpm_measure.predict(cmdline, pack(root, tmp_path / "other.cpio")).pcrs
    nonce = os.urandom(32)
    verdict = verify_tpm(quote(booted[0], ak, nonce).to_bytes(), policy(lab, nonce, pcrs=expected))
    want = "pcr8" if changed == "cmdline" else "pcr9"
    assert not verdict.ok
    assert {(r.code, r.field) for r in verdict.reasons} == {("pcr-mismatch", want)}


def test_a_wrong_nonce_and_a_replayed_nonce_have_their_own_reasons(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    evidence = quote(booted[0], ak, b"n" * 32).to_bytes()
    assert verify_tpm(evidence, policy(lab, b"m" * 32)).codes == {"nonce-mismatch"}
    book = NonceBook()
    nonce = book.issue()
    evidence = quote(booted[0], ak, nonce).to_bytes()
    assert verify_tpm(evidence, policy(lab, nonce, nonce_book=book)).ok
    assert verify_tpm(evidence, policy(lab, nonce, nonce_book=book)).codes == {"nonce-reused"}


def test_a_foreign_ek_is_refused(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority, tmp_path: Path
) -> None:
    """An EK certificate of another TPM manufacturer (its own CA, not the lab's) in place of the guest's."""
    foreign_ca = TpmAuthority.load_or_create(tmp_path / "foreign")
    with swtpm(foreign_ca, "foreign") as other:
        foreign_ek = other.nv_read(0x01C00002)
    nonce = os.urandom(32)
    evidence = dataclasses.replace(quote(booted[0], ak, nonce), ek_certificate=foreign_ek)
    verdict = verify_tpm(evidence.to_bytes(), policy(lab, nonce))
    assert "ek-untrusted" in verdict.codes
    assert verdict.fields() >= {"ek_certificate"}


def test_an_ak_not_certified_for_this_ek_is_refused(
    booted: tuple[Guest, Path], ak: CertifiedAk, authority: TpmAuthority, lab: LabAuthority
) -> None:
    """The lab AK CA's certificate for the quoting AK but naming another EK (the manufacturer's own
    certificate stands in for it), one for another key, and the EK certificate itself as the AK's."""
    nonce = os.urandom(32)
    evidence = quote(booted[0], ak, nonce)
    key = ak.ak_certificate.public_key
    other_ek = authority.certs["tpm-manufacturer"]
    name = bytes.fromhex(verify_tpm(evidence.to_bytes(), policy(lab, nonce)).claims["ak_name"])
    wrong_ek = authority.issue_ak_certificate(key, other_ek, name)
    verdict = verify_tpm(
        dataclasses.replace(evidence, ak_certificate=wrong_ek.der).to_bytes(), policy(lab, nonce)
    )
    assert verdict.codes == {"ak-not-certified"}
    wrong_key = authority.issue_ak_certificate(
        ec.generate_private_key(ec.SECP256R1()).public_key(), ak.ek_certificate, name
    )
    verdict = verify_tpm(
        dataclasses.replace(evidence, ak_certificate=wrong_key.der).to_bytes(), policy(lab, nonce)
    )
    assert verdict.codes == {"ak-not-certified"}
    verdict = verify_tpm(
        dataclasses.replace(evidence, ak_certificate=ak.ek_certificate.der).to_bytes(), policy(lab, nonce)
    )
    assert "ak-not-certified" in verdict.codes and "ek-untrusted" not in verdict.codes


def test_signature_pcr_values_and_event_log_tampering_are_named(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    nonce = os.urandom(32)
    evidence = quote(booted[0], ak, nonce)
    signature = bytearray(evidence.signature)
    signature[-1] ^= 1
    bad = dataclasses.replace(evidence, signature=bytes(signature))
    assert verify_tpm(bad.to_bytes(), policy(lab, nonce)).codes == {"quote-signature-invalid"}
    pcrs = dict(evidence.pcrs) | {9: bytes(32)}
    verdict = verify_tpm(dataclasses.replace(evidence, pcrs=pcrs).to_bytes(), policy(lab, nonce))
    assert {(r.code, r.field) for r in verdict.reasons} == {
        ("pcr-digest-mismatch", "pcrs"),
        ("event-log-mismatch", "pcr9"),
    }
    events = [dict(e) for e in evidence.event_log]
    events[0]["data"] = CMDLINE + " debug"  # the log says another command line than the one measured
    verdict = verify_tpm(
        dataclasses.replace(evidence, event_log=tuple(events)).to_bytes(), policy(lab, nonce)
    )
    assert {(r.code, r.field) for r in verdict.reasons} == {("event-log-mismatch", "event_log[0]")}
    events[0] = tpm_boot.cmdline_event(CMDLINE + " debug")  # and its digest with it: the replay fails
    verdict = verify_tpm(
        dataclasses.replace(evidence, event_log=tuple(events)).to_bytes(), policy(lab, nonce)
    )
    assert {(r.code, r.field) for r in verdict.reasons} == {("event-log-mismatch", "pcr8")}


def test_the_ak_ca_refuses_an_ak_that_cannot_activate_the_credential(
    booted: tuple[Guest, Path], authority: TpmAuthority
) -> None:
    """A guest presenting another vTPM's EK certificate (from the same lab manufacturer CA) cannot recover a
    credential made for that EK: no AK certificate."""
    guest = booted[0]
    with swtpm(authority, "other") as other:
        other_ek = other.nv_read(0x01C00002)

    def activating(args: Sequence[str]) -> dict[str, Any]:
        if args[0] == "ak":
            return guest(args) | {"ek_certificate": tpm_attest.b64(other_ek)}
        try:
            return guest(args)
        except TpmError:  # the TPM refuses ActivateCredential: the secret was not sealed to its EK
            return {}

    with pytest.raises(VtpmAttestationFailed) as err:
        certify_ak(activating, authority)
    assert err.value.code == "E962" and "did not recover" in str(err.value)


def test_malformed_evidence_is_a_verdict_not_an_exception(lab: LabAuthority) -> None:
    verdict = verify_tpm(b'{"format": "teelab-tpm-evidence/1"}', policy(lab, b"n"))
    assert not verdict.ok and verdict.codes == {"malformed"}
    empty = TpmEvidence(b"", b"", b"", b"", b"", {})
    assert verify_tpm(empty.to_bytes(), policy(lab, b"n")).codes == {"malformed"}


def test_verify_detects_tpm_evidence_and_the_cli_verifies_it(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority, tmp_path: Path, run: Callable[..., Any]
) -> None:
    guest, initrd = booted
    nonce = os.urandom(32)
    evidence = quote(guest, ak, nonce).to_bytes()
    assert detect_kind(evidence) == "tpm"
    good = policy(lab, nonce, initrd=initrd)
    assert verify(evidence, good).ok
    assert verify(evidence, dataclasses.replace(good, mrtd=bytes(48))).codes == {"policy-kind-mismatch"}
    pinned = dataclasses.replace(good, measurement=bytes(48))
    assert verify(evidence, pinned).codes == {"tee-evidence-missing"}
    (tmp_path / "evidence.json").write_bytes(evidence)
    pcrs = "\n".join(f'{i} = "{v.hex()}"' for i, v in good.pcrs.items())
    (tmp_path / "policy.toml").write_text(
        f'roots = ["lab"]\nlab_dir = "{lab.directory}"\nnonce = "{nonce.hex()}"\n[pcrs]\n{pcrs}\n'
    )
    status, out, _ = run(
        "attest",
        "verify",
        str(tmp_path / "evidence.json"),
        "--policy",
        str(tmp_path / "policy.toml"),
        "--json",
    )
    assert status == 0 and json.loads(out)["ok"] and json.loads(out)["kind"] == "tpm"
    (tmp_path / "policy.toml").write_text(
        f'roots = ["lab"]\nlab_dir = "{lab.directory}"\nnonce = "{"00" * 32}"\n'
    )
    status, out, _ = run(
        "attest",
        "verify",
        str(tmp_path / "evidence.json"),
        "--policy",
        str(tmp_path / "policy.toml"),
        "--json",
    )
    assert status != 0 and [r["code"] for r in json.loads(out)["reasons"]] == ["nonce-mismatch"]


def test_a_cvm_report_beside_the_quote_must_bind_its_nonce_and_ak(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    """One verdict for a CVM and its vTPM: the SNP report's report_data binds the quote's nonce and the AK
    (as Azure's paravisor binds its vTPM's AK); a report binding another key, or another measurement, fails
    under ``tee.``."""
    nonce = os.urandom(32)
    evidence = quote(booted[0], ak, nonce)
    spki = tpm_wire.ak_spki_der(tpm_wire.parse_ecc_public(evidence.ak_public))
    measurement = bytes.fromhex("ab" * 48)

    def with_report(key: bytes) -> bytes:
        report = lab.snp_report(binding.report_data(nonce, key), measurement=measurement)
        return dataclasses.replace(
            evidence, tee_evidence=report, tee_certificates=lab.snp_cert_table()
        ).to_bytes()

    cvm = policy(lab, nonce, measurement=measurement)
    verdict = verify(with_report(spki), cvm)
    assert verdict.ok, verdict.reasons
    assert verdict.claims["tee"]["measurement"] == measurement.hex()
    other_key = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    assert {(r.code, r.field) for r in verify(with_report(other_key), cvm).reasons} == {
        ("binding-mismatch", "tee.report_data")
    }
    other = dataclasses.replace(cvm, measurement=bytes(48))
    assert {(r.code, r.field) for r in verify(with_report(spki), other).reasons} == {
        ("measurement-mismatch", "tee.measurement")
    }


def test_guest_inits_lean_extend_is_the_device_modules_command() -> None:
    """guest-init marshals PCR_Extend itself (its boot path imports nothing more): the same bytes."""
    sent: list[bytes] = []

    def transact(command: bytes) -> bytes:
        sent.append(command)
        return bytes.fromhex("80010000000a00000000")

    Tpm(transact).pcr_extend(16, b"\x11" * 32)
    assert sent == [tpm_boot.pcr_extend_command(16, b"\x11" * 32)]


def test_every_flipped_or_cut_byte_of_the_quote_and_signature_is_refused_without_raising(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    """The AK signs every byte of TPMS_ATTEST: one flipped bit anywhere, or a cut, is refused; never an
    exception, never ok."""
    nonce = os.urandom(32)
    evidence = quote(booted[0], ak, nonce)
    good = policy(lab, nonce)
    assert verify_tpm(evidence.to_bytes(), good).ok
    for name in ("quote", "signature", "ak_public"):
        value: bytes = getattr(evidence, name)
        variants = [value[:i] + bytes([value[i] ^ 1 << (i % 8)]) + value[i + 1 :] for i in range(len(value))]
        variants += [value[:cut] for cut in range(0, len(value), 7)] + [value + b"\0"]
        for variant in variants:
            verdict = verify_tpm(dataclasses.replace(evidence, **{name: variant}).to_bytes(), good)
            assert not verdict.ok, (name, variant.hex())


def test_an_ek_certificate_with_a_broken_signature_is_untrusted(
    booted: tuple[Guest, Path], ak: CertifiedAk, lab: LabAuthority
) -> None:
    """The EK's own key usage (encryption only) is the one leaf problem tolerated; its signature is not."""
    nonce = os.urandom(32)
    evidence = quote(booted[0], ak, nonce)
    der = bytearray(evidence.ek_certificate)
    der[-3] ^= 0x01  # inside the ECDSA signature value, the last field of the certificate
    verdict = verify_tpm(
        dataclasses.replace(evidence, ek_certificate=bytes(der)).to_bytes(), policy(lab, nonce)
    )
    assert "ek-untrusted" in verdict.codes and any("chain-invalid" in r.message for r in verdict.reasons)
