"""The host ledger: claims are exclusive across processes, all-or-nothing, and die with their process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.host.errors import LedgerCorrupt, LedgerExhausted
from harness.host.ledger import Ledger


def test_claims_are_exclusive_and_released(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.claim("cid", range(3, 10), 2, "vm-a") == (3, 4)
    assert ledger.claim("cid", range(3, 10), 1, "vm-b") == (5,)
    assert ledger.owner_of("cid", 4) == "vm-a"
    ledger.release("cid", [3])
    assert ledger.claim("cid", range(3, 10), 1, "vm-c") == (3,)
    ledger.release_owner("vm-a")
    assert [(c.value, c.owner) for c in ledger.claims("cid")] == [(3, "vm-c"), (5, "vm-b")]


def test_kinds_are_separate_namespaces(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.claim("cpu", [1], 1, "a")
    assert ledger.claim("cid", [1], 1, "b") == (1,)


def test_a_claim_that_cannot_be_met_takes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.claim("cpu", [0, 1], 1, "parent")
    with pytest.raises(LedgerExhausted) as caught:
        ledger.claim("cpu", [0, 1], 2, "enclave")
    assert caught.value.code == "E204" and "parent" in caught.value.hint
    assert [c.owner for c in ledger.claims("cpu")] == ["parent"]


def test_claim_exact_names_the_holder(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.claim_exact("cpu", [2, 3], "enclave-1")
    with pytest.raises(LedgerExhausted, match="enclave-1"):
        ledger.claim_exact("cpu", [3, 4], "enclave-2")
    assert ledger.owner_of("cpu", 4) is None


def test_claims_of_a_dead_process_are_reaped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ledger.claim("cid", [7], 1, "doomed", pid=sleeper.pid)
        assert ledger.owner_of("cid", 7) == "doomed"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ledger.owner_of("cid", 7) is None
    assert ledger.claim("cid", [7], 1, "next") == (7,)


def test_concurrent_processes_never_share_a_value(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from harness.host.ledger import Ledger
        ledger = Ledger({str(tmp_path)!r})
        got = [ledger.claim("port", range(1000, 2000), 1, "w")[0] for _ in range(25)]
        print(" ".join(map(str, got)), flush=True)
        sys.stdin.read()  # hold the claims until every worker has made its own
        """
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    try:
        values = [int(v) for worker in workers for v in worker.stdout.readline().split()]  # type: ignore[union-attr]
    finally:
        for worker in workers:
            worker.communicate(timeout=60)
    assert len(values) == 100 and len(set(values)) == 100


def test_a_corrupt_ledger_is_a_coded_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(LedgerCorrupt) as caught:
        Ledger(tmp_path).claims()
    assert caught.value.code == "E205" and "ledger.json" in caught.value.hint


def test_transfer_hands_held_values_to_a_new_owner_or_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.claim_exact("cpu", [1, 2], "parent")
    ledger.transfer("cpu", [2], "enclave")
    assert [(c.value, c.owner) for c in ledger.claims("cpu")] == [(1, "parent"), (2, "enclave")]
    with pytest.raises(LedgerExhausted, match=r"\[3\] are not held"):
        ledger.transfer("cpu", [1, 3], "enclave")
    assert ledger.owner_of("cpu", 1) == "parent"
