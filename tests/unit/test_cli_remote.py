"""teelab --host: the target's spelling, and which options stay on this side."""

from __future__ import annotations

import pytest

from harness.cli import main
from harness.cli.remote import parse_target, remote_argv
from harness.errors import UsageError


def test_targets_default_to_root_and_port_22() -> None:
    assert (parse_target("lab-01").user, parse_target("lab-01").port) == ("root", 22)
    host = parse_target("ops@10.0.0.5:2200")
    assert (host.user, host.address, host.port) == ("ops", "10.0.0.5", 2200)


@pytest.mark.parametrize("bad", ["", "a b", "root@", "host:99999", "host:0"])
def test_a_bad_target_is_e102(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_target(bad)


def test_only_host_and_known_hosts_stay_here() -> None:
    argv = ["--host", "h", "--backend", "libvirt", "--known-hosts=kh", "doctor", "--json"]
    assert remote_argv(argv) == ["--backend", "libvirt", "doctor", "--json"]


def test_an_unreachable_host_is_e220_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", "root@127.0.0.1:1", "doctor"]) == 1
    assert "[ E220 ]" in capsys.readouterr().err
