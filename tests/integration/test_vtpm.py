"""A CVM with a vTPM: guest-init's measurements equal ``teelab measure --kind tpm``'s prediction, its quote
verifies, a policy for another command line is refused naming PCR 8, and launch/kill cycles leave no swtpm
process, socket or state folder behind."""

from __future__ import annotations

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

from harness.attest.policy import NonceBook, Policy
from harness.attest.tpm_ca import TpmAuthority
from harness.attest.verifier import verify
from harness.attest.verify_tpm import verify_tpm
from harness.host.runtime import runtime_root
from harness.lab import Lab, tpm_guest
from harness.qemu.errors import MachineError
from harness.tee import tpm_measure, vtpm_attest
from harness.tee.vtpm import persistent_state_dir

pytestmark = pytest.mark.vm

TAG = "vtpm-check"
TEELAB = str(Path(sys.executable).with_name("teelab"))
CYCLES = 20
HARNESS_SCRIPT = textwrap.dedent(
    """
    import sys
    from harness import images
    from harness.lab import Lab
    lab = Lab()
    plan = lab.plan_cvm(images.build("cvm"), name=sys.argv[1], vsock=False, vtpm="ephemeral")
    machine = lab.launch(plan.spec)
    print(machine.pid, plan.vtpm.pid, plan.vtpm.folder, flush=True)
    sys.stdin.read()
    """
)


def swtpm_pids() -> set[int]:
    """Live swtpm processes serving a socket under this session's runtime root."""
    root = str(runtime_root()).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"swtpm") and any(root in a for a in argv) and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def vtpm_folders() -> set[Path]:
    return {p for p in runtime_root().iterdir() if p.name.startswith("vtpm-")}


def test_a_booted_guests_quote_verifies_and_another_command_line_is_refused_naming_pcr8(cvm_image) -> None:
    authority = TpmAuthority.load_or_create()
    with Lab() as lab:
        plan = lab.plan_cvm(cvm_image, name="vtpm-quote", vsock=False, vtpm="ephemeral")
        boot = lab.boot_planned(plan, timeout=120)
        guest = tpm_guest(boot)
        ak = vtpm_attest.certify_ak(guest, authority)
        predicted = tpm_measure.predict(plan.spec.cmdline, cvm_image.initrd)
        book = NonceBook()
        nonce = book.issue()
        evidence = vtpm_attest.quote(guest, ak, nonce)
        assert dict(evidence.pcrs) == predicted.pcrs
        argv = [TEELAB, "measure", "--kind", "tpm", "--image", "cvm", "--json"]
        measured = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        assert measured["pcrs"] == {str(i): v.hex() for i, v in evidence.pcrs.items()}
        assert [e["digest"] for e in evidence.event_log] == [e["digest"] for e in predicted.events]
        policy = Policy(roots=("lab",), nonce=nonce, nonce_book=book, pcrs=predicted.pcrs)
        verdict = verify_tpm(evidence.to_bytes(), policy)
        assert verdict.ok, verdict.reasons
        assert verdict.claims["cmdline"] == plan.spec.cmdline
        assert verify_tpm(evidence.to_bytes(), policy).codes == {"nonce-reused"}
        other = tpm_measure.predict(plan.spec.cmdline + " teelab.other=1", cvm_image.initrd).pcrs
        nonce = os.urandom(32)
        refused = verify_tpm(
            vtpm_attest.quote(guest, ak, nonce).to_bytes(), Policy(roots=("lab",), nonce=nonce, pcrs=other)
        )
        assert {(r.code, r.field) for r in refused.reasons} == {("pcr-mismatch", "pcr8")}
        nonce = os.urandom(32)  # one verdict for the CVM and its vTPM: the SNP report binds the nonce and AK
        both = vtpm_attest.quote(guest, ak, nonce, tee=True)
        measurement = bytes.fromhex(plan.measurement_hex() or "")
        cvm = Policy(roots=("lab",), nonce=nonce, pcrs=predicted.pcrs, measurement=measurement)
        verdict = verify(both.to_bytes(), cvm)
        assert verdict.ok and verdict.claims["tee"]["measurement"] == measurement.hex(), verdict.reasons
        socket, folder = plan.vtpm.socket, plan.vtpm.folder  # type: ignore[union-attr]
        assert socket.exists() and plan.vtpm.pid in swtpm_pids()  # type: ignore[union-attr]
        lab.stop(boot.machine)
        assert not folder.exists() and swtpm_pids() == set()


def test_twenty_launch_kill_cycles_leave_no_swtpm_socket_or_state(cvm_image) -> None:
    before = vtpm_folders()
    ends: dict[str, int] = {}
    with Lab() as lab:
        for cycle in range(CYCLES):
            name = f"{TAG}-{cycle}"
            how = ("powerdown", "boot-timeout", "sigkill-qemu", "kill-harness")[cycle % 4]
            ends[how] = ends.get(how, 0) + 1
            if how == "kill-harness":
                harness = subprocess.Popen(
                    [sys.executable, "-c", HARNESS_SCRIPT, name],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                qemu, swtpm, folder = harness.stdout.readline().split()  # type: ignore[union-attr]
                assert int(swtpm) in swtpm_pids()
                harness.kill()
                harness.wait()
                assert _gone(int(qemu), int(swtpm), Path(folder)), (
                    f"cycle {cycle}: QEMU, swtpm or {folder} outlived their harness"
                )
                continue
            plan = lab.plan_cvm(cvm_image, name=name, vsock=False, vtpm="ephemeral")
            assert plan.vtpm is not None and plan.vtpm.pid in swtpm_pids()
            if how == "powerdown":
                boot = lab.boot_planned(plan, timeout=120)
                lab.stop(boot.machine)
            elif how == "boot-timeout":
                with pytest.raises(MachineError, match=r"(?i)time"):
                    lab.boot_planned(plan, timeout=0.5)
            else:
                closers = [plan.tee.close, plan.vtpm.close]
                kill = lambda machine: os.kill(machine.pid, signal.SIGKILL)  # noqa: E731
                with pytest.raises(MachineError):  # QEMU died before guest-init was ready
                    lab.boot(plan.spec, timeout=30, on_launch=kill, closers=closers)
            assert not plan.vtpm.folder.exists() and plan.vtpm.pid not in swtpm_pids(), (
                f"cycle {cycle}: {how}"
            )
    assert ends == {"powerdown": 5, "boot-timeout": 5, "sigkill-qemu": 5, "kill-harness": 5}
    assert qemu_pids(TAG) == set()
    assert swtpm_pids() == set()
    assert vtpm_folders() <= before
    assert not persistent_state_dir(f"{TAG}-0").exists()


def _gone(qemu: int, swtpm: int, folder: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (alive(qemu) or alive(swtpm) or folder.exists()):
            return True
        time.sleep(0.05)
    return False


def test_a_persistent_vtpm_keeps_its_ek_and_ak_across_boots(cvm_image) -> None:
    authority = TpmAuthority.load_or_create()
    seen = []
    with Lab() as lab:
        for _ in range(2):
            plan = lab.plan_cvm(cvm_image, name="vtpm-persist", vsock=False, vtpm="persistent")
            boot = lab.boot_planned(plan, timeout=120)
            ak = vtpm_attest.certify_ak(tpm_guest(boot), authority)
            seen.append((ak.ek_certificate.fingerprint, ak.ak_public))
            folder = plan.vtpm.folder  # type: ignore[union-attr]
            lab.stop(boot.machine)
            assert not folder.exists() and (persistent_state_dir("vtpm-persist") / "tpm2-00.permall").exists()
    assert seen[0] == seen[1]
