"""qemu+ssh:// URIs for the libvirt backend, without a lab host: how a URI is taken apart and handed to
libvirt with the harness's pinned ssh, the URIs refused (E463) and the VM parts that cannot follow a remote
URI (E361), each before anything is opened or started."""

from __future__ import annotations

import getpass
import os
import stat
import subprocess
from pathlib import Path

import pytest
from qemu_hosts import tcg_host

from harness.agent import agent_port
from harness.cli import main
from harness.errors import ConfigError
from harness.lab import Lab
from harness.libvirt import LibvirtMachine
from harness.libvirt.backend import libvirt_uri
from harness.libvirt.errors import RemoteUnsupported, RemoteUriRefused
from harness.libvirt.remote import remote_refusal
from harness.libvirt.uri import parse_uri
from harness.qemu.chardevs import ChardevSocket
from harness.qemu.devices import TpmCrb, VhostUserVsockPci, VhostVsockPci, VirtioNetUser, VirtioRngPci
from harness.qemu.objects import MemoryBackendFile, MemoryBackendMemfd, SevSnpGuest
from harness.qemu.spec import VMSpec


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_text("not read here\n")
    return path


def test_local_uris_are_used_as_given() -> None:
    for uri in (None, "", "qemu:///system", "qemu:///session", "test:///default", "qemu+unix:///system"):
        assert parse_uri(uri) is None


def test_a_qemu_ssh_uri_is_taken_apart(key: Path, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    uri = parse_uri(
        f"qemu+ssh://lab@genoa-01:2222/system?keyfile={key}&known_hosts={known}&socket=/run/x.sock"
    )
    assert uri is not None
    assert (uri.user, uri.host, uri.port, uri.path) == ("lab", "genoa-01", 2222, "/system")
    assert (uri.keyfile, uri.known_hosts, uri.params) == (key, known, (("socket", "/run/x.sock"),))
    defaults = parse_uri("qemu+ssh://genoa-01/session")
    assert defaults is not None
    assert (defaults.user, defaults.port, defaults.path, defaults.keyfile) == (
        getpass.getuser(), 22, "/session", None,
    )  # fmt: skip
    assert defaults.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    ipv6 = parse_uri("qemu+ssh://root@[fd00::5]:22/system")
    assert ipv6 is not None and ipv6.host == "fd00::5"
    assert "root@[fd00::5]:22/system?" in ipv6.libvirt_uri(Path("/run/ssh"))


def test_libvirt_gets_the_same_host_with_the_harness_ssh_and_no_prompts(key: Path, tmp_path: Path) -> None:
    uri = parse_uri(f"qemu+ssh://lab@genoa-01:2222/system?keyfile={key}&known_hosts=/k&no_tty=0&mode=direct")
    assert uri is not None
    assert uri.libvirt_uri(tmp_path / "ssh") == (
        f"qemu+ssh://lab@genoa-01:2222/system?keyfile={key}&mode=direct&no_tty=1&command={tmp_path}/ssh"
    )


def test_the_ssh_command_checks_the_uris_known_hosts_alone_and_fails_closed(
    key: Path, tmp_path: Path
) -> None:
    uri = parse_uri(f"qemu+ssh://lab@genoa-01:2222/system?keyfile={key}&known_hosts=/etc/teelab/known")
    assert uri is not None
    options = uri.ssh_options()
    pairs = {options[i + 1] for i, word in enumerate(options) if word == "-o"}
    assert {"StrictHostKeyChecking=yes", "UserKnownHostsFile=/etc/teelab/known",
            "GlobalKnownHostsFile=/dev/null", "BatchMode=yes"} <= pairs  # fmt: skip
    assert options[:2] == ["-F", "/dev/null"] and options[-2:] == ["-i", str(key)]
    argv = uri.ssh_argv("/usr/bin/ssh", "-N")
    assert argv[-7:] == ["-N", "-p", "2222", "-l", "lab", "--", "genoa-01"]
    # libvirt appends its own arguments after ours, where a later -o StrictHostKeyChecking=no cannot win
    wrapper = tmp_path / "ssh"
    wrapper.write_text(uri.ssh_wrapper("/bin/echo"))
    wrapper.chmod(stat.S_IRWXU)
    echoed = subprocess.run(
        [str(wrapper), "-o", "StrictHostKeyChecking=no", "x"], capture_output=True, text=True
    )
    words = echoed.stdout.split()
    assert words.index("StrictHostKeyChecking=yes") < words.index("StrictHostKeyChecking=no")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("qemu://genoa-01/system", "tls transport"),
        ("qemu+tcp://genoa-01/system", "tcp transport"),
        ("qemu+libssh://genoa-01/system", "libssh transport"),
        ("lxc+ssh://genoa-01/", r"transport of lxc\+ssh"),
        ("qemu+ssh:///system", "names no host"),
        ("qemu+ssh://genoa-01:99999/system", "port is not a number"),
        ("qemu+ssh://lab:secret@genoa-01/system", "holds a password"),
        ("qemu+ssh://genoa-01/embed", "neither /system nor /session"),
        ("qemu+ssh://genoa-01/system?no_verify=1", "would accept any host key"),
        ("qemu+ssh://genoa-01/system?command=/usr/bin/ssh", "would replace the ssh"),
        ("qemu+ssh://genoa-01/system?keyfile=/nonexistent/key", "is not a file"),
        ("qemu+ssh://genoa-01/system?known_hosts=/my%20hosts", "holds a space"),
    ],
)
def test_refused_uris_are_e463_before_anything_is_opened(uri: str, why: str) -> None:
    with pytest.raises(RemoteUriRefused, match=why) as caught:
        parse_uri(uri)
    assert caught.value.code == "E463" and caught.value.exit_status == 2 and caught.value.hint


