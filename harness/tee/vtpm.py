"""A vTPM per VM: swtpm (TPM 2.0) on a control socket, attached as QEMU's ``tpm-crb``.

On first start the state is manufactured by ``swtpm_setup``: an RSA and an ECC endorsement key (persistent
at 0x81010001 and 0x81010016), their EK certificates in TPM NV (0x01c00002, 0x01c0000a), signed by the lab
TPM manufacturer CA through ``swtpm_localca``; a SHA-256 PCR bank. An ephemeral vTPM keeps its state in its
runtime folder, so the state goes with the VM (as Azure's NonPersistedTPM); a persistent one in
``<state dir>/vtpm/<name>`` (same EK on every boot). swtpm runs with ``--terminate`` (it exits when QEMU
closes the control channel) and dies with the harness (PDEATHSIG); the runtime folder (socket, log, CA
configuration, ephemeral state) is removed on ``close`` or by its watcher when the harness exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness import paths
from harness.aio import EventLoopThread, die_with_parent, shared_loop
from harness.attest.tpm_ca import TpmAuthority
from harness.host.runtime import remove_runtime_dir, runtime_dir
from harness.qemu.chardevs import ChardevSocket
from harness.qemu.devices import TpmCrb
from harness.tee.errors import VtpmError, VtpmOptionInvalid, VtpmUnavailable

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
SETUP_TIMEOUT = 60.0
STATE_FILE = "tpm2-00.permall"
LOCK_FILE = ".teelab-vtpm.lock"
RSA_EK_HANDLE, ECC_EK_HANDLE = 0x81010001, 0x81010016
RSA_EK_CERT_INDEX, ECC_EK_CERT_INDEX = 0x01C00002, 0x01C0000A


VTPM_MODES = ("ephemeral", "persistent")


def vtpm_is_ephemeral(mode: str) -> bool:
    """Whether a vTPM of ``mode`` ("ephemeral" or "persistent") loses its state with the VM."""
    if mode not in VTPM_MODES:
        raise VtpmOptionInvalid(f"vTPM mode {mode!r}", hint="use vtpm='ephemeral' or vtpm='persistent'")
    return mode == "ephemeral"


def persistent_state_dir(name: str) -> Path:
    """Where the persistent vTPM of VM ``name`` keeps its state."""
    return paths.state_dir() / "vtpm" / name


class Vtpm:
    """The swtpm of one VM: ``start()`` before QEMU launches, ``device()`` for its spec, ``close()`` after."""

    def __init__(
        self,
        name: str,
        *,
        ephemeral: bool = True,
        state_dir: Path | None = None,
        authority: TpmAuthority | None = None,
        loop: EventLoopThread | None = None,
    ) -> None:
        for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
            if shutil.which(tool) is None:
                raise VtpmUnavailable(
                    f"vTPM for {name}: {tool} is not installed", hint="apt-get install swtpm swtpm-tools"
                )
        self.name = name
        self.ephemeral = ephemeral
        self.authority = authority or TpmAuthority.load_or_create()
        self.folder = runtime_dir("vtpm")
        self.state_dir = self.folder / "state" if ephemeral else (state_dir or persistent_state_dir(name))
        self.socket = self.folder / "ctrl.sock"
        self.log_path = self.folder / "swtpm.log"
        self._loop = loop or shared_loop()
        self._process: subprocess.Popen[bytes] | None = None
        self.manufacture_seconds = 0.0
        self._lock_fd: int | None = None

    def device(self, device_id: str = "tpm0") -> TpmCrb:
        return TpmCrb(device_id, ChardevSocket(f"{device_id}-chr", path=self.socket))

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> Vtpm:
        """Manufacture the state if it is new, then start swtpm; returns once its socket listens. On failure
        nothing is left running and the runtime folder is gone."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._claim_state()
            if not (self.state_dir / STATE_FILE).exists():
                self.manufacture()
            argv = [
                "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                "--ctrl", f"type=unixio,path={self.socket},mode=0600",
                "--log", f"file={self.log_path},level=1", "--terminate",
            ]  # fmt: skip
            self._process = self._loop.call(self._spawn, argv)
            deadline = time.monotonic() + START_TIMEOUT
            while not self.socket.exists():
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise VtpmError(
                        f"swtpm for {self.name} did not start: {self._log_tail() or 'no output'}",
                        hint=f"is another swtpm using {self.state_dir}?",
                        state_dir=str(self.state_dir),
                    )
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise
        log.info("vTPM for %s: swtpm pid %d, state %s", self.name, self._process.pid, self.state_dir)
        return self

    def _claim_state(self) -> None:
        """Hold the state folder's lock while this vTPM runs: swtpm itself takes its lock only once QEMU
        initialises the TPM, so two VMs could otherwise share one persistent state."""
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VtpmError(
                f"vTPM for {self.name}: its state {self.state_dir} is in use by another vTPM",
                hint="stop the VM that uses it, or give this VM another name or state_dir",
                state_dir=str(self.state_dir),
            ) from None
        self._lock_fd = fd

    def manufacture(self) -> None:
        """swtpm_setup with swtpm_localca signing the EK certificates with the lab manufacturer CA."""
        ca = self.authority
        localca = self.folder / "swtpm-localca.conf"
        localca.write_text(
            f"statedir = {ca.directory}\nsigningkey = {ca.signing_key_path()}\n"
            f"issuercert = {ca.directory / 'tpm-manufacturer.pem'}\n"
            f"certserial = {ca.directory / 'certserial'}\n"
        )
        options = self.folder / "swtpm-localca.options"
        options.write_text("")
        setup = self.folder / "swtpm_setup.conf"
        setup.write_text(
            "create_certs_tool = swtpm_localca\n"
            f"create_certs_tool_config = {localca}\ncreate_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n"
        )
        argv = [
            "swtpm_setup", "--tpm2", "--tpmstate", str(self.state_dir), "--config", str(setup),
            "--create-ek-cert", "--lock-nvram", "--pcr-banks", "sha256", "--not-overwrite",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, timeout=SETUP_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise VtpmError(f"swtpm_setup for {self.name} ran past {SETUP_TIMEOUT:.0f} s") from None
        self.manufacture_seconds = time.monotonic() - started
        if done.returncode != 0 or not (self.state_dir / STATE_FILE).exists():
            text = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            raise VtpmError(
                f"swtpm_setup for {self.name} failed: {text[-1] if text else done.returncode}",
                hint="see the output in this error; the lab TPM CA is in " + str(ca.directory),
                output=(done.stdout + done.stderr).decode(errors="replace")[-2000:],
            )

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        # From the loop thread: PDEATHSIG follows the forking thread, which lives as long as the harness.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop swtpm (it normally exits by itself once QEMU is gone) and remove the runtime folder, with an
        ephemeral vTPM's state."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        remove_runtime_dir(self.folder)

    def __enter__(self) -> Vtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
