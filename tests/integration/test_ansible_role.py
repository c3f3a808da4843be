"""The Ansible role provisions this host for real, and a second run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.host.probe import probe

pytestmark = [pytest.mark.root, pytest.mark.slow]

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def run_playbook() -> dict[str, int]:
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "site.yml"],
        cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return json.loads(done.stdout)["stats"]["localhost"]


@pytest.mark.skipif(shutil.which("ansible-playbook") is None, reason="ansible-core is not installed")
def test_role_provisions_the_host_and_is_idempotent() -> None:
    first = run_playbook()
    assert first["failures"] == 0 and first["unreachable"] == 0
    second = run_playbook()
    assert second["changed"] == 0, second
    host = probe()
    assert any(m.path == "/srv/teelab/hugepages-2M" and m.pagesize_kib == 2048 for m in host.hugetlbfs)
    assert host.libvirt.available, host.libvirt.reason
    assert "/srv/teelab/hugepages-2M hugetlbfs" in Path("/etc/fstab").read_text()
