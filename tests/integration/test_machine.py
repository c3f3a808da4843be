"""A real QEMU guest driven through Machine: QMP, console, pinning, shutdown stages, artifacts, failures."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from processes import alive, qemu_pids

from harness.lab import READY_PATTERN, Lab
from harness.qemu.errors import ConsoleTimeout, LaunchError, MachineStateError, UnexpectedExit
from harness.qemu.machine import KEEP_RUNS, Machine, _new_artifact_dir
from harness.qemu.spec import VMSpec

pytestmark = pytest.mark.vm


def test_guest_boots_to_ready_and_powers_off_cleanly(lab_host, enclave_image, vm_backend: str) -> None:
    with Lab(lab_host, backend=vm_backend) as lab:
        boot = lab.boot(lab.spec_for_image(enclave_image, name="ready-and-off"))
        assert boot.role == "enclave"
        assert 0 < boot.guest_uptime < boot.seconds + 1
        assert boot.machine.qmp("query-status")["status"] == "running"
        info = boot.machine.shutdown()
    assert info.stage == "powerdown", boot.machine.console_text()[-500:]
    assert info.returncode == 0
    assert "TEELAB-POWEROFF" in boot.machine.console_log.read_text()


def test_role_comes_from_the_kernel_command_line(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="role-cvm", role="cvm"))
    assert boot.role == "cvm"


def test_artifact_folder_has_argv_run_sh_console_and_stderr(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="artifacts"))
    lab.stop(boot.machine)
    folder = boot.machine.artifacts
    argv = json.loads((folder / "argv.json").read_text())
    assert argv == boot.machine.argv and "-kernel" in argv
    run_sh = (folder / "run.sh").read_text()
    assert "-serial" in run_sh and "qmp.sock" in run_sh and "fd=" not in run_sh
    assert READY_PATTERN.search((folder / "console.log").read_text())
    assert (folder / "qemu.stderr").exists()
    assert json.loads((folder / "exit.json").read_text())["stage"] == "powerdown"


def test_run_sh_reproduces_the_boot_by_hand(lab: Lab, enclave_image) -> None:
    machine = Machine(lab.spec_for_image(enclave_image, name="by-hand"), lab.host)
    machine.launch()
    machine.kill()
    proc = subprocess.Popen(
        [str(machine.artifacts / "run.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        seen = b""
        while time.monotonic() < deadline and not READY_PATTERN.search(seen.decode(errors="replace")):
            chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                break
            seen += chunk
        assert READY_PATTERN.search(seen.decode(errors="replace")), seen[-500:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_vcpu_threads_are_pinned_to_the_given_host_cpus(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="pinned", vcpus=2))
    online = sorted(os.sched_getaffinity(0))
    wanted = [online[-1], online[0]]
    assert boot.machine.pin_vcpus(wanted) == {0: wanted[0], 1: wanted[1]}
    threads = boot.machine.vcpu_threads()
    assert len(threads) == 2
    for index, tid in threads.items():
        assert os.sched_getaffinity(tid) == {wanted[index]}


def test_quit_then_kill_when_the_guest_ignores_powerdown(lab: Lab, enclave_image) -> None:
    machine = lab.launch(lab.spec_for_image(enclave_image, name="stop-early"))
    machine.qmp("stop")  # a paused guest cannot answer the ACPI button
    info = machine.shutdown(powerdown_timeout=1.0)
    assert info.stage == "quit"
    assert not machine.running


def test_console_timeout_is_a_coded_error_with_the_console_tail(lab: Lab, enclave_image) -> None:
    boot = lab.boot(lab.spec_for_image(enclave_image, name="timeout"))
    with pytest.raises(ConsoleTimeout) as caught:
        boot.machine.wait_for_console("this never appears", timeout=1.0)
    assert caught.value.code == "E403"
    assert "TEELAB-READY" in caught.value.evidence["console_tail"]


def test_guest_that_dies_while_waited_on_raises_unexpected_exit(lab: Lab, enclave_image) -> None:
    machine = lab.launch(lab.spec_for_image(enclave_image, name="dies"))
    os.kill(machine.pid, signal.SIGKILL)  # type: ignore[arg-type]
    with pytest.raises(UnexpectedExit) as caught:
        machine.wait_for_console("never", timeout=20)
    assert caught.value.code == "E402"


def test_qemu_that_refuses_its_input_raises_launch_error_with_argv_and_stderr(
    lab: Lab, tmp_path: Path
) -> None:
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\0" * 4096)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 4096)
    spec = VMSpec(name="bad-kernel", kernel=kernel, initrd=initrd, memory_mib=128)
    with pytest.raises(LaunchError) as caught:
        lab.launch(spec)
    err = caught.value
    assert err.code == "E401"
    assert str(kernel) in err.evidence["argv"]
    assert "kernel" in err.evidence["stderr"].lower()
    assert not qemu_pids("bad-kernel")


def test_a_failing_closer_does_not_keep_the_labs_other_machines_running(enclave_image) -> None:
    def broken_closer() -> None:
        raise RuntimeError("closer failed")

    lab = Lab()
    first = lab.boot(lab.spec_for_image(enclave_image, name="close-first")).machine
    second = lab.boot(lab.spec_for_image(enclave_image, name="close-second"), closers=[broken_closer]).machine
    with pytest.raises(RuntimeError, match="closer failed"):
        lab.close()
    assert not first.running and not second.running


def test_a_launch_that_cannot_start_qemu_keeps_no_descriptor(lab: Lab, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    spec = VMSpec(name="no-binary", kernel=kernel, memory_mib=128)
    machine = Machine(spec, lab.host, qemu_binary=str(tmp_path / "absent"))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(LaunchError) as caught:
        machine.launch()
    assert caught.value.code == "E401"
    assert set(os.listdir("/proc/self/fd")) <= before
    with pytest.raises(MachineStateError):
        machine.write_console("\n")


def test_launches_pruning_the_runs_dir_at_once_never_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEELAB_STATE_DIR", str(tmp_path))

    def launch(_: int) -> None:
        (_new_artifact_dir("prune") / "console.log").write_text("")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(launch, range(240)))  # re-raises the first failure
    assert len(list((tmp_path / "runs").iterdir())) == KEEP_RUNS


def test_qemu_dies_with_the_harness_process(enclave_image, tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from harness import images
        from harness.lab import Lab
        lab = Lab()
        machine = lab.launch(lab.spec_for_image(images.build("enclave"), name="orphan"))
        print(machine.pid, flush=True)
        time.sleep(600)
        """
    )
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    qemu_pid = int(harness.stdout.readline())  # type: ignore[union-attr]
    assert alive(qemu_pid)
    harness.kill()
    harness.wait()
    deadline = time.monotonic() + 10
    while alive(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(qemu_pid), "QEMU outlived the harness that launched it"
