"""``describe-eif`` in nitro-cli's JSON shape: version, measurements, signature checks, metadata."""

from __future__ import annotations

import os
from typing import Any

from harness.enclave.eif import EifImage, read_eif


def describe_eif(path: str | os.PathLike[str], *, verify_crc: bool = True) -> dict[str, Any]:
    """Read and check ``path`` and describe it (raises E901-E911 for a bad image)."""
    return describe_image(read_eif(path, verify_crc=verify_crc))


def describe_image(image: EifImage) -> dict[str, Any]:
    """nitro-cli's EifDescribeInfo: EifVersion, Measurements, IsSigned, [SigningCertificate], CheckCRC,
    [SignatureCheck], ImageName, ImageVersion, Metadata (BuildMetadata, DockerInfo, custom keys flattened)."""
    info: dict[str, Any] = {
        "EifVersion": image.version,
        "Measurements": image.measurements.to_dict(),
        "IsSigned": image.is_signed,
    }
    if image.signature is not None:
        info["SigningCertificate"] = image.signature.info
    info["CheckCRC"] = image.crc_ok
    if image.signature is not None:
        info["SignatureCheck"] = image.signature_problem is None
    if image.metadata is not None:
        metadata = image.metadata
        info["ImageName"] = metadata["ImageName"]
        info["ImageVersion"] = metadata["ImageVersion"]
        described = dict(metadata["BuildMetadata"])
        described["DockerInfo"] = metadata.get("DockerInfo")
        custom = metadata.get("CustomMetadata")
        if isinstance(custom, dict):
            described.update(custom)
        elif custom is not None:
            described["CustomMetadata"] = custom
        info["Metadata"] = described
    return info
