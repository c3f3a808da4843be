"""Roots of trust by name: vendor roots and intermediates shipped as data files with pinned SHA-256."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from harness.attest.certs import Anchor, Cert, load_pem_certs
from harness.attest.errors import AttestError

DATA_DIR = Path(__file__).parent / "data"
LAB = "lab"


@dataclass(frozen=True)
class VendorRoot:
    name: str
    kind: str
    file: str
    sha256: str
    description: str


VENDOR_ROOTS: tuple[VendorRoot, ...] = (
    VendorRoot(
        "amd-milan",
        "snp",
        "amd-milan-ark.pem",
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "AMD ARK-Milan: SEV-SNP on EPYC 7003 (VCEK via ASK SEV-Milan, VLEK via ASVK SEV-VLEK-Milan)",
    ),
    VendorRoot(
        "amd-genoa",
        "snp",
        "amd-genoa-ark.pem",
        "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "AMD ARK-Genoa: SEV-SNP on EPYC 9004 (VCEK via ASK SEV-Genoa, VLEK via ASVK SEV-VLEK-Genoa)",
    ),
    VendorRoot(
        "intel-sgx",
        "tdx",
        "intel-sgx-root-ca.pem",
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
        "Intel SGX Root CA: DCAP PCK chains of TDX quotes",
    ),
    VendorRoot(
        "aws-nitro",
        "nitro",
        "aws-nitro-root-g1.pem",
        "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
        "AWS Nitro Enclaves Root G1: attestation documents of Nitro enclaves",
    ),
)
# Intermediates the vendors publish (AMD KDS cert_chain); evidence rarely carries them.
VENDOR_INTERMEDIATES: dict[str, str] = {
    "amd-milan-ask.pem": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    "amd-milan-asvk.pem": "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    "amd-genoa-ask.pem": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    "amd-genoa-asvk.pem": "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
}
VENDOR_ROOT_NAMES: tuple[str, ...] = tuple(r.name for r in VENDOR_ROOTS)
ROOT_NAMES: tuple[str, ...] = (*VENDOR_ROOT_NAMES, LAB)


def _load_pinned(file: str, sha256: str) -> Cert:
    certs = load_pem_certs((DATA_DIR / file).read_bytes(), field=file)
    if len(certs) != 1 or certs[0].fingerprint != sha256:
        raise AttestError(
            f"vendor certificate {file} does not have its pinned SHA-256 {sha256}",
            hint="reinstall teelab; the package's data files were changed",
            file=str(DATA_DIR / file),
        )
    return certs[0]


@functools.cache
def vendor_anchors() -> tuple[Anchor, ...]:
    return tuple(Anchor(r.name, r.kind, _load_pinned(r.file, r.sha256)) for r in VENDOR_ROOTS)


@functools.cache
def vendor_intermediates() -> tuple[Cert, ...]:
    return tuple(_load_pinned(file, sha) for file, sha in VENDOR_INTERMEDIATES.items())
