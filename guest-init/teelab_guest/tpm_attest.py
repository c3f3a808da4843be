"""The guest's side of vTPM attestation, run by the host through the agent: ``python3 -m
teelab_guest.tpm_attest VERB ...`` prints one JSON object.

- ``ak``: the EK certificate (from TPM NV) and the AK's public area and name; the AK is a primary key of the
  endorsement hierarchy, so making it again gives the same key;
- ``activate BLOB SECRET`` (base64): TPM2_ActivateCredential with the EK, the credential back as base64;
- ``quote NONCE [tee]`` (hex): a quote of PCRs 0-9 by the AK with ``NONCE`` as extraData, the PCR values and
  the event log guest-init wrote; with ``tee``, the CVM's SNP/TDX evidence too, whose report_data binds the
  nonce and the AK (``binding.report_data(nonce, AK SubjectPublicKeyInfo)``).
"""

from __future__ import annotations

import base64
import json
import sys

from teelab_guest import binding, tpm_wire
from teelab_guest.tpm_boot import EVENT_LOG, QUOTED_PCRS
from teelab_guest.tpm_device import RSA_EK_CERT_INDEX, AttestationKey, Tpm


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(tpm: Tpm, argv: list[str], event_log: str = EVENT_LOG) -> dict[str, object]:
    verb, args = argv[0], argv[1:]
    ak = tpm.create_ak()
    try:
        return _answer(tpm, ak, verb, args, event_log)
    finally:
        tpm.flush(ak.handle)


def _answer(tpm: Tpm, ak: AttestationKey, verb: str, args: list[str], event_log: str) -> dict[str, object]:
    if verb == "ak":
        ek_cert = tpm.nv_read(RSA_EK_CERT_INDEX)
        return {"ek_certificate": b64(ek_cert), "ak_public": b64(ak.public), "ak_name": ak.name.hex()}
    if verb == "activate":
        blob, secret = (base64.b64decode(a) for a in args)
        return {"credential": b64(tpm.activate_credential(ak, blob, secret))}
    if verb == "quote":
        nonce = bytes.fromhex(args[0])
        quoted, signature = tpm.quote(ak, nonce, list(QUOTED_PCRS))
        try:
            with open(event_log) as handle:
                events = json.load(handle)
        except FileNotFoundError:
            events = []
        answer = {
            "quote": b64(quoted),
            "signature": b64(signature),
            "pcrs": {str(i): v.hex() for i, v in tpm.pcr_read(list(QUOTED_PCRS)).items()},
            "event_log": events,
        }
        if args[1:] == ["tee"]:
            from teelab_guest.evidence import get_evidence

            spki = tpm_wire.ak_spki_der(tpm_wire.parse_ecc_public(ak.public))
            evidence = get_evidence(binding.report_data(nonce, spki))
            answer |= {"tee_evidence": b64(evidence.blob), "tee_certificates": b64(evidence.aux or b"")}
        return answer
    raise SystemExit(f"unknown verb {verb!r}; use ak, activate BLOB SECRET or quote NONCE [tee]")


def main() -> None:
    with Tpm.open() as tpm:
        print(json.dumps(run(tpm, sys.argv[1:])))


if __name__ == "__main__":
    main()
