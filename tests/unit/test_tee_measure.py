"""Launch measurements: sev-snp-measure's vectors reproduce, and every launch input moves the lab values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmm_types import VMMType

from harness.tee.errors import MeasureInputInvalid, MeasureInputMissing
from harness.tee.measure import (
    METHOD_LAB,
    METHOD_SEV_SNP_MEASURE,
    LaunchInputs,
    MeasuredEvent,
    measure,
    measure_snp,
    measure_tdx,
    replay_rtmrs,
    snp_firmware_measures,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "snp-measure"
FIXTURES = VECTORS / "fixtures"
SNP_VECTORS = json.loads((VECTORS / "vectors.json").read_text())["vectors"]


def _fixture(name: str | None) -> Path | None:
    return None if name is None else FIXTURES / name


@pytest.mark.parametrize("vector", SNP_VECTORS, ids=[v["name"] for v in SNP_VECTORS])
def test_sev_snp_measure_reproduces_the_vendored_vectors(vector: dict) -> None:
    expected = bytes.fromhex(vector["expected_launch_digest"])
    digest = calc_launch_digest(
        SevMode.SEV_SNP,
        vector["vcpus"],
        int(vector["vcpu_sig"], 16) if vector["vcpu_sig"] else 0,
        str(FIXTURES / vector["ovmf"]),
        str(_fixture(vector["kernel"])) if vector["kernel"] else None,
        str(_fixture(vector["initrd"])) if vector["initrd"] else None,
        vector["append"],
        int(vector["guest_features"], 16),
        vector["snp_ovmf_hash"] or "",
        vmm_type=VMMType[vector["vmm_type"]],
    )
    assert digest == expected


QEMU_VECTORS = [v for v in SNP_VECTORS if v["vmm_type"] == "QEMU" and not v["snp_ovmf_hash"]]


@pytest.mark.parametrize("vector", QEMU_VECTORS, ids=[v["name"] for v in QEMU_VECTORS])
def test_measure_snp_takes_sev_snp_measure_for_an_snp_ovmf(vector: dict) -> None:
    inputs = LaunchInputs(
        kernel=_fixture(vector["kernel"]),
        initrd=_fixture(vector["initrd"]),
        cmdline=vector["append"] or "",
        vcpus=vector["vcpus"],
        vcpu_type=vector["vcpu_type"],
        firmware=FIXTURES / vector["ovmf"],
        guest_features=int(vector["guest_features"], 16),
    )
    result = measure_snp(inputs)
    assert result.method == METHOD_SEV_SNP_MEASURE
    assert result.measurement.hex() == vector["expected_launch_digest"]


def test_only_the_amdsev_ovmf_can_measure_a_kernel() -> None:
    assert snp_firmware_measures(FIXTURES / "ovmf_AmdSev_suffix.bin", kernel=True)
    assert not snp_firmware_measures(FIXTURES / "ovmf_OvmfX64_suffix.bin", kernel=True)
    assert snp_firmware_measures(FIXTURES / "ovmf_OvmfX64_suffix.bin", kernel=False)
    assert not snp_firmware_measures(FIXTURES / "README.md", kernel=False)
    assert not snp_firmware_measures(FIXTURES / "empty", kernel=False)


def test_a_firmware_that_cannot_hash_the_kernel_gets_the_lab_digest_over_all_inputs(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    inputs = LaunchInputs(kernel=kernel, firmware=FIXTURES / "ovmf_OvmfX64_suffix.bin")
    result = measure_snp(inputs)
    assert result.method == METHOD_LAB
    assert result.measurement != measure_snp(replace(inputs, firmware=None)).measurement


@pytest.fixture
def launch(tmp_path: Path) -> LaunchInputs:
    files = {}
    for name in ("vmlinuz", "initrd.img", "other-kernel", "other-initrd", "firmware.fd", "other-firmware.fd"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode() * 100)
    return LaunchInputs(
        kernel=files["vmlinuz"],
        initrd=files["initrd.img"],
        cmdline="console=ttyS0 teelab.role=cvm",
        vcpus=2,
    )


def _changes(base: LaunchInputs) -> dict[str, LaunchInputs]:
    """One changed input per entry, for the table-driven tests."""
    tmp = base.kernel.parent  # type: ignore[union-attr]
    return {
        "kernel content": replace(base, kernel=tmp / "other-kernel"),
        "initrd content": replace(base, initrd=tmp / "other-initrd"),
        "no initrd": replace(base, initrd=None),
        "cmdline": replace(base, cmdline="console=ttyS0 teelab.role=parent"),
        "cmdline trailing space": replace(base, cmdline=base.cmdline + " "),
        "empty cmdline": replace(base, cmdline=""),
        "vcpus": replace(base, vcpus=3),
        "vcpu type": replace(base, vcpu_type="EPYC-Milan"),
        "firmware added": replace(base, firmware=tmp / "firmware.fd"),
        "policy": replace(base, policy=0x30001),
        "guest features": replace(base, guest_features=0x21),
    }


def test_every_snp_lab_input_changes_the_measurement(launch: LaunchInputs) -> None:
    base = measure_snp(launch)
    assert base.method == METHOD_LAB and len(base.measurement) == 48
    seen = {base.measurement: "base"}
    for what, changed in _changes(launch).items():
        digest = measure_snp(changed).measurement
        assert digest not in seen, f"{what} gives the same measurement as {seen.get(digest)}"
        seen[digest] = what
    firmware = replace(launch, firmware=launch.kernel.parent / "firmware.fd")  # type: ignore[union-attr]
    other = replace(firmware, firmware=launch.kernel.parent / "other-firmware.fd")  # type: ignore[union-attr]
    assert measure_snp(firmware).measurement != measure_snp(other).measurement


def test_file_content_not_name_is_measured(launch: LaunchInputs, tmp_path: Path) -> None:
    copy = tmp_path / "copy-of-kernel"
    copy.write_bytes(launch.kernel.read_bytes())  # type: ignore[union-attr]
    assert measure_snp(replace(launch, kernel=copy)).measurement == measure_snp(launch).measurement
    launch.kernel.write_bytes(b"rebuilt kernel")  # type: ignore[union-attr]
    assert measure_snp(replace(launch, kernel=copy)).measurement != measure_snp(launch).measurement


TDX_MOVES = {
    "kernel content": {"mrtd", 1},  # without a firmware, MRTD covers the kernel
    "initrd content": {1},
    "no initrd": {1},
    "cmdline": {2},
    "cmdline trailing space": {2},
    "empty cmdline": {2},
    "vcpus": {0},
    "firmware added": {"mrtd", 0},
    "policy": {0},
}


def test_every_tdx_input_moves_exactly_its_registers(launch: LaunchInputs) -> None:
    base = measure_tdx(launch)
    assert base.rtmrs[3] == bytes(48)
    changes = _changes(launch)
    for what, registers in TDX_MOVES.items():
        changed = measure_tdx(changes[what])
        moved: set[object] = {i for i in range(4) if changed.rtmrs[i] != base.rtmrs[i]}
        if changed.mrtd != base.mrtd:
            moved.add("mrtd")
        assert moved == registers, what
    # the vCPU type and SEV features are SNP-only inputs
    assert measure_tdx(changes["vcpu type"]) == base
    assert measure_tdx(changes["guest features"]) == base


def test_tdx_events_replay_to_the_rtmrs_and_a_tampered_event_does_not(launch: LaunchInputs) -> None:
    result = measure_tdx(launch)
    assert replay_rtmrs(result.events) == result.rtmrs
    assert [(e.rtmr, e.name) for e in result.events] == [
        (0, "td-config"), (1, "kernel"), (1, "initrd"), (2, "cmdline")
    ]  # fmt: skip
    tampered = list(result.events)
    tampered[1] = MeasuredEvent(1, "kernel", bytes(48))
    assert replay_rtmrs(tampered) != result.rtmrs
    swapped = [result.events[0], result.events[2], result.events[1], result.events[3]]
    assert replay_rtmrs(swapped)[1] != result.rtmrs[1]


def test_json_views_carry_hex_values(launch: LaunchInputs) -> None:
    snp = measure("snp", launch).to_dict()
    assert snp["kind"] == "snp" and snp["policy"] == "0x30000"
    assert bytes.fromhex(snp["measurement"]) == measure_snp(launch).measurement
    tdx = measure("tdx", launch).to_dict()
    assert tdx["td_attributes"] == "0x10000000" and len(tdx["events"]) == 4
    assert bytes.fromhex(tdx["rtmr1"]) == measure_tdx(launch).rtmrs[1]


@pytest.mark.parametrize(
    "change, error",
    [
        ({"vcpus": 0}, MeasureInputInvalid),
        ({"vcpus": 256}, MeasureInputInvalid),
        ({"policy": -1}, MeasureInputInvalid),
        ({"policy": 2**64}, MeasureInputInvalid),
        ({"kernel": None, "firmware": None}, MeasureInputInvalid),
        ({"kernel": None, "firmware": FIXTURES / "ovmf_AmdSev_suffix.bin"}, MeasureInputInvalid),
        ({"kernel": Path("/nonexistent/vmlinuz")}, MeasureInputMissing),
        ({"initrd": Path("/nonexistent/initrd")}, MeasureInputMissing),
    ],
)
def test_bad_inputs_are_refused_with_a_code(launch: LaunchInputs, change: dict, error: type) -> None:
    for kind in ("snp", "tdx"):
        with pytest.raises(error) as info:
            measure(kind, replace(launch, **change))  # type: ignore[arg-type]
        assert info.value.hint


def test_unknown_vcpu_type_is_refused_when_sev_snp_measure_is_used(launch: LaunchInputs) -> None:
    inputs = replace(launch, firmware=FIXTURES / "ovmf_AmdSev_suffix.bin", vcpu_type="max")
    with pytest.raises(MeasureInputInvalid, match="vCPU type 'max'"):
        measure_snp(inputs)
    assert measure_snp(replace(inputs, firmware=None)).method == METHOD_LAB  # the lab digest takes any type
