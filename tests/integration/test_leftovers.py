"""50 launch-and-stop cycles, ended every way we know, leave no QEMU process, socket, hugepage file or
temp dir behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from processes import qemu_pids

from harness.host import hugepages
from harness.host.probe import probe
from harness.lab import Lab
from harness.qemu.objects import MemoryBackendFile

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

CYCLES = 50
HUGEPAGE_MIB = 128
TAG = "leftover-check"

HARNESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from harness import images
    from harness.lab import Lab
    lab = Lab()
    spec = lab.spec_for_image(images.build("enclave"), name=sys.argv[1], memory_mib=256)
    machine = lab.launch(spec)
    print(machine.pid, flush=True)
    sys.stdin.read()
    """
)


def qemu_processes() -> set[int]:
    return qemu_pids(TAG)


def sockets_under(*roots: Path) -> set[Path]:
    found = set()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                try:
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        found.add(path)
                except OSError:
                    continue
    return found


def temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of this test's own, for the harness here and in its child processes: other processes on the
    machine cannot make entries appear in it."""
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    monkeypatch.setenv("TMPDIR", str(private))
    return private


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in qemu_processes():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def hugetlbfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hugepages.ensure_pool(2048, HUGEPAGE_MIB // 2 + 8)
    return hugepages.ensure_hugetlbfs(2048)


def test_fifty_cycles_leave_nothing_behind(
    enclave_image, hugetlbfs_mount: Path, state_dir: Path, private_tmp: Path
) -> None:
    host = probe()
    free_before = host.free_hugepages(2048)
    temp_before = temp_entries()
    sockets_before = sockets_under(state_dir, Path(tempfile.gettempdir()))
    ends: dict[str, int] = {}
    with Lab(host) as lab:
        for cycle in range(CYCLES):
            name = f"{TAG}-{cycle}"
            how = ("powerdown", "quit", "sigkill-qemu", "kill-harness", "hugepages-quit")[cycle % 5]
            ends[how] = ends.get(how, 0) + 1
            if how == "kill-harness":
                harness = subprocess.Popen(
                    [sys.executable, "-c", HARNESS_SCRIPT, name],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                pid = int(harness.stdout.readline())  # type: ignore[union-attr]
                harness.kill()
                harness.wait()
                assert wait_gone(pid), f"cycle {cycle}: QEMU {pid} outlived its harness"
                continue
            memory = None
            if how == "hugepages-quit":
                memory = MemoryBackendFile("ram0", HUGEPAGE_MIB, mem_path=hugetlbfs_mount, prealloc=True)
            spec = lab.spec_for_image(
                enclave_image, name=name, memory_mib=HUGEPAGE_MIB if memory else 256, memory=memory
            )
            if how == "powerdown":
                boot = lab.boot(spec)
                assert boot.machine.shutdown().stage == "powerdown"
            elif how == "sigkill-qemu":
                machine = lab.launch(spec)
                os.kill(machine.pid, signal.SIGKILL)  # type: ignore[arg-type]
                assert machine.shutdown(powerdown_timeout=1).returncode == -signal.SIGKILL
            else:
                machine = lab.launch(spec)
                if memory is not None:
                    # (directories such as libvirtd's own may live there; files hold hugepages)
                    assert hugepages.hugepage_files(hugetlbfs_mount) == [], (
                        "QEMU's hugepage file should be unlinked"
                    )
                assert machine.shutdown(powerdown_timeout=0).stage == "quit"
    assert ends == {"powerdown": 10, "quit": 10, "sigkill-qemu": 10, "kill-harness": 10, "hugepages-quit": 10}
    assert qemu_processes() == set()
    assert hugepages.hugepage_files(hugetlbfs_mount) == []
    assert probe().free_hugepages(2048) == free_before
    assert sockets_under(state_dir, Path(tempfile.gettempdir())) - sockets_before == set()
    assert temp_entries() - temp_before == set()


ATTACH_SCRIPT = textwrap.dedent(
    """
    import itertools
    from harness.host.probe import probe
    from harness.vsock import VsockHost
    vsock = VsockHost(probe(), backend="builtin")
    print("attaching", flush=True)
    for n in itertools.count():
        vsock.attach(f"vm{n % 50}-{n}", group="g")
        if n % 50 == 49:
            for name in list(vsock.attachments):
                vsock.detach(name)
    """
)


def own_processes(word: str) -> set[int]:
    """Live processes (any program) with ``word`` in their command line."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if word.encode() in argv and alive_pid(int(entry.name)):
                found.add(int(entry.name))
    return found


def alive_pid(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def leftovers(state: Path, runtime_root: Path, private_tmp: Path) -> list[str]:
    """What a killed harness left outside the artifact runs: processes, sockets and folders."""
    found = [f"process {pid}" for pid in own_processes(str(state))]
    found += [f"runtime folder {p.name}" for p in runtime_root.iterdir()] if runtime_root.exists() else []
    found += [f"temp entry {name}" for name in os.listdir(private_tmp)]
    found += [f"socket {p}" for p in sockets_under(state) if "runs" not in p.relative_to(state).parts]
    return found


def wait_clean(state: Path, runtime_root: Path, private_tmp: Path, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (found := leftovers(state, runtime_root, private_tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def harness_env(state: Path, private_tmp: Path) -> dict[str, str]:
    return {
        **os.environ, "TEELAB_STATE_DIR": str(state), "TEELAB_RUNTIME_DIR": str(state / "rt"),
        "TMPDIR": str(private_tmp),
    }  # fmt: skip


@pytest.mark.parametrize("after_s", [3, 6, 9])
def test_sigkill_to_the_demo_leaves_nothing_outside_the_runs(
    cvm_image, tmp_path: Path, private_tmp: Path, after_s: int
) -> None:
    state = tmp_path / "state"
    demo = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "demo", "--json"], env=harness_env(state, private_tmp),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(after_s)
    demo.kill()
    demo.wait()
    assert wait_clean(state, state / "rt", private_tmp) == []


def test_sigkill_during_vsock_attach_leaves_nothing(tmp_path: Path, private_tmp: Path) -> None:
    state = tmp_path / "state"
    for delay in (0.05, 0.2, 0.5, 1.0):
        harness = subprocess.Popen(
            [sys.executable, "-c", ATTACH_SCRIPT], env=harness_env(state, private_tmp),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert harness.stdout is not None and harness.stdout.readline().strip() == "attaching"
        time.sleep(delay)
        harness.kill()
        harness.wait()
        assert wait_clean(state, state / "rt", private_tmp) == [], f"killed {delay} s into attaching"
