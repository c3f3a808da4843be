"""An enclave image with words added to its kernel command line: the way a measured value that changes per
deployment (the KMS CA's pin, ``teelab.kms_ca=sha256:<hex>``) enters an enclave, and the smallest
modification of an image (a word more), which moves PCR0 and PCR1 and nothing else."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.enclave.eif import EifImage, read_eif
from harness.enclave.eif_build import build_eif
from harness.enclave.errors import EnclaveRecipeInvalid
from harness.enclave.recipes import ROLE, is_cmdline_word


def with_cmdline_words(eif_path: str | os.PathLike[str], words: Sequence[str], output: Path) -> EifImage:
    """Write the image at ``eif_path`` with ``words`` added to its command line (before ``teelab.role=``) to
    ``output``: the same kernel, ramdisks, name, version and metadata, so only PCR0 and PCR1 move.
    E931 for a word with spaces, quotes or control characters."""
    bad = [w for w in words if not is_cmdline_word(w)]
    if bad:
        raise EnclaveRecipeInvalid(
            f"command line words {bad!r} are not plain words",
            hint="use key=value words without spaces or quotes",
        )
    source = read_eif(eif_path)
    metadata = source.metadata or {}
    base = source.cmdline.decode().split()
    role = f"teelab.role={ROLE}"
    cmdline = " ".join([*(w for w in base if w != role), *words, role])
    custom = dict(metadata.get("CustomMetadata") or {})
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".variant-") as tmp:
        kernel = source.write_kernel(Path(tmp) / "kernel")
        ramdisks = []
        for index, section in enumerate(source.ramdisks):
            path = Path(tmp) / f"ramdisk{index}"
            with open(path, "wb") as out:
                for chunk in source.section_chunks(section):
                    out.write(chunk)
            ramdisks.append(path)
        return build_eif(
            output, kernel=kernel, cmdline=cmdline, ramdisks=ramdisks, name=metadata.get("ImageName"),
            version=metadata.get("ImageVersion") or "1.0", custom_metadata=custom,
        )  # fmt: skip
