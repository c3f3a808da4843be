"""Lab hosts over SSH: the Ansible inventory read by ``ansible-inventory``, paramiko sessions whose host keys
come from known_hosts only (no trust on first use), commands, and fetching a result folder by SFTP."""

from __future__ import annotations

import contextlib
import json
import shlex
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from harness.errors import LabError


class RemoteHostError(LabError):
    code = "E220"
    title = "lab host unreachable"
    explanation = (
        "A lab host of the inventory could not be reached over SSH, or a command there could not run."
    )


class RemoteHostKeyUnknown(RemoteHostError):
    code = "E221"
    title = "lab host key not known"
    explanation = (
        "The lab host's SSH key is not in the known_hosts file given (or differs from it); teelab never "
        "trusts a host key on first use. Add the host's key to known_hosts (ssh-keyscan, checked elsewhere)."
    )


class InventoryError(RemoteHostError):
    code = "E222"
    title = "inventory unreadable"
    explanation = "ansible-inventory could not read the inventory file, or it lists no host."
    exit_status = 2


@dataclass(frozen=True)
class FleetHost:
    """One host of the inventory: its SSH address, the groups it is in, and its variables."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    groups: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict)

    def var(self, name: str, default: str | None = None) -> str | None:
        value = self.variables.get(name, default)
        return None if value is None else str(value)


def read_inventory(path: Path) -> list[FleetHost]:
    """The hosts of an Ansible inventory, as ``ansible-inventory --list`` resolves them (groups, variables,
    ``ansible_host``, ``ansible_port``, ``ansible_user``)."""
    try:
        done = subprocess.run(
            ["ansible-inventory", "-i", str(path), "--list"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InventoryError(f"cannot run ansible-inventory: {exc}", hint="install ansible-core") from exc
    if done.returncode != 0 or not Path(path).is_file():
        raise InventoryError(
            f"ansible-inventory refused {path}: {done.stderr.strip()[-300:]}",
            hint="check the file",
            path=str(path),
        )
    data = json.loads(done.stdout)
    hostvars: dict[str, dict[str, Any]] = data.get("_meta", {}).get("hostvars", {})
    groups: dict[str, list[str]] = {}
    for group, body in data.items():
        for host in body.get("hosts", []) if isinstance(body, dict) else []:
            groups.setdefault(host, []).append(group)
    names = sorted(set(groups) | set(hostvars))
    if not names:
        raise InventoryError(f"{path} lists no host", hint="add hosts under a [group]", path=str(path))
    hosts = []
    for name in names:
        variables = hostvars.get(name, {})
        hosts.append(
            FleetHost(
                name=name,
                address=str(variables.get("ansible_host", name)),
                port=int(variables.get("ansible_port", 22)),
                user=str(variables.get("ansible_user", "root")),
                groups=tuple(sorted(g for g in groups.get(name, []) if g not in ("all", "ungrouped"))),
                variables=variables,
            )
        )
    return hosts


@dataclass(frozen=True)
class RemoteResult:
    returncode: int
    stdout: str
    stderr: str


class RemoteHost:
    """A paramiko session to a lab host; its key must be in ``known_hosts`` (default ~/.ssh/known_hosts)."""

    def __init__(self, host: FleetHost, *, known_hosts: Path | None = None, timeout: float = 30.0) -> None:
        self.host = host
        client = paramiko.SSHClient()
        known = known_hosts or Path.home() / ".ssh" / "known_hosts"
        with contextlib.suppress(FileNotFoundError):
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = host.var("ansible_ssh_private_key_file")
        try:
            client.connect(
                host.address, host.port, username=host.user, key_filename=key_file, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
            )  # fmt: skip
        except (paramiko.BadHostKeyException, paramiko.SSHException) as exc:
            client.close()
            if isinstance(exc, paramiko.BadHostKeyException) or "not found in known_hosts" in str(exc):
                raise RemoteHostKeyUnknown(
                    f"{host.name} ({host.address}:{host.port}): {exc}",
                    hint=f"add its key to {known} after checking it out of band (ssh-keyscan -p {host.port})",
                    host=host.name,
                ) from exc
            raise RemoteHostError(
                f"{host.name}: {exc}", hint="check the inventory and the key", host=host.name
            ) from exc
        except OSError as exc:
            client.close()
            raise RemoteHostError(
                f"{host.name} ({host.address}:{host.port}) is unreachable: {exc}",
                hint="is sshd running there? check ansible_host and ansible_port",
                host=host.name,
            ) from exc
        self._client = client

    def run(self, command: str, *, timeout: float = 600.0) -> RemoteResult:
        """Run a shell command on the host and wait for it."""
        try:
            _stdin, stdout, stderr = self._client.exec_command(command, timeout=timeout)
            out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
            return RemoteResult(stdout.channel.recv_exit_status(), out, err)
        except (paramiko.SSHException, OSError, TimeoutError) as exc:
            raise RemoteHostError(
                f"{self.host.name}: {command[:80]!r} failed: {exc}", hint="see the host"
            ) from exc

    def fetch(self, remote: str, local: Path) -> list[Path]:
        """Copy the folder ``remote`` (recursively) into ``local`` by SFTP; returns the files copied."""
        copied: list[Path] = []
        with self._client.open_sftp() as sftp:
            self._fetch(sftp, remote, local, copied)
        return copied

    def _fetch(self, sftp: paramiko.SFTPClient, remote: str, local: Path, copied: list[Path]) -> None:
        local.mkdir(parents=True, exist_ok=True)
        for entry in sftp.listdir_attr(remote):
            source, target = f"{remote}/{entry.filename}", local / entry.filename
            if stat.S_ISDIR(entry.st_mode or 0):
                self._fetch(sftp, source, target, copied)
            elif stat.S_ISREG(entry.st_mode or 0):
                sftp.get(source, str(target))
                copied.append(target)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def teelab_command(host: FleetHost, *args: str) -> str:
    """``teelab ARGS`` as the host runs it: its ``teelab_command`` variable (default ``teelab``), then
    ``--root teelab_probe_root`` for doctor when the host sets one (a fixture tree, for stand-in hosts)."""
    command = host.var("teelab_command", "teelab") or "teelab"
    words = list(args)
    root = host.var("teelab_probe_root")
    if root and args[:1] == ("doctor",):
        words += ["--root", root]
    return command + " " + shlex.join(words)


def capabilities(remote: RemoteHost) -> dict[str, Any]:
    """``teelab doctor --json`` as the host itself reports it: its probe and, per capability group, what it
    lacks (empty: it has the group)."""
    done = remote.run(teelab_command(remote.host, "doctor", "--json"), timeout=120)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        report = {}
    if not isinstance(
        report.get("groups"), dict
    ):  # a doctor that predates the groups field cannot be matched
        raise RemoteHostError(
            f"{remote.host.name}: teelab doctor --json gave no capability report: "
            + done.stderr.strip()[-300:],
            hint="install teelab there (the Ansible role does) or set teelab_command in the inventory",
            host=remote.host.name,
        )
    return report


@dataclass(frozen=True)
class SuiteRun:
    """A test run on one host: pytest's exit status and the folder its results were brought back to."""

    host: str
    returncode: int
    results: Path
    files: tuple[Path, ...]


