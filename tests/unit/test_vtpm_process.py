"""The swtpm of one VM without a VM: started, manufactured with a lab EK certificate, gone when closed; a
persistent vTPM keeps its state (and its EK) across starts; a bad mode is refused before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.attest import LabAuthority
from harness.attest.tpm_ca import TpmAuthority
from harness.tee.errors import VtpmError, VtpmOptionInvalid
from harness.tee.vtpm import STATE_FILE, Vtpm, vtpm_is_ephemeral


@pytest.fixture(scope="module")
def authority(lab: LabAuthority) -> TpmAuthority:
    return TpmAuthority.load_or_create(lab.directory / "tpm")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_an_ephemeral_vtpm_leaves_nothing_when_closed(authority: TpmAuthority) -> None:
    vtpm = Vtpm("unit-ephemeral", authority=authority).start()
    pid, folder = vtpm.pid, vtpm.folder
    assert pid is not None and alive(pid) and vtpm.socket.exists()
    assert (vtpm.state_dir / STATE_FILE).exists() and vtpm.state_dir.is_relative_to(folder)
    assert vtpm.manufacture_seconds > 0
    device = vtpm.device()
    assert device.chardev.path == vtpm.socket
    vtpm.close()
    assert not alive(pid) and not folder.exists()


def test_a_persistent_vtpm_keeps_its_state(authority: TpmAuthority, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Vtpm("unit-persistent", ephemeral=False, state_dir=state, authority=authority).start()
    first.close()
    assert (state / STATE_FILE).exists() and not first.folder.exists()
    kept = (state / STATE_FILE).stat().st_mtime_ns
    second = Vtpm("unit-persistent", ephemeral=False, state_dir=state, authority=authority).start()
    try:
        assert second.manufacture_seconds == 0  # not manufactured again: the same EPS, the same EK
    finally:
        second.close()
    assert (state / STATE_FILE).stat().st_mtime_ns >= kept


def test_a_state_folder_in_use_is_refused_and_cleaned_up(authority: TpmAuthority, tmp_path: Path) -> None:
    state = tmp_path / "busy"
    first = Vtpm("unit-busy", ephemeral=False, state_dir=state, authority=authority).start()
    try:
        second = Vtpm("unit-busy", ephemeral=False, state_dir=state, authority=authority)
        with pytest.raises(VtpmError) as err:
            second.start()
        assert err.value.code == "E960"
        assert not second.folder.exists()
    finally:
        first.close()


def test_a_bad_mode_is_refused() -> None:
    assert vtpm_is_ephemeral("ephemeral") and not vtpm_is_ephemeral("persistent")
    with pytest.raises(VtpmOptionInvalid) as err:
        vtpm_is_ephemeral("volatile")
    assert err.value.code == "E963" and err.value.exit_status == 2
    assert os.environ.get("TEELAB_STATE_DIR")  # the suite's own state dir: nothing lands in the user's
