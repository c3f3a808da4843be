"""teelab fleet over SSH against two stand-in lab hosts: sshd instances on this machine, each in its own mount
namespace where the same probe-root path holds a different fixture tree (an SEV-SNP host, a TCG host). Outside
those namespaces the path is empty, so only the remote side can report what the tests assert."""

from __future__ import annotations

import json
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from standin_sshd import StandIn, keygen, privsep_dir, start_sshd

from harness.cli import main
from harness.host.probe import probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from host_trees import SNP_HOST, HostTree

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REMOTE_TEST = textwrap.dedent(
    """
    import os
    from pathlib import Path

    def test_this_host_offers_snp():
        root = Path(os.environ["STAND_IN_ROOT"])
        assert (root / "sys/module/kvm_amd/parameters/sev_snp").read_text() == "Y\\n"
        artifacts = Path(os.environ["TEELAB_FLEET_ARTIFACTS"])
        (artifacts / "evidence.txt").write_text(f"snp seen on {os.getpid()}")
    """
)


@dataclass
class Fleet:
    inventory: Path
    known_hosts: Path
    probe_root: Path
    remote_test: Path
    ports: dict[str, int]
    client_key: Path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    keygen(tmp_path / "client_key")
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    probe_root = tmp_path / "probe-root"  # empty here; each stand-in's namespace mounts its tree on it
    probe_root.mkdir()
    stand_ins: list[StandIn] = []
    known, inventory, ports = [], ["[lab]"], {}
    with privsep_dir():
        try:
            for name, tree in (("snp-host", SNP_HOST), ("tcg-host", HostTree())):
                tree.write(tmp_path / f"{name}-tree")

                def in_namespace(sshd: str, name: str = name) -> list[str]:
                    mount = f"mount --bind {tmp_path}/{name}-tree {probe_root} && exec {sshd}"
                    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount]

                stand_in = start_sshd(
                    tmp_path, name, tmp_path / "authorized_keys",
                    extra_config=f"SetEnv STAND_IN_ROOT={probe_root}\n", wrap=in_namespace,
                )  # fmt: skip
                stand_ins.append(stand_in)
                ports[name] = stand_in.port
                known.append(stand_in.known_hosts_line())
                inventory.append(f"{name} ansible_host=127.0.0.1 ansible_port={stand_in.port}")
            (tmp_path / "known_hosts").write_text("".join(known))
            inventory += ["", "[all:vars]", "ansible_user=root",
                          f"ansible_ssh_private_key_file={tmp_path}/client_key",
                          f"teelab_command={VENV_BIN}/teelab", f"teelab_probe_root={probe_root}",
                          f"teelab_pytest='{VENV_BIN}/python -m pytest -p no:cacheprovider -q'",
                          f"teelab_repo_dir={REPO}"]  # fmt: skip
            (tmp_path / "inventory.ini").write_text("\n".join(inventory) + "\n")
            (tmp_path / "remote_test.py").write_text(REMOTE_TEST)
            yield Fleet(
                tmp_path / "inventory.ini",
                tmp_path / "known_hosts",
                probe_root,
                tmp_path / "remote_test.py",
                ports,
                tmp_path / "client_key",
            )
        finally:
            for stand_in in stand_ins:
                stand_in.stop()


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, object]:
    status = main(argv)
    return status, json.loads(capsys.readouterr().out)


def test_fleet_doctor_reports_each_hosts_own_capabilities(fleet: Fleet, capsys) -> None:
    assert not probe(fleet.probe_root).tee.sev_snp  # here the path is empty: only the remote side sees a tree
    status, rows = run_json(capsys, ["fleet", "doctor", "-i", str(fleet.inventory), "--known-hosts",
                                     str(fleet.known_hosts), "--json"])  # fmt: skip
    assert status == 0, rows
    by_host = {row["host"]: row for row in rows}  # type: ignore[attr-defined]
    assert "snp" in by_host["snp-host"]["capable"] and by_host["snp-host"]["accel"] == "kvm"
    assert by_host["tcg-host"]["capable"] == ["tcg"] and by_host["tcg-host"]["missing"]["snp"]
    assert by_host["snp-host"]["inventory_groups"] == by_host["tcg-host"]["inventory_groups"] == ["lab"]


def test_fleet_test_runs_only_where_the_capability_is_and_brings_results_back(
    fleet: Fleet, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "results"
    status, report = run_json(capsys, ["fleet", "test", "-i", str(fleet.inventory), "--known-hosts",
                                       str(fleet.known_hosts), "-m", "snp", "--out", str(out), "--json", "--",
                                       str(fleet.remote_test)])  # fmt: skip
    assert status == 0, report
    assert [r["host"] for r in report["ran"]] == ["snp-host"] and report["skipped"] == ["tcg-host"]  # type: ignore[index]
    suite = ET.parse(out / "snp-host" / "junit.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (
        "1",
        "0",
        "0",
    )
    assert (out / "snp-host" / "evidence.txt").read_text().startswith("snp seen on ")
    assert not (out / "tcg-host").exists()


def test_a_host_key_missing_from_known_hosts_is_refused_as_e221(fleet: Fleet, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    argv = ["fleet", "doctor", "-i", str(fleet.inventory), "--known-hosts", str(empty), "--json"]
    status, rows = run_json(capsys, argv)
    assert status == 1
    assert {row["error"]["code"] for row in rows} == {"E221"}  # type: ignore[index,union-attr]


def test_teelab_host_runs_one_command_on_a_lab_host(
    fleet: Fleet, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEELAB_REMOTE_TEELAB", f"{VENV_BIN}/teelab")
    monkeypatch.setenv("TEELAB_SSH_KEY", str(fleet.client_key))
    target = ["--host", f"root@127.0.0.1:{fleet.ports['snp-host']}", "--known-hosts", str(fleet.known_hosts)]
    status, report = run_json(capsys, [*target, "doctor", "--json", "--root", str(fleet.probe_root)])
    assert status == 0 and report["groups"]["snp"] == []  # type: ignore[index]
    status = main([*target, "doctor", "--root", str(fleet.probe_root), "--require", "tdx"])
    assert status == 2 and "E206" in capsys.readouterr().err  # the host's own exit status and error
