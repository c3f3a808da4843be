"""Policies (frozen, validated, loadable from TOML), the nonce book, and the report_data binding."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
from pathlib import Path

import pytest
from teelab_guest import binding

from harness.attest import NonceBook, Policy, TcbVersion
from harness.attest.errors import EvidenceFileError, PolicyError, UnknownRoot


def test_a_full_policy_loads_from_toml_with_hex_bytes(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
roots = ["amd-milan", "lab"]
measurement = "{"ab" * 48}"
host_data = "0x{"01" * 32}"
allow_debug = true
max_vmpl = 1
min_tcb = {{ bootloader = 3, tee = 0, snp = 8, microcode = 115 }}
max_age = 300
rtmrs = ["{"02" * 48}"]
module_id = "i-123"
tcb_statuses = ["UpToDate", "SWHardeningNeeded"]

[pcrs]
0 = "{"03" * 48}"
8 = "{"04" * 48}"

[claims]
guest_svn = 4
"""
    )
    policy = Policy.from_toml(path)
    assert policy.roots == ("amd-milan", "lab") and policy.trusts_lab
    assert policy.measurement == b"\xab" * 48 and policy.host_data == b"\x01" * 32
    assert policy.allow_debug and policy.max_vmpl == 1 and policy.max_age == dt.timedelta(seconds=300)
    assert policy.min_tcb == TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    assert policy.pcrs == {0: b"\x03" * 48, 8: b"\x04" * 48} and policy.rtmrs == {0: b"\x02" * 48}
    assert policy.claims == {"guest_svn": 4} and policy.tcb_statuses == ("UpToDate", "SWHardeningNeeded")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.allow_debug = False  # type: ignore[misc]


def test_the_default_policy_trusts_vendor_roots_only() -> None:
    policy = Policy()
    assert set(policy.roots) == {"amd-milan", "amd-genoa", "intel-sgx", "aws-nitro"} and not policy.trusts_lab
    assert not policy.allow_debug and policy.max_vmpl == 0


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('measurement = "abcd"', "measurement"),
        ('measurement = "zz"', "measurement"),
        ("measurement = 5", "measurement"),
        ('nonsense = "1"', "nonsense"),
        ('[pcrs]\n40 = "00"', "pcrs"),
        ('[pcrs]\n0 = "0000"', "pcrs.0"),
        ("max_vmpl = 7", "max_vmpl"),
        ("min_tcb = { fmc = 1 }", "min_tcb"),
        ("max_age = true", "max_age"),
        ("roots = [", "toml"),
        ("roots = 5", "roots"),
        ('allow_debug = "false"', "allow_debug"),
        ("allow_smt = 0", "allow_smt"),
        ("allow_migrate_ma = 1", "allow_migrate_ma"),
        ("tcb_statuses = [1]", "tcb_statuses"),
        ("tcb_statuses = 1", "tcb_statuses"),
        ("module_id = 5", "module_id"),
        ("claims = 5", "claims"),
        ("min_tcb = -1", "min_tcb"),
        ("lab_dir = 5", "lab_dir"),
    ],
)
def test_bad_policy_values_are_refused_naming_the_key(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(PolicyError) as err:
        Policy.from_toml(path)
    assert err.value.evidence["field"] == field and err.value.exit_status == 2


def test_one_name_stands_for_a_list_of_one_in_roots_and_tcb_statuses() -> None:
    policy = Policy.from_mapping({"roots": "lab", "tcb_statuses": "SWHardeningNeeded"})
    assert (policy.roots, policy.tcb_statuses) == (("lab",), ("SWHardeningNeeded",))


def test_unknown_roots_and_missing_files_have_their_own_codes(tmp_path: Path) -> None:
    with pytest.raises(UnknownRoot) as err:
        Policy(roots=("amd-turin-typo",))
    assert err.value.code == "E811"
    with pytest.raises(EvidenceFileError):
        Policy.from_toml(tmp_path / "absent.toml")


def test_a_nonce_is_accepted_once_by_exactly_one_of_many_threads() -> None:
    book = NonceBook(ttl=60)
    nonce = book.issue()
    results: list[str | None] = []
    lock = threading.Lock()

    def use() -> None:
        outcome = book.consume(nonce)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(None) == 1 and results.count("nonce-reused") == 15


def test_nonce_book_check_does_not_use_up_and_expiry_is_reported_as_stale() -> None:
    now = [0.0]
    book = NonceBook(ttl=10, clock=lambda: now[0])
    nonce = book.issue()
    assert book.check(nonce) is None and book.check(nonce) is None
    now[0] = 11
    assert book.consume(nonce) == "nonce-stale"
    now[0] = 100  # long gone: forgotten
    book.issue()
    assert book.check(nonce) == "nonce-unknown"
    assert len(book.issue()) == 32 and book.issue() != book.issue()


def test_report_data_binding_is_sha512_over_length_framed_label_nonce_and_key() -> None:
    def frame(part: bytes) -> bytes:
        return len(part).to_bytes(8, "big") + part

    expected = hashlib.sha512(frame(b"teelab/report-data/v1") + frame(b"nonce") + frame(b"key")).digest()
    assert binding.report_data(b"nonce", b"key") == expected and len(expected) == 64
    # unambiguous: moving the boundary between nonce and key changes the result
    assert binding.report_data(b"nonc", b"ekey") != binding.report_data(b"nonce", b"key")
    assert binding.report_data(b"", b"") != bytes(64)
    with pytest.raises(TypeError):
        binding.report_data("nonce", b"key")  # type: ignore[arg-type]
