"""Planning an enclave launch without a VM: the sizing rules and their codes, the spec (memfd kernel and
initrd, only the agent and security-module ports), the module's PCRs and documents, and that refused or
abandoned plans leave no file descriptor behind."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_hosts import tcg_host
from teelab_guest import nsm_wire
from teelab_guest.protocol import AGENT_PORT
from teelab_guest.tee_wire import TEE_PORT

from harness.attest import LAB, LabAuthority, Policy, verify
from harness.enclave import build_eif, pcr3_of_parent_role, pcr4_of_parent_instance, read_eif
from harness.enclave import errors as codes
from harness.enclave import plan as launch_plan
from harness.qemu.devices import VirtioSerialPort

MIB = 1 << 20


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> LabAuthority:
    return LabAuthority.load_or_create(tmp_path_factory.mktemp("lab-ca"))


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    """A small EIF: 64 KiB kernel, 2 ramdisks, metadata defaults of 4 vCPUs and 300 MiB."""
    (tmp_path / "bzImage").write_bytes(os.urandom(64 * 1024))
    (tmp_path / "init.cpio").write_bytes(os.urandom(32 * 1024))
    (tmp_path / "app.cpio").write_bytes(os.urandom(4 * 1024))
    path = tmp_path / "app.eif"
    build_eif(
        path,
        kernel=tmp_path / "bzImage",
        cmdline="console=ttyS0 teelab.role=enclave",
        ramdisks=[tmp_path / "init.cpio", tmp_path / "app.cpio"],
        name="My App 1",
        custom_metadata={"CPUCount": 4, "MemoryMiB": 300},
    )
    return path


def open_fds() -> set[str]:
    """What this process has open (fd -> target), memfds included."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used
            out.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
    return out


@pytest.fixture
def no_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    assert {fd for fd in open_fds() - before if "memfd:" in fd} == set()


def plan(eif: Path, authority: LabAuthority, **options: Any) -> launch_plan.EnclaveLaunch:
    return launch_plan.plan_enclave(
        eif, host=tcg_host(), authority=authority, parent_instance="i-parent", **options
    )


# ---------------------------------------------------------------------------------------------- sizing rules


def test_the_minimum_is_128_mib_or_four_times_the_image() -> None:
    assert launch_plan.minimum_memory_mib(0) == 128
    assert launch_plan.minimum_memory_mib(32 * MIB) == 128
    assert launch_plan.minimum_memory_mib(32 * MIB + 1) == 129  # rounded up to a whole MiB
    assert launch_plan.minimum_memory_mib(50_000_545) == 191  # the hello image
    launch_plan.check_memory(191, 50_000_545)
    with pytest.raises(codes.EnclaveMemoryTooSmall, match="at least 191 MiB") as caught:
        launch_plan.check_memory(190, 50_000_545)
    assert (caught.value.code, caught.value.exit_status) == ("E932", 2)
    assert caught.value.evidence["minimum_mib"] == 191 and "191" in (caught.value.hint or "")
    with pytest.raises(codes.EnclaveMemoryTooSmall, match="at least 128 MiB"):
        launch_plan.check_memory(127, None)
    for bad in (True, 512.0, "512", None):
        with pytest.raises(codes.EnclaveMemoryTooSmall):
            launch_plan.check_memory(bad, None)


@pytest.mark.parametrize("vcpus", [2, 4, 8, 62])
def test_even_vcpu_counts_from_2_to_62_are_accepted(vcpus: int) -> None:
    launch_plan.check_vcpus(vcpus)


@pytest.mark.parametrize(("vcpus", "hint"), [(1, 2), (3, 4), (0, 2), (-2, 2), (5, 6), (64, 62), (63, 62)])
def test_odd_and_out_of_range_vcpu_counts_are_refused_with_a_count_that_works(vcpus: int, hint: int) -> None:
    with pytest.raises(codes.EnclaveVcpuCount, match="even number from 2 to 62") as caught:
        launch_plan.check_vcpus(vcpus)
    assert caught.value.code == "E933" and caught.value.hint == f"give vcpus = {hint}"


@pytest.mark.parametrize("vcpus", [True, 2.0, "2", None])
def test_a_vcpu_count_must_be_an_integer(vcpus: object) -> None:
    with pytest.raises(codes.EnclaveVcpuCount):
        launch_plan.check_vcpus(vcpus)


# ---------------------------------------------------------------------------------------------- the plan


