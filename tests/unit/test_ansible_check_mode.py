"""The role's kvm, snp, tdx and sgx groups in check mode against fixture probe trees (teelab_probe_root): a
host that has what its group promises passes every check, one that lacks it fails with the reason, and the
role says where its QEMU comes from (and, for sgx, what guests need to get quotes)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from host_trees import PVM_HOST, SGX_HOST, SNP_HOST, TDX_HOST, HostTree

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
KVM_HOST = HostTree(flags=("fpu", "vmx"), kvm=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ansible-playbook") is None, reason="ansible-core is not installed"),
]


def check(tmp_path: Path, group: str, host: HostTree) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook --check`` of site.yml, this machine in ``group`` with ``host`` as its probe tree."""
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"[{group}]\nlocalhost ansible_connection=local\n")
    root = host.write(tmp_path / "host")
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        ["ansible-playbook", "--check", "-i", str(inventory), "site.yml",
         "-e", f"teelab_probe_root={root}", "-e", f"teelab_prefix={tmp_path / 'prefix'}",
         "-e", f"teelab_config_file={tmp_path / 'etc' / 'teelab.toml'}",
         "-e", f"teelab_artifact_cache={tmp_path / 'artifacts'}"],
        cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(("group", "host"), [("kvm", KVM_HOST), ("snp", SNP_HOST), ("tdx", TDX_HOST)])
def test_a_capable_host_passes_its_groups_checks_in_check_mode(
    tmp_path: Path, group: str, host: HostTree
) -> None:
    done = check(tmp_path, group, host)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"provisioning a {group} host" in done.stdout
    if group != "kvm":
        assert f"QEMU {host.qemu_version} is new enough for {group}" in done.stdout


def test_an_snp_host_with_debians_qemu_is_told_which_qemu_the_role_builds(tmp_path: Path) -> None:
    done = check(tmp_path, "snp", dataclasses.replace(SNP_HOST, qemu_version="7.2.22"))
    assert done.returncode == 0, done.stdout[-3000:]
    assert (
        "QEMU 7.2.22 is older than 9.1 (snp): building qemu 1:10.2.2+ds-1 from Debian sid's source "
        "(qemu_10.2.2+ds.orig.tar.xz, sha256 be05230f" in done.stdout
    )


@pytest.mark.parametrize(
    ("group", "reason"),
    [
        ("kvm", "no usable KVM: /proc/cpuinfo shows no vmx or svm"),
        ("snp", "no usable KVM"),
        ("tdx", "no usable KVM"),
    ],
)
def test_this_kind_of_host_fails_its_groups_checks_with_the_reason(
    tmp_path: Path, group: str, reason: str
) -> None:
    done = check(tmp_path, group, PVM_HOST)
    assert done.returncode != 0
    assert reason in done.stdout


@pytest.mark.parametrize(
    ("group", "host", "reason"),
    [("snp", KVM_HOST, "kvm_amd sev_snp is not Y or /dev/sev is missing"),
     ("tdx", KVM_HOST, "kvm_intel tdx is not Y")],
)  # fmt: skip
def test_a_kvm_host_without_the_tee_fails_the_tee_check(
    tmp_path: Path, group: str, host: HostTree, reason: str
) -> None:
    done = check(tmp_path, group, host)
    assert done.returncode != 0 and reason in done.stdout


def test_an_sgx_host_passes_its_groups_checks_and_is_told_what_guests_need_for_quotes(tmp_path: Path) -> None:
    done = check(tmp_path, "sgx", SGX_HOST)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "provisioning a sgx host" in done.stdout
    assert (
        "SGX: cpu flags sgx sgx_lc; /dev/sgx_vepc yes; /dev/sgx_enclave yes; /dev/sgx_provision yes; "
        "EPC node 0 64 MiB, node 1 128 MiB" in done.stdout
    )
    assert "QEMU 7.2.22 is new enough for sgx" in done.stdout  # Debian 12's QEMU has sgx-epc.N.node
    assert "teelab_sgx_pccs_url is empty: run a PCCS" in done.stdout


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (dataclasses.replace(SGX_HOST, flags=("fpu", "vmx", "sgx")),
         "/proc/cpuinfo shows sgx: enable SGX and flexible launch control"),
        (dataclasses.replace(SGX_HOST, sgx_devices=("sgx_enclave", "sgx_provision")), "no /dev/sgx_vepc:"),
        (dataclasses.replace(SGX_HOST, epc_bytes={}), "no EPC on any node:"),
        (dataclasses.replace(SGX_HOST, extra_objects=()), "QEMU 7.2.22 lists no memory-backend-epc"),
    ],
)  # fmt: skip
def test_an_sgx_host_lacking_a_piece_fails_naming_it(tmp_path: Path, host: HostTree, reason: str) -> None:
    done = check(tmp_path, "sgx", host)
    assert done.returncode != 0 and reason in done.stdout, done.stdout[-3000:]
