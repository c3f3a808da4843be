"""The Ansible role provisions this host for real, and a second run changes nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.host.probe import probe

pytestmark = [pytest.mark.root, pytest.mark.slow]

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


# The default stdout callback is the only one ansible-core ships that prints per-host totals; the json
# callback lives in the ansible.posix collection, which a host with ansible-core alone does not have.
RECAP_LINE = re.compile(r"^localhost\s*:\s*(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)


def recap(stdout: str) -> dict[str, int]:
    """The per-host totals of the PLAY RECAP that ansible-core's default callback prints."""
    found = RECAP_LINE.findall(stdout)
    assert len(found) == 1, f"expected one PLAY RECAP line for localhost:\n{stdout[-3000:]}"
    return {name: int(value) for name, value in (pair.split("=") for pair in found[0].split())}


def run_playbook() -> dict[str, int]:
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_NOCOLOR": "1"}
    env["ANSIBLE_FORCE_COLOR"] = "0"
    done = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "site.yml"],
        cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return recap(done.stdout)


@pytest.mark.skipif(shutil.which("ansible-playbook") is None, reason="ansible-core is not installed")
def test_role_provisions_the_host_and_is_idempotent() -> None:
    first = run_playbook()
    assert first["failed"] == 0 and first["unreachable"] == 0 and first["ok"] > 0
    second = run_playbook()
    assert second["changed"] == 0, second
    host = probe()
    assert any(m.path == "/srv/teelab/hugepages-2M" and m.pagesize_kib == 2048 for m in host.hugetlbfs)
    assert host.libvirt.available, host.libvirt.reason
    assert "/srv/teelab/hugepages-2M hugetlbfs" in Path("/etc/fstab").read_text()