def run_suite(remote: RemoteHost, pytest_args: list[str], out: Path) -> SuiteRun:
    """Run pytest on the host (``teelab_pytest``, default ``python3 -m pytest``, in ``teelab_repo_dir``) with
    JUnit XML and ``TEELAB_FLEET_ARTIFACTS`` in a fresh folder there, bring that folder back to ``out/<host>``
    by SFTP, and remove it on the host."""
    host = remote.host
    made = remote.run("mktemp -d -t teelab-fleet.XXXXXX")
    folder = made.stdout.strip()
    if made.returncode != 0 or not folder.startswith("/"):
        raise RemoteHostError(f"{host.name}: mktemp failed: {made.stderr.strip()}", hint="check /tmp there")
    try:
        pytest = host.var("teelab_pytest", "python3 -m pytest") or "python3 -m pytest"
        repo = host.var("teelab_repo_dir", ".") or "."
        command = (
            f"cd {shlex.quote(repo)} && TEELAB_FLEET_ARTIFACTS={shlex.quote(folder)} {pytest} "
            f"{shlex.join(pytest_args)} --junitxml={shlex.quote(folder + '/junit.xml')}"
        )
        done = remote.run(command, timeout=3600)
        (out / host.name).mkdir(parents=True, exist_ok=True)
        (out / host.name / "pytest.log").write_text(done.stdout + done.stderr)
        files = remote.fetch(folder, out / host.name)
    finally:
        remote.run(f"rm -rf {shlex.quote(folder)}")
    return SuiteRun(host.name, done.returncode, out / host.name, tuple(files))