def test_the_plan_boots_the_image_bytes_from_sealed_memfds(eif: Path, authority, no_leaks) -> None:
    image = read_eif(eif)
    with plan(eif, authority) as launch:
        spec = launch.spec
        for path in (spec.kernel, spec.initrd):
            assert str(path).startswith(f"/proc/{os.getpid()}/fd/")
            assert os.readlink(path).startswith("/memfd:teelab-enclave-")
            assert stat.S_ISREG(os.stat(path).st_mode)
        assert spec.kernel.read_bytes() == b"".join(image.section_chunks(image.kernel))
        assert spec.initrd.read_bytes() == b"".join(
            chunk for ramdisk in image.ramdisks for chunk in image.section_chunks(ramdisk)
        )
        with pytest.raises(PermissionError), open(spec.initrd, "r+b") as initrd:  # sealed
            initrd.write(b"x")
        assert spec.cmdline == "console=ttyS0 teelab.role=enclave"
        assert (spec.name, spec.vcpus, spec.memory_mib) == ("enclave-My-App-1", 4, 300)  # metadata defaults
        assert spec.confidential is None and spec.memory is None
        ports = {d.name for d in spec.devices if isinstance(d, VirtioSerialPort)}
        assert ports == {AGENT_PORT, TEE_PORT} and len(spec.devices) == 2  # no network, no disk
        launch.release_files()
        assert not os.path.exists(spec.initrd)


def test_without_the_agent_only_the_security_module_port_remains(eif: Path, authority, no_leaks) -> None:
    with plan(eif, authority, agent=False, vcpus=2, memory_mib=256) as launch:
        assert [d.name for d in launch.spec.devices] == [TEE_PORT]  # type: ignore[attr-defined]
        assert (launch.spec.vcpus, launch.spec.memory_mib) == (2, 256)


def test_the_module_has_the_image_and_parent_pcrs_and_its_documents_verify(eif: Path, authority) -> None:
    image = read_eif(eif)
    with plan(eif, authority, parent_role="arn:aws:iam::1:role/lab") as launch:
        module = launch.module
        assert module.pcr(0) == image.measurements.pcr0 and module.pcr(2) == image.measurements.pcr2
        assert module.pcr(3) == pcr3_of_parent_role("arn:aws:iam::1:role/lab")
        assert module.pcr(4) == pcr4_of_parent_instance("i-parent")
        assert module.pcr(8) == bytes(48)
        assert launch.enclave_id.startswith("i-parent-enc") and module.module_id == launch.enclave_id
        answer = module.handle(nsm_wire.attestation(nonce=b"n" * 32, public_key=b"k" * 91))
        document = nsm_wire.decode_response(answer, "Attestation").document
    policy = Policy(
        roots=(LAB,), pcrs={0: image.measurements.pcr0, 3: module.pcr(3)}, lab_dir=authority.directory
    )
    verdict = verify(document, policy)
    assert verdict.ok, verdict.reasons
    assert verdict.claims["module_id"] == launch.enclave_id


def test_a_debug_plan_attests_with_zero_pcrs(eif: Path, authority) -> None:
    image = read_eif(eif)
    with plan(eif, authority, debug=True, memory_mib=128) as launch:
        assert launch.debug and launch.module.pcr(0) == image.measurements.pcr0  # DescribePCR keeps them
        answer = launch.module.handle(nsm_wire.attestation(nonce=b"n" * 32))
    document = nsm_wire.decode_response(answer, "Attestation").document
    verdict = verify(
        document, Policy(roots=(LAB,), pcrs={0: image.measurements.pcr0}, lab_dir=authority.directory)
    )
    assert "debug-not-allowed" in verdict.codes


def test_the_default_memory_is_raised_to_the_images_minimum(tmp_path: Path, authority, no_leaks) -> None:
    (tmp_path / "k").write_bytes(b"k" * 1024)
    with open(tmp_path / "big", "wb") as big:
        big.truncate(40 * MIB)  # 4 x the image is 161 MiB; the default is 512
    path = tmp_path / "big.eif"
    build_eif(
        path,
        kernel=tmp_path / "k",
        cmdline="x",
        ramdisks=[tmp_path / "big"],
        custom_metadata={"MemoryMiB": 128},
    )
    with plan(path, authority) as launch:
        assert launch.spec.memory_mib == 162  # the minimum, rounded up to an even MiB
        assert launch.spec.vcpus == 2


