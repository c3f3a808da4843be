"""``teelab measure --kind tpm``: the PCRs guest-init's measurements lead to, read from a real newc cpio."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from teelab_guest import tpm_boot, tpm_wire

from harness.tee import tpm_measure
from harness.tee.errors import MeasureInputInvalid, MeasureInputMissing

CMDLINE = "console=ttyS0 teelab.role=cvm"


def initramfs(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "root"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "usr/lib/python3/dist-packages/teelab_guest/link.py").symlink_to("init.py")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = tmp_path / "initrd.cpio"
    with open(out, "wb") as handle:
        listing = "\n".join(names).encode()
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc"], input=listing, stdout=handle, cwd=root, check=True
        )
    return out


FILES = {
    "init": b"#!/usr/bin/python3.11 -IS\n",
    "usr/lib/python3/dist-packages/teelab_guest/init.py": b"x = 1\n",
    "lib/modules/teelab/evdev.ko": b"\x7fELF" + bytes(1001),  # a size that needs padding
    "usr/lib/python3/dist-packages/other.py": b"not measured",
}


def test_prediction_replays_the_events_guest_init_would_extend(tmp_path: Path) -> None:
    predicted = tpm_measure.predict(CMDLINE, initramfs(tmp_path, FILES))
    root = tmp_path / "root"
    (tmp_path / "cmdline").write_text(CMDLINE + "\n")
    assert list(predicted.events) == tpm_boot.boot_events(str(root), str(tmp_path / "cmdline"))
    pcr9 = bytes(32)
    for item in predicted.events[1:]:
        pcr9 = tpm_wire.extend(pcr9, bytes.fromhex(str(item["digest"])))
    assert predicted.pcrs[9] == pcr9
    cmdline_digest = bytes.fromhex(str(tpm_boot.cmdline_event(CMDLINE)["digest"]))
    assert predicted.pcrs[8] == tpm_wire.extend(bytes(32), cmdline_digest)
    assert all(predicted.pcrs[i] == bytes(32) for i in range(8))
    guest_init = str(predicted.events[1]["data"])
    assert "usr/lib/python3/dist-packages/teelab_guest/init.py" in guest_init and "other.py" not in guest_init
    assert "link.py" not in guest_init  # links are not files guest-init reads twice


def test_one_changed_byte_changes_only_its_pcr(tmp_path: Path) -> None:
    before = tpm_measure.predict(CMDLINE, initramfs(tmp_path / "a", FILES)).pcrs
    changed = FILES | {"lib/modules/teelab/evdev.ko": FILES["lib/modules/teelab/evdev.ko"] + b"!"}
    after = tpm_measure.predict(CMDLINE, initramfs(tmp_path / "b", changed)).pcrs
    assert {i for i in before if before[i] != after[i]} == {9}
    unmeasured = FILES | {"usr/lib/python3/dist-packages/other.py": b"changed"}
    assert tpm_measure.predict(CMDLINE, initramfs(tmp_path / "c", unmeasured)).pcrs == before


def test_a_missing_or_compressed_initrd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeasureInputMissing):
        tpm_measure.predict(CMDLINE, tmp_path / "absent")
    (tmp_path / "gz").write_bytes(b"\x1f\x8b" + bytes(200))
    with pytest.raises(MeasureInputInvalid) as err:
        tpm_measure.predict(CMDLINE, tmp_path / "gz")
    assert err.value.code == "E952"


def test_the_cli_prints_the_prediction(tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    initrd = initramfs(tmp_path, FILES)
    status, out, _ = run("measure", "--kind", "tpm", "--initrd", str(initrd), "--cmdline", CMDLINE, "--json")
    assert status == 0
    assert json.loads(out) == {"cmdline": CMDLINE, **tpm_measure.predict(CMDLINE, initrd).to_dict()}
    status, _, err = run("measure", "--kind", "tpm", "--cmdline", CMDLINE)
    assert status == 2 and "E102" in err
