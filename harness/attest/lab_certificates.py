"""The lab CA's public side: where it lives, its certificates by name, and loading them without its keys
(what a verifier needs to trust the lab root when a policy names it)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import paths
from harness.attest.certs import Anchor, Cert, load_pem_certs
from harness.attest.errors import EvidenceError, LabAuthorityError
from harness.attest.lab_collateral import (
    COLLATERAL_FILE,
    SGX_COLLATERAL_FILE,
)
from harness.attest.snp import TcbVersion

LAB_FORMAT = 1
MANIFEST = "authority.json"
LOCK_FILE = ".lock"
DEFAULT_TCB = TcbVersion(bootloader=4, tee=0, snp=22, microcode=213)
# Lab certificates are valid from this date, so evidence pinned to earlier test times still verifies.
LAB_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
# The certificates, in the order a person would read them; keys carry the same names.
CERT_NAMES = (
    "amd-ark",
    "amd-ask",
    "intel-root",
    "intel-pck-ca",
    "intel-pck",
    "enclave-root",
    "enclave-ca",
    "enclave-leaf",
)
KEY_NAMES = (*CERT_NAMES, "intel-qe-ak")
# Issued on first load (so lab CAs made before TDX collateral existed get them too): the PCK leaf with its SGX
# extension, which lab quotes carry, and the TCB signing certificate of the lab collateral.
PCK_SGX = "intel-pck-sgx"
TCB_SIGNING = "intel-tcb-signing"


def default_lab_dir() -> Path:
    """Where the lab CA lives unless told otherwise: ``lab-ca`` under the state dir."""
    return paths.state_dir() / "lab-ca"


# --- public material: what a verifier needs ---------------------------------------------------------------
@dataclass(frozen=True)
class LabCertificates:
    """The lab CA's certificates and chip facts, read from its directory (never its keys)."""

    directory: Path
    certs: Mapping[str, Cert]
    chip_id: bytes
    tcb: TcbVersion
    _vceks: dict[TcbVersion, Cert] = field(default_factory=dict, compare=False, repr=False)

    def anchors(self) -> tuple[Anchor, ...]:
        return (
            Anchor("lab", "snp", self.certs["amd-ark"]),
            Anchor("lab", "tdx", self.certs["intel-root"]),
            Anchor("lab", "nitro", self.certs["enclave-root"]),
        )

    def intermediates(self) -> tuple[Cert, ...]:
        return (self.certs["amd-ask"], self.certs["intel-pck-ca"], self.certs["enclave-ca"])

    def tdx_collateral(self) -> dict[str, Any] | None:
        """The lab's TDX collateral (PCS JSON shape) for lab quotes, once a LabAuthority has issued it."""
        return self._collateral(COLLATERAL_FILE)

    def sgx_collateral(self) -> dict[str, Any] | None:
        """The lab's SGX collateral (SGX TCB info, the QE identity) for lab SGX quotes, once issued."""
        return self._collateral(SGX_COLLATERAL_FILE)

    def _collateral(self, file: str) -> dict[str, Any] | None:
        try:
            text = (self.directory / file).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise unusable(self.directory, f"{file} unreadable ({exc})") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise unusable(self.directory, f"{file} is not JSON ({exc})") from None
        return value if isinstance(value, dict) else None

    def vcek(self, tcb: TcbVersion) -> Cert | None:
        """The lab VCEK for ``tcb``, if the lab has issued one (one per TCB, as AMD's KDS does)."""
        cached = self._vceks.get(tcb)
        if cached is None:
            try:
                cached = read_cert(self.directory, vcek_file(tcb))
            except FileNotFoundError:
                return None
            self._vceks[tcb] = cached
        return cached


def vcek_file(tcb: TcbVersion) -> str:
    return f"amd-vcek-{tcb.to_bytes().hex()}.pem"


def unusable(directory: Path, problem: str) -> LabAuthorityError:
    hint = f"remove {directory} to make a new lab CA"
    return LabAuthorityError(f"lab CA in {directory}: {problem}", hint=hint)


def read_cert(directory: Path, file: str) -> Cert:
    """The certificate in a PEM file of the lab CA: FileNotFoundError if it is absent, E820 if unusable."""
    try:
        certs = load_pem_certs((directory / file).read_bytes(), field=file)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise unusable(directory, f"{file} unreadable ({exc})") from None
    except EvidenceError as err:
        raise unusable(directory, err.message) from None
    if not certs:
        raise unusable(directory, f"{file} holds no certificate")
    return certs[0]


_public_cache: dict[Path, tuple[tuple[int, int, int], LabCertificates]] = {}


def load_lab_certificates(directory: Path | str) -> LabCertificates | None:
    """The lab CA in ``directory``, or None if none was created there (cached by absolute path until its
    manifest is replaced or changes)."""
    directory = Path(directory).absolute()
    try:
        info = (directory / MANIFEST).stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise unusable(directory, f"{MANIFEST} unreadable ({exc})") from None
    stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
    cached = _public_cache.get(directory)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    manifest = read_manifest(directory)
    try:
        fingerprints = dict(manifest["certs"])
        chip_id = bytes.fromhex(manifest["chip_id"])
        tcb = bytes.fromhex(manifest["tcb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise unusable(directory, f"{MANIFEST} is incomplete ({type(exc).__name__}: {exc})") from None
    if len(tcb) != 8:
        raise unusable(directory, f"{MANIFEST} has a TCB of {len(tcb)} bytes, not 8")
    loaded = {}
    for name in CERT_NAMES:
        try:
            cert = read_cert(directory, f"{name}.pem")
        except FileNotFoundError as exc:
            raise unusable(directory, f"lacks {name}.pem ({exc})") from None
        if cert.fingerprint != fingerprints.get(name):
            raise unusable(directory, f"{name}.pem does not match {MANIFEST}")
        loaded[name] = cert
    public = LabCertificates(
        directory=directory, certs=loaded, chip_id=chip_id, tcb=TcbVersion.from_bytes(tcb)
    )
    _public_cache[directory] = (stamp, public)
    return public


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise unusable(directory, f"{MANIFEST} unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise unusable(directory, f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != LAB_FORMAT:
        raise unusable(directory, f"format {manifest.get('format')!r}, this teelab uses {LAB_FORMAT}")
    return manifest


# --- the authority: keys and issuers ----------------------------------------------------------------------
