"""SSH into lab guests with paramiko, the guest's host key pinned from what it reports over its agent.

The agent (a virtio-serial port, no network) brings the guest's NIC up, makes its ed25519 host key, installs
an ephemeral client key as root's only authorized key and starts dropbear (no passwords); it then reads the
host key back. The client accepts that key and no other (``RejectPolicy``, no trust on first use): a server
presenting another key is ``SshHostKeyChanged`` (E641) before anything is sent.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cbor2
import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from teelab_guest import binding

from harness.agent import ExecResult, GuestAgent
from harness.attest import Policy, verify
from harness.errors import LabError
from harness.qemu.devices import VirtioNetUser
from harness.qemu.spec import VMSpec

NIC_ID = "net0"
GUEST_HOST_KEY = "/run/teelab-ssh/host_ed25519"
# Run by the agent as root: the NIC on QEMU's user network, root in /etc/passwd (the image has none), the
# authorized key from stdin, the host key (kept across restarts), dropbear without passwords, the public key.
START_SSHD = """set -e
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
ip link set lo up
ip link set "$nic" up
ip addr add 10.0.2.15/24 dev "$nic" 2>/dev/null || true
ip route add default via 10.0.2.2 2>/dev/null || true
mkdir -p /run/teelab-ssh /root/.ssh
chmod 700 /root /root/.ssh
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >> /etc/passwd
cat > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
[ -f {key} ] || dropbearkey -t ed25519 -f {key} >/dev/null 2>&1
dropbear -r {key} -p {port} -s -P /run/teelab-ssh/dropbear.pid 2>/run/teelab-ssh/dropbear.log
dropbearkey -y -f {key} | grep '^ssh-ed25519 '
"""


class SshError(LabError):
    code = "E640"
    title = "SSH to a guest failed"
    explanation = "The SSH connection to a guest could not be made or broke; the error says where it stopped."


class SshHostKeyChanged(SshError):
    code = "E641"
    title = "SSH host key is not the pinned one"
    explanation = (
        "The SSH server presented a host key other than the one the guest reported over its agent (pinned, "
        "no trust on first use). Nothing was sent: another machine may be answering on that port."
    )


class SshUnavailable(SshError):
    code = "E642"
    title = "guest has no SSH"
    explanation = (
        "SSH needs a guest booted with a NIC (spec_for_image(..., ssh=True)), dropbear in its image (the "
        "parent image) and its agent; enclaves never get a NIC."
    )


class SshHostKeyNotAttested(SshError):
    code = "E643"
    title = "SSH host key not attested"
    explanation = (
        "The confidential guest's evidence did not verify against the policy, or its report_data does not "
        "bind the host key it serves (with the verifier's nonce); the key is not pinned and nothing connects."
    )


@dataclass(frozen=True)
class SshResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def free_port() -> int:
    """A TCP port free on the loopback now (for the NIC's forward)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nic_of(spec: VMSpec) -> VirtioNetUser | None:
    return next((d for d in spec.devices if isinstance(d, VirtioNetUser)), None)


def host_key_from_line(line: str) -> paramiko.PKey:
    """``ssh-ed25519 AAAA... [comment]`` as a paramiko key; SshError when it is not one."""
    parts = line.split()
    try:
        if len(parts) < 2 or parts[0] != "ssh-ed25519":
            raise ValueError(line[:80])
        return paramiko.Ed25519Key(data=base64.b64decode(parts[1], validate=True))
    except (ValueError, paramiko.SSHException) as exc:
        raise SshError(
            f"the guest reported no ed25519 host key: {exc}",
            hint="see /run/teelab-ssh/dropbear.log in the guest",
        ) from exc


def client_key() -> tuple[paramiko.Ed25519Key, str]:
    """A fresh ed25519 client key and its authorized_keys line."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    import io

    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode())), public.decode() + " teelab\n"


def start_sshd(agent: GuestAgent, authorized: str, port: int = 22) -> paramiko.PKey:
    """Start dropbear in the guest through its agent; returns the host key the guest reports."""
    script = START_SSHD.format(key=GUEST_HOST_KEY, port=port)
    done: ExecResult = agent.exec(["sh", "-c", script], stdin=authorized.encode(), timeout=60)
    if done.returncode != 0:
        raise SshUnavailable(
            f"dropbear did not start in {agent.machine.spec.name}: "
            + done.stderr.decode(errors="replace")[-300:],
            hint="boot the parent image (it carries dropbear) with ssh=True",
        )
    return host_key_from_line(done.text.strip().splitlines()[-1])


class GuestSsh:
    """An SSH session to a guest on ``127.0.0.1:host_port`` that accepts only ``host_key``."""

    def __init__(
        self, host_port: int, host_key: paramiko.PKey, key: paramiko.PKey, *, user: str = "root"
    ) -> None:
        self.host_port = host_port
        self.host_key = host_key
        self.user = user
        self._key = key
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float = 30.0) -> GuestSsh:
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{self.host_port}", self.host_key.get_name(), self.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                "127.0.0.1", self.host_port, username=self.user, pkey=self._key, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False, allow_agent=False,
            )  # fmt: skip
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise SshHostKeyChanged(
                f"127.0.0.1:{self.host_port} presented host key {exc.key.fingerprint}, pinned is "
                f"{self.host_key.fingerprint}",
                hint="the guest's key changed or another machine answers; pin only from the guest's agent",
                presented=exc.key.fingerprint,
                pinned=self.host_key.fingerprint,
            ) from exc
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            raise SshError(
                f"SSH to 127.0.0.1:{self.host_port} failed: {exc}",
                hint="is the guest up with ssh=True? its /run/teelab-ssh/dropbear.log says more",
            ) from exc
        self._client = client
        return self

    def exec(self, command: str | Sequence[str], *, stdin: bytes = b"", timeout: float = 60.0) -> SshResult:
        """Run ``command`` (a shell string, or argv quoted for the shell) and wait for it."""
        if self._client is None:
            self.connect()
        assert self._client is not None
        text = command if isinstance(command, str) else shlex.join(command)
        try:
            channel_in, channel_out, channel_err = self._client.exec_command(text, timeout=timeout)
            if stdin:
                channel_in.write(stdin)
            channel_in.channel.shutdown_write()
            stdout, stderr = channel_out.read(), channel_err.read()
            return SshResult(channel_out.channel.recv_exit_status(), stdout, stderr)
        except (paramiko.SSHException, OSError, TimeoutError) as exc:
            raise SshError(
                f"SSH command {text[:80]!r} failed: {exc}", hint="see the guest's console"
            ) from exc

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file into the guest."""
        done = self.exec(["sh", "-c", 'cat > "$0"', remote], stdin=Path(local).read_bytes())
        if done.returncode != 0:
            raise SshError(
                f"copy to {remote} failed: {done.stderr.decode(errors='replace')}", hint="check the path"
            )

    def get(self, remote: str, local: Path) -> None:
        """Copy a file out of the guest."""
        done = self.exec(["cat", remote])
        if done.returncode != 0:
            raise SshError(
                f"copy from {remote} failed: {done.stderr.decode(errors='replace')}", hint="check the path"
            )
        Path(local).write_bytes(done.stdout)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


def attested_host_key(agent: GuestAgent, policy: Policy) -> paramiko.PKey:
    """The host key a confidential guest binds into its evidence (``teelab_guest.ssh_hostkey``: report_data =
    ``binding.report_data(nonce, the key's SPKI DER)``), once that evidence verifies against ``policy``."""
    nonce = os.urandom(32)
    done = agent.exec(["python3", "-m", "teelab_guest.ssh_hostkey", nonce.hex()], timeout=120)
    try:
        record = cbor2.loads(done.stdout)
        line = str(record["host_key"])
        der = serialization.load_ssh_public_key(line.encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
        raise SshHostKeyNotAttested(
            f"{agent.machine.spec.name} gave no host key evidence: "
            + done.stderr.decode(errors="replace")[-300:],
            hint="boot the cvm image with a NIC and start its SSH server first",
        ) from exc
    bound = replace(policy, report_data=binding.report_data(nonce, der))
    verdict = verify(record["blob"], bound, certificates=record["aux"])
    if not verdict.ok:
        raise SshHostKeyNotAttested(
            f"{agent.machine.spec.name}: host key evidence refused: {', '.join(sorted(verdict.codes))}",
            hint="the guest is not the one the policy names, or it attests another key",
            reasons=sorted(verdict.codes),
        )
    return host_key_from_line(line)


def open_ssh(agent: GuestAgent, spec: VMSpec, policy: Policy | None = None) -> GuestSsh:
    """Start the guest's SSH server through ``agent`` and connect with its pinned host key; with ``policy``
    (a confidential guest) the key pinned is the one its verified evidence binds."""
    nic = nic_of(spec)
    if nic is None:
        raise SshUnavailable(
            f"{spec.name} has no NIC", hint="boot it with ssh=True (parents and CVMs; enclaves never get one)"
        )
    key, authorized = client_key()
    host_key = start_sshd(agent, authorized, nic.guest_port)
    if policy is not None:
        host_key = attested_host_key(agent, policy)
    return GuestSsh(nic.host_port, host_key, key).connect()
