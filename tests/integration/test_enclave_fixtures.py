"""The plugin's ``parent`` and ``enclave`` fixtures as a lab suite uses them, run by pytest itself: an
enclave carved from a parent reports through describe, and the parent gets its vCPUs back; a parent that
stops takes its enclave and leaves nothing in the ledger."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.vm, pytest.mark.slow]

LAB_SUITE = """
def test_an_enclave_is_carved_from_its_parent(parent, enclave):
    host = parent(name="fixture-parent")
    online = host.order({"op": "status"})["online"]
    carved = enclave("hello", of=host, cpu_count=2)
    (described,) = host.describe()
    assert described["EnclaveID"] == carved.enclave_id and described["State"] == "RUNNING"
    assert host.order({"op": "status"})["online"] != online
    host.terminate(carved)
    assert host.order({"op": "status"})["online"] == online


def test_a_parent_that_stops_takes_its_enclave_and_the_ledger_forgets_both(lab, parent, enclave):
    import os, time

    host = parent(name="stopping-parent")
    pid = enclave("hello", of=host).machine.pid
    lab.stop(host.machine, powerdown_timeout=5)
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert host.enclaves == {}
    assert [c.owner for c in host.ledger.claims() if "stopping-parent" in c.owner] == []
"""


def test_a_suite_written_with_the_parent_and_enclave_fixtures_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lab=LAB_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