def test_no_verify_0_is_the_default_and_accepted() -> None:
    assert parse_uri("qemu+ssh://genoa-01/system?no_verify=0") is not None


def spec_with(tmp_path: Path, **fields: object) -> VMSpec:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0")
    return VMSpec("remote-guest", kernel=kernel, **fields)  # type: ignore[arg-type]


def test_the_agent_channel_and_rng_follow_a_remote_uri(tmp_path: Path) -> None:
    remote_refusal(spec_with(tmp_path, devices=(agent_port(), VirtioRngPci("rng0"))))


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"devices": (VhostUserVsockPci("vsock0", ChardevSocket("v", path=Path("/run/v.sock"))),)},
         "passing descriptors"),
        ({"devices": (VhostVsockPci("vsock0", guest_cid=3),)}, "that host's kernel"),
        ({"devices": (TpmCrb("tpm0", ChardevSocket("t", path=Path("/run/t.sock"))),)}, "control socket"),
        ({"devices": (VirtioNetUser("nic0", host_port=2222),)}, "that host's loopback"),
        ({"memory": MemoryBackendFile("ram0", 512, mem_path=Path("/dev/hugepages"))},
         "hugepage pools are not probed"),
        ({"confidential": SevSnpGuest(), "memory": MemoryBackendMemfd("ram0", 512)},
         "TDX or SGX is not probed"),
    ],
)  # fmt: skip
def test_parts_that_need_this_machine_are_e361(tmp_path: Path, fields: dict[str, object], why: str) -> None:
    with pytest.raises(RemoteUnsupported, match=why) as caught:
        remote_refusal(spec_with(tmp_path, **fields))
    assert caught.value.code == "E361" and "--host" in (caught.value.hint or "")


def test_a_machine_refused_for_its_uri_leaves_no_artifact_folder(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, devices=(VirtioNetUser("nic0", host_port=2222),))
    with pytest.raises(RemoteUnsupported):
        LibvirtMachine(spec, tcg_host(), artifacts=tmp_path / "run", uri="qemu+ssh://root@genoa-01/system")
    with pytest.raises(RemoteUriRefused):
        LibvirtMachine(spec, tcg_host(), artifacts=tmp_path / "run", uri="qemu+tcp://genoa-01/system")
    assert not (tmp_path / "run").exists()


def test_the_uri_comes_from_the_caller_then_the_environment_then_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "teelab.toml"
    config.write_text('[libvirt]\nuri = "qemu+ssh://root@from-file/system"\n')
    monkeypatch.setenv("TEELAB_CONFIG", str(config))
    monkeypatch.delenv("TEELAB_LIBVIRT_URI", raising=False)
    assert libvirt_uri() == "qemu+ssh://root@from-file/system"
    monkeypatch.setenv("TEELAB_LIBVIRT_URI", "qemu+ssh://root@from-env/system")
    assert libvirt_uri() == "qemu+ssh://root@from-env/system"
    assert libvirt_uri("qemu:///system") == "qemu:///system"
    assert Lab(tcg_host(), backend="libvirt").libvirt_uri == "qemu+ssh://root@from-env/system"
    assert Lab(tcg_host(), backend="qemu").libvirt_uri is None  # a configured URI does not bother QEMU runs
    config.write_text("")
    monkeypatch.delenv("TEELAB_LIBVIRT_URI")
    assert libvirt_uri() is None


def test_a_lab_refuses_a_uri_it_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEELAB_BACKEND", raising=False)
    with pytest.raises(ConfigError, match="the VM backend is qemu") as caught:
        Lab(tcg_host(), backend="qemu", uri="qemu+ssh://root@genoa-01/system")
    assert caught.value.code == "E101"
    with pytest.raises(RemoteUriRefused):
        Lab(tcg_host(), backend="libvirt", uri="qemu+ssh://genoa-01/system?no_verify=1")


def test_teelab_libvirt_uri_flag_chooses_libvirt_and_reaches_every_lab(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEELAB_BACKEND", "qemu")  # recorded, so the test's end restores the environment
    monkeypatch.setenv("TEELAB_LIBVIRT_URI", "")
    assert main(["--libvirt-uri", "qemu+ssh://root@genoa-01/system", "explain", "E463"]) == 0
    assert (os.environ["TEELAB_BACKEND"], os.environ["TEELAB_LIBVIRT_URI"]) == (
        "libvirt", "qemu+ssh://root@genoa-01/system",
    )  # fmt: skip
    capsys.readouterr()
    assert main(["--backend", "qemu", "--libvirt-uri", "qemu:///system", "explain", "E463"]) == 2
    assert "[ E102 ]" in capsys.readouterr().err
    assert main(["--libvirt-uri", "qemu+ssh://genoa-01/system?no_verify=1", "explain", "E463"]) == 2
    assert "[ E463 ]" in capsys.readouterr().err