@pytest.mark.parametrize("custom", ["[4, 300]", '"4 vCPUs"', "7"])
def test_custom_metadata_that_is_not_an_object_gives_no_defaults(
    tmp_path: Path, authority, no_leaks, monkeypatch: pytest.MonkeyPatch, custom: str
) -> None:
    from harness.enclave import eif_build as eif_format

    written = eif_format._metadata_bytes
    monkeypatch.setattr(  # an image from another tool: CustomMetadata may be any JSON
        eif_format,
        "_metadata_bytes",
        lambda *args: written(*args).replace(b'"CustomMetadata":null', f'"CustomMetadata":{custom}'.encode()),
    )
    (tmp_path / "k").write_bytes(b"k" * 1024)
    (tmp_path / "r").write_bytes(b"r" * 1024)
    build_eif(tmp_path / "other.eif", kernel=tmp_path / "k", cmdline="x", ramdisks=[tmp_path / "r"])
    with plan(tmp_path / "other.eif", authority) as launch:
        assert (launch.spec.vcpus, launch.spec.memory_mib) == (
            launch_plan.DEFAULT_VCPUS,
            launch_plan.DEFAULT_MEMORY_MIB,
        )


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"vcpus": 3}, codes.EnclaveVcpuCount),
        ({"vcpus": 64}, codes.EnclaveVcpuCount),
        ({"memory_mib": 127}, codes.EnclaveMemoryTooSmall),
        ({"parent_role": ""}, codes.PcrInputInvalid),
        ({"parent_instance": ""}, codes.PcrInputInvalid),
    ],
)
def test_bad_options_are_refused_before_anything_is_made(
    eif: Path, authority, no_leaks, options: dict[str, Any], error: type[Exception]
) -> None:
    options = {"parent_instance": "i-parent", **options}
    with pytest.raises(error):
        launch_plan.plan_enclave(eif, host=tcg_host(), authority=authority, **options)


def test_odd_vcpus_are_refused_before_the_image_is_even_read(tmp_path: Path, authority) -> None:
    with pytest.raises(codes.EnclaveVcpuCount):
        plan(tmp_path / "missing.eif", authority, vcpus=1)


def test_memory_below_four_times_the_image_is_refused(tmp_path: Path, authority, no_leaks) -> None:
    (tmp_path / "k").write_bytes(b"k" * 1024)
    with open(tmp_path / "big", "wb") as big:
        big.truncate(40 * MIB)
    build_eif(tmp_path / "big.eif", kernel=tmp_path / "k", cmdline="x", ramdisks=[tmp_path / "big"])
    with pytest.raises(codes.EnclaveMemoryTooSmall, match="4 x the 41,9"):
        plan(tmp_path / "big.eif", authority, memory_mib=160)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda data: data[:100], codes.EifTruncated),
        (lambda data: b"MZ" + data[2:], codes.EifBadMagic),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), codes.EifCrcMismatch),
        (lambda data: data + b"\0", codes.EifSectionTable),
    ],
)
def test_a_corrupt_image_is_refused_with_the_readers_code(
    eif: Path, authority, no_leaks, damage, error
) -> None:
    eif.write_bytes(damage(eif.read_bytes()))
    with pytest.raises(error):
        plan(eif, authority)


def test_a_missing_image_is_e913(tmp_path: Path, authority) -> None:
    with pytest.raises(codes.EifInputInvalid):
        plan(tmp_path / "nothing.eif", authority)


def test_an_image_changed_while_copied_is_refused(eif: Path, authority, no_leaks, monkeypatch) -> None:
    original = launch_plan.EifImage.section_chunks

    def tampered(self, section):  # the file changes between reading and copying
        for chunk in original(self, section):
            yield bytes(b ^ 1 for b in chunk) if section.index == len(self.sections) - 1 else chunk

    monkeypatch.setattr(launch_plan.EifImage, "section_chunks", tampered)
    with pytest.raises(codes.EnclaveImageChanged, match="changed while it was being launched"):
        plan(eif, authority)


def test_a_spec_the_host_refuses_closes_the_files(eif: Path, authority, no_leaks) -> None:
    from harness.qemu.errors import SpecError

    with pytest.raises(SpecError):
        plan(eif, authority, name="not a valid name")


def test_an_aarch64_image_is_refused(tmp_path: Path, authority, no_leaks) -> None:
    (tmp_path / "k").write_bytes(b"k" * 1024)
    (tmp_path / "r").write_bytes(b"r" * 1024)
    build_eif(
        tmp_path / "arm.eif", kernel=tmp_path / "k", cmdline="x", ramdisks=[tmp_path / "r"], arch="aarch64"
    )
    with pytest.raises(codes.EifInputInvalid, match="aarch64"):
        plan(tmp_path / "arm.eif", authority)
