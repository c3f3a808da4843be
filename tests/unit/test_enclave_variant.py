"""An enclave image with words added to its command line: only PCR0 and PCR1 move, the rest is the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.enclave.eif import read_eif
from harness.enclave.eif_build import build_eif
from harness.enclave.errors import EnclaveRecipeInvalid
from harness.enclave.variant import with_cmdline_words


@pytest.fixture
def image(tmp_path: Path) -> Path:
    (tmp_path / "bzImage").write_bytes(b"kernel" * 1000)
    (tmp_path / "boot.cpio").write_bytes(b"bootstrap" * 1000)
    (tmp_path / "app.cpio").write_bytes(b"application" * 100)
    build_eif(
        tmp_path / "app.eif", kernel=tmp_path / "bzImage", cmdline="console=ttyS0 teelab.role=enclave",
        ramdisks=[tmp_path / "boot.cpio", tmp_path / "app.cpio"], name="app", version="2.1",
        custom_metadata={"Recipe": "app", "MemoryMiB": 256},
    )  # fmt: skip
    return tmp_path / "app.eif"


def test_added_words_land_before_the_role_and_move_only_pcr0_and_pcr1(image: Path, tmp_path: Path) -> None:
    source = read_eif(image)
    pinned = with_cmdline_words(image, ["teelab.kms_ca=sha256:ab", "x=1"], tmp_path / "out" / "pinned.eif")
    assert read_eif(pinned.path).cmdline == b"console=ttyS0 teelab.kms_ca=sha256:ab x=1 teelab.role=enclave"
    before, after = source.measurements, pinned.measurements
    assert after.pcr0 != before.pcr0 and after.pcr1 != before.pcr1 and after.pcr2 == before.pcr2
    assert [s.size for s in pinned.ramdisks] == [s.size for s in source.ramdisks]
    assert pinned.metadata["ImageName"] == "app" and pinned.metadata["ImageVersion"] == "2.1"
    assert pinned.metadata["CustomMetadata"] == {"Recipe": "app", "MemoryMiB": 256}
    # the same words give the same image measurements; one word more gives another PCR0
    again = with_cmdline_words(image, ["teelab.kms_ca=sha256:ab", "x=1"], tmp_path / "again.eif")
    assert again.measurements == after
    modified = with_cmdline_words(image, ["teelab.kms_ca=sha256:ab", "x=1", "y"], tmp_path / "modified.eif")
    assert modified.measurements.pcr0 != after.pcr0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pinned.eif"]  # no temp files left


@pytest.mark.parametrize("word", ["two words", "quote'd", "", "tab\there"])
def test_a_word_that_is_not_plain_is_refused_and_writes_nothing(
    image: Path, tmp_path: Path, word: str
) -> None:
    with pytest.raises(EnclaveRecipeInvalid) as caught:
        with_cmdline_words(image, [word], tmp_path / "bad" / "bad.eif")
    assert caught.value.code == "E931"
    assert not (tmp_path / "bad").exists()
