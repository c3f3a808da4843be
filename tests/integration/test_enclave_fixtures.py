"""The plugin's ``parent`` and ``enclave`` fixtures as a lab suite uses them, run by pytest itself: an
enclave carved from a parent reports through describe, and the parent gets its vCPUs back."""

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
"""


def test_a_suite_written_with_the_parent_and_enclave_fixtures_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lab=LAB_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
