"""A cache of Intel PCS collateral read from disk, looked up by the TEE (TDX or SGX) and the FMSPC of a
quote's PCK certificate."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.attest.certs import load_pem_certs
from harness.attest.collateral import parse_collateral, pck_extensions
from harness.attest.errors import CollateralError, EvidenceError, EvidenceFileError
from harness.attest.sgx import looks_like_sgx, parse_sgx_quote
from harness.attest.tdx import parse_tdx_quote


class CollateralCache:
    """Collateral by TCB info id ("TDX" or "SGX": one platform has both) and FMSPC (upper-case hex), from a
    JSON file holding one collateral object or a list of them, or a directory of such files; every entry is
    decoded when loaded, so a bad cache fails at once."""

    def __init__(self, entries: Mapping[tuple[str, str], Mapping[str, Any]]) -> None:
        self.entries = dict(entries)

    @classmethod
    def load(cls, path: Path | str) -> CollateralCache:
        """Read ``path``; E830 if it cannot be read, E805 naming the file if an entry is not collateral."""
        path = Path(path)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        entries: dict[tuple[str, str], Mapping[str, Any]] = {}
        for file in files:
            try:
                value = json.loads(file.read_text())
            except OSError as exc:
                raise EvidenceFileError(
                    f"cannot read TDX collateral {file}: {exc.strerror or exc}", path=str(file)
                ) from None
            except (ValueError, RecursionError) as exc:
                raise CollateralError(
                    f"TDX collateral {file} is not JSON ({exc})", field="collateral", path=str(file)
                ) from None
            for item in value if isinstance(value, list) else [value]:
                try:
                    tcb_info = parse_collateral(item).tcb_info
                    entries[str(tcb_info.get("id")), str(tcb_info.get("fmspc", "")).upper()] = item
                except CollateralError as err:
                    raise CollateralError(
                        f"TDX collateral {file}: {err.message}", field=err.field, path=str(file)
                    ) from None
        if not entries:
            raise CollateralError(f"no TDX collateral in {path}", field="collateral", path=str(path))
        return cls(entries)

    def for_quote(self, quote: bytes) -> Mapping[str, Any] | None:
        """The collateral for the platform whose PCK certificate signed ``quote``; None if there is none or
        the quote's PCK certificate cannot be read (the verifier then names what is wrong)."""
        sgx = looks_like_sgx(quote)
        try:
            parsed = parse_sgx_quote(quote) if sgx else parse_tdx_quote(quote)
            chain = load_pem_certs(parsed.pck_chain_pem, field="pck_chain")
            fmspc = pck_extensions(chain[0]).fmspc if chain else None
        except EvidenceError:
            return None
        return None if fmspc is None else self.entries.get(("SGX" if sgx else "TDX", fmspc.hex().upper()))
