"""Hypothesis fuzzing: the four parsers (and verify) meet mutated and random bytes with coded E8xx errors
only; no IndexError, struct.error, ValueError or CBOR error escapes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.attest import (
    EvidenceError,
    LabAuthority,
    Policy,
    Verdict,
    default_lab_dir,
    parse_attestation_document,
    parse_snp_cert_table,
    parse_snp_report,
    parse_tdx_quote,
    verify,
)
from harness.attest.sgx import parse_sgx_quote

VECTORS = Path(__file__).parents[1] / "vectors"
SAMPLES = {
    "snp": [p.read_bytes() for p in sorted((VECTORS / "snp").rglob("report.bin"))],
    "tdx": [p.read_bytes() for p in sorted((VECTORS / "tdx").rglob("quote.bin"))],
    "sgx": [p.read_bytes() for p in sorted((VECTORS / "sgx").rglob("quote.bin"))],
    "nitro": [p.read_bytes() for p in sorted((VECTORS / "nitro").rglob("attestation_doc.bin"))],
}
PARSERS = {
    "snp": parse_snp_report,
    "tdx": parse_tdx_quote,
    "sgx": parse_sgx_quote,
    "nitro": parse_attestation_document,
}
FUZZ = settings(
    max_examples=5000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def mutated(kind: str) -> st.SearchStrategy[bytes]:
    """A genuine sample with bytes overwritten, a slice cut out or bytes inserted, and maybe truncated."""

    @st.composite
    def build(draw: Any) -> bytes:
        data = bytearray(draw(st.sampled_from(SAMPLES[kind])))
        for _ in range(draw(st.integers(1, 6))):
            where = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(("set", "cut", "insert", "truncate")))
            if action == "set" and where < len(data):
                data[where] = draw(st.integers(0, 255))
            elif action == "cut":
                del data[where : where + draw(st.integers(1, 64))]
            elif action == "insert":
                data[where:where] = draw(st.binary(min_size=1, max_size=16))
            elif action == "truncate":
                del data[where:]
        return bytes(data)

    return build()


def arbitrary(kind: str) -> st.SearchStrategy[bytes]:
    prefix = {
        "snp": b"\x02\x00\x00\x00",
        "tdx": b"\x04\x00\x02\x00\x81\x00\x00\x00",
        "sgx": b"\x03\x00\x02\x00\x00\x00\x00\x00",
        "nitro": b"\x84",
    }[kind]
    return st.one_of(st.binary(max_size=1500), st.binary(max_size=1500).map(lambda b: prefix + b))


def parse_or_coded_error(kind: str, data: bytes) -> None:
    try:
        parsed = PARSERS[kind](data)
    except EvidenceError as err:
        assert err.code.startswith("E80") and err.field, err
    else:
        assert parsed.to_bytes() == data  # what parses, writes back byte-exact


@FUZZ
@given(st.one_of(mutated("snp"), arbitrary("snp")))
def test_snp_parser_raises_only_coded_errors(data: bytes) -> None:
    parse_or_coded_error("snp", data)


@FUZZ
@given(st.one_of(mutated("tdx"), arbitrary("tdx")))
def test_tdx_parser_raises_only_coded_errors(data: bytes) -> None:
    parse_or_coded_error("tdx", data)


@FUZZ
@given(st.one_of(mutated("sgx"), arbitrary("sgx")))
def test_sgx_parser_raises_only_coded_errors(data: bytes) -> None:
    parse_or_coded_error("sgx", data)


@FUZZ
@given(st.one_of(mutated("nitro"), arbitrary("nitro")))
def test_nitro_parser_raises_only_coded_errors(data: bytes) -> None:
    try:
        parse_attestation_document(data)
    except EvidenceError as err:
        assert err.code.startswith("E80") and err.field, err


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated("snp"), mutated("tdx"), mutated("sgx"), mutated("nitro"), st.binary(max_size=600)))
def test_verify_never_raises_for_hostile_bytes(data: bytes) -> None:
    verdict = verify(data, Policy(roots=("lab", "amd-milan", "intel-sgx", "aws-nitro")))
    assert isinstance(verdict, Verdict)
    assert verdict.ok == (not verdict.reasons)


@functools.cache
def cert_table() -> bytes:
    return LabAuthority.load_or_create(default_lab_dir()).snp_cert_table()


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=40).map(lambda b: cert_table()[:48] + b),
        st.integers(0, 4000).map(lambda n: cert_table()[:n]),
    )
)
def test_snp_cert_table_parser_raises_only_coded_errors(data: bytes) -> None:
    try:
        entries = parse_snp_cert_table(data)
    except EvidenceError as err:
        assert err.code.startswith("E80") and err.field == "cert_table"
    else:
        assert all(der for _, der in entries)
