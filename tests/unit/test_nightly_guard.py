"""The nightly guard (scripts/nightly_guard.py) on real pytest runs: a capability job whose marked tests all
skipped, or were never collected, fails; so does a runner that lacks its capability; a runner that has it and
ran its tests passes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from host_trees import PVM_HOST, SNP_HOST, HostTree

GUARD = Path(__file__).resolve().parents[2] / "scripts" / "nightly_guard.py"
_spec = importlib.util.spec_from_file_location("nightly_guard", GUARD)
assert _spec is not None and _spec.loader is not None
guard = sys.modules["nightly_guard"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)

AMDSEV_OVMF = Path(__file__).resolve().parents[1] / "vectors/snp-measure/fixtures/ovmf_AmdSev_suffix.bin"
KVM_HOST = HostTree(flags=("fpu", "vmx"), kvm=True)
MARKED_TESTS = """
import pytest

@pytest.mark.kvm
def test_boots_under_kvm():
    assert True

@pytest.mark.kvm
def test_runs_the_agent_under_kvm():
    assert True

def test_unmarked():
    assert True
"""


@pytest.fixture(autouse=True)
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "teelab.toml"
    empty.write_text("")
    monkeypatch.setenv("TEELAB_CONFIG", str(empty))


def pytest_run(tmp_path: Path, source: str, marker: str, *, plugin: bool = True) -> Path:
    """Run pytest on ``source`` with ``-m marker`` (the teelab plugin skipping what this host lacks, unless
    ``plugin`` is False) and return its JUnit XML."""
    folder = tmp_path / "suite"
    folder.mkdir(exist_ok=True)
    (folder / "test_marked.py").write_text(source)
    junit = tmp_path / f"{marker}.xml"
    extra = [] if plugin else ["-p", "no:teelab", "-o", "markers=kvm snp tdx"]
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "-m", marker,
         f"--junitxml={junit}", str(folder)],
        cwd=folder, capture_output=True, check=False,
    )  # fmt: skip
    return junit


def test_every_marked_test_skipped_fails_with_the_skip_reasons(tmp_path: Path) -> None:
    junit = pytest_run(tmp_path, MARKED_TESTS, "kvm")  # this host has no usable KVM: the plugin skips
    verdict = guard.judge("kvm", junit, KVM_HOST.write(tmp_path / "host"))
    assert not verdict.ok
    assert verdict.run.collected == 2 and verdict.run.skipped == 2 and verdict.run.ran == 0
    assert "zero tests marked kvm ran (2 collected, 2 skipped: 2 x " in verdict.reasons[0]
    assert "no usable KVM" in verdict.reasons[0]


def test_no_test_of_the_marker_collected_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junit = pytest_run(tmp_path, MARKED_TESTS, "snp")
    monkeypatch.setenv("TEELAB_SNP_OVMF", str(AMDSEV_OVMF))
    verdict = guard.judge("snp", junit, SNP_HOST.write(tmp_path / "host"))
    assert verdict.reasons == ["zero tests marked snp ran (0 collected, 0 skipped)"]


def test_a_runner_with_its_capability_that_ran_its_tests_passes(tmp_path: Path) -> None:
    junit = pytest_run(tmp_path, MARKED_TESTS, "kvm", plugin=False)
    verdict = guard.judge("kvm", junit, KVM_HOST.write(tmp_path / "host"))
    assert verdict.ok and verdict.reasons == []
    assert (verdict.run.collected, verdict.run.ran, verdict.run.passed) == (2, 2, 2)


def test_tests_that_ran_do_not_excuse_a_runner_without_its_capability(tmp_path: Path) -> None:
    junit = pytest_run(tmp_path, MARKED_TESTS, "kvm", plugin=False)
    verdict = guard.judge("kvm", junit, PVM_HOST.write(tmp_path / "host"))
    assert not verdict.ok and len(verdict.reasons) == 1
    assert verdict.reasons[0].startswith(
        "doctor: [ E206 ] this host lacks what the kvm group promises: no usable KVM"
    )


def test_failed_tests_count_as_run_the_pytest_step_fails_the_job_for_them(tmp_path: Path) -> None:
    junit = pytest_run(tmp_path, MARKED_TESTS.replace("assert True", "assert False", 1), "kvm", plugin=False)
    run = guard.read_junit(junit)
    assert (run.ran, run.failed, run.passed) == (2, 1, 1)


def test_missing_or_broken_results_fail(tmp_path: Path) -> None:
    root = KVM_HOST.write(tmp_path / "host")
    assert guard.judge("kvm", tmp_path / "none.xml", root).reasons[0].startswith("no results: ")
    broken = tmp_path / "broken.xml"
    broken.write_text("<html>")
    assert "not a readable JUnit XML" in guard.judge("kvm", broken, root).reasons[0]
    other = tmp_path / "other.xml"
    other.write_text("<report/>")
    assert "root element is <report>" in guard.judge("kvm", other, root).reasons[0]


def test_the_script_exits_1_with_reasons_0_when_proven_2_for_bad_input(tmp_path: Path) -> None:
    skipped = pytest_run(tmp_path, MARKED_TESTS, "kvm")
    root = str(KVM_HOST.write(tmp_path / "host"))
    command = [sys.executable, str(GUARD), "--marker", "kvm", "--root", root, "--junit"]
    done = subprocess.run([*command, str(skipped)], capture_output=True, text=True)
    assert done.returncode == 1 and "kvm: the job proves nothing:" in done.stderr
    ran = pytest_run(tmp_path, MARKED_TESTS, "kvm", plugin=False)
    done = subprocess.run([*command, str(ran), "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["run"]["ran"] == 2
    done = subprocess.run([sys.executable, str(GUARD), "--marker", "cca", "--junit", str(ran)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "invalid choice" in done.stderr
