"""Choosing the VM backend: Lab(backend=...), teelab --backend, TEELAB_BACKEND, teelab.toml; bad values are
E101 before anything starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from qemu_hosts import tcg_host

from harness.cli import main
from harness.errors import ConfigError
from harness.lab import Lab
from harness.libvirt import LibvirtMachine
from harness.libvirt.backend import new_machine, vm_backend
from harness.qemu.machine import Machine
from harness.qemu.spec import VMSpec


def test_the_caller_wins_then_the_environment_then_the_file_then_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "teelab.toml"
    config.write_text('[lab]\nbackend = "libvirt"\n')
    monkeypatch.setenv("TEELAB_CONFIG", str(config))
    monkeypatch.delenv("TEELAB_BACKEND", raising=False)
    assert vm_backend() == "libvirt"
    monkeypatch.setenv("TEELAB_BACKEND", "qemu")
    assert vm_backend() == "qemu"
    assert vm_backend("libvirt") == "libvirt"
    config.write_text("")
    monkeypatch.delenv("TEELAB_BACKEND")
    assert vm_backend() == "qemu"


def test_an_unknown_backend_is_e101(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEELAB_BACKEND", "xen")
    with pytest.raises(ConfigError, match="'xen' is not one of qemu, libvirt") as caught:
        Lab(tcg_host())
    assert caught.value.code == "E101"


def test_each_backend_makes_its_machine(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0")
    spec = VMSpec("guest", kernel=kernel)
    libvirt = new_machine("libvirt", spec, tcg_host(), artifacts=tmp_path / "a")
    qemu = new_machine("qemu", spec, tcg_host(), artifacts=tmp_path / "b")
    assert isinstance(libvirt, LibvirtMachine) and type(qemu) is Machine
    assert libvirt.domain_name.startswith(f"teelab-guest-{os.getpid()}-")


def test_teelab_backend_flag_reaches_every_lab_of_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEELAB_BACKEND", "qemu")  # recorded, so the test's end restores the environment
    assert main(["--backend", "libvirt", "explain", "E360"]) == 0
    assert os.environ["TEELAB_BACKEND"] == "libvirt"
    assert main(["--backend", "xen", "explain", "E360"]) == 2


def test_only_logs_of_dead_harnesses_are_swept(tmp_path: Path) -> None:
    from harness.libvirt.machine import sweep_orphan_logs

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"teelab-guest-{os.getpid()}-0.log", f"teelab-guest-{dead.pid}-3.log", "other-vm.log"]
    for name in names:
        (tmp_path / name).write_text("log")
    assert sweep_orphan_logs(tmp_path) == [tmp_path / names[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[2]])
