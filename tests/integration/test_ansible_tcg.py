"""The role for a tcg host (this machine's kind), for real: it writes teelab's configuration, ends with
`teelab doctor --require tcg` passing, and a second run changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_ansible_role import recap

pytestmark = [pytest.mark.root, pytest.mark.slow]

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
TEELAB = Path(sys.executable).parent / "teelab"


def run_role(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    return subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "site.yml",
         "-e", f"teelab_command={TEELAB}", "-e", f"teelab_config_file={tmp_path / 'teelab.toml'}",
         "-e", f"teelab_artifact_cache={tmp_path / 'artifacts'}"],
        cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("ansible-playbook") is None, reason="ansible-core is not installed")
def test_a_tcg_host_is_provisioned_and_passes_doctor_require_tcg(tmp_path: Path) -> None:
    first = run_role(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "provisioning a tcg host" in first.stdout
    doctor = first.stdout.split("TASK [teelab_host : teelab doctor --require tcg]", 1)[1]
    assert doctor.split("\n", 2)[1].startswith("ok: [localhost]"), doctor[:500]  # ran, not skipped
    assert "fatal" not in first.stdout
    config = (tmp_path / "teelab.toml").read_text()
    assert f'artifact_cache = "{tmp_path / "artifacts"}"' in config and "[snp]" not in config
    second = run_role(tmp_path)
    assert second.returncode == 0 and recap(second.stdout)["changed"] == 0, second.stdout[-3000:]
