"""Runtime folders are owned by a process, and go when it does, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.host import runtime

MAKE_AND_WAIT = """
import sys, time
from harness.host import runtime
folder = runtime.runtime_dir("probe")
(folder / "sock").write_text("x")
print(folder, flush=True)
time.sleep(60)
"""


@pytest.fixture
def runtime_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "rt"
    monkeypatch.setenv(runtime.ENV_RUNTIME, str(root))
    return root


def start_owner(root: Path) -> tuple[subprocess.Popen[str], Path]:
    owner = subprocess.Popen(
        [sys.executable, "-c", MAKE_AND_WAIT], stdout=subprocess.PIPE, text=True,
        env={**os.environ, runtime.ENV_RUNTIME: str(root)},
    )  # fmt: skip
    assert owner.stdout is not None
    return owner, Path(owner.stdout.readline().strip())


def wait_gone(path: Path, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def test_a_folder_names_its_owner_and_is_private(runtime_root: Path) -> None:
    folder = runtime.runtime_dir("own")
    try:
        assert folder.parent == runtime_root
        assert folder.name.startswith(f"own-{os.getpid():x}-")
        assert runtime.owner_alive(folder.name)
        assert folder.stat().st_mode & 0o777 == 0o700
    finally:
        runtime.remove_runtime_dir(folder)
    assert not folder.exists()


def test_sigkill_to_the_owner_removes_its_folder(runtime_root: Path) -> None:
    owner, folder = start_owner(runtime_root)
    assert (folder / "sock").exists()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert wait_gone(folder), f"{folder} outlived its owner"


def test_a_folder_whose_owner_and_watcher_are_gone_is_swept(runtime_root: Path) -> None:
    owner, folder = start_owner(runtime_root)
    watchers = subprocess.run(["pgrep", "-f", f"rm -rf -- .*{folder}"], capture_output=True, text=True)
    # stop the watcher first, then the owner: the folder is left as a crash of both would leave it
    for pid in watchers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    time.sleep(0.2)
    assert folder.exists()
    fresh = runtime.runtime_dir("next")
    try:
        assert not folder.exists()
        assert fresh.exists()
    finally:
        runtime.remove_runtime_dir(fresh)


def test_folders_of_a_living_process_and_foreign_names_are_left(runtime_root: Path) -> None:
    owner, folder = start_owner(runtime_root)
    foreign = runtime_root / "not-ours"
    foreign.mkdir()
    try:
        runtime.sweep_runtime_dirs()
        assert folder.exists() and foreign.exists()
    finally:
        owner.kill()
        owner.wait()
    assert wait_gone(folder)


def test_a_reused_pid_does_not_keep_a_dead_owners_folder(runtime_root: Path) -> None:
    stale = runtime_root / f"old-{os.getpid():x}-1-abcd"  # this pid, but a start time it never had
    stale.mkdir(parents=True)
    runtime.sweep_runtime_dirs()
    assert not stale.exists()
