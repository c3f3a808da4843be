"""``teelab enclave build-image`` (over a stand-in base image) and ``teelab enclave boot``'s refusals: codes,
exit statuses, and no VM started for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_enclave_run_recipe import write_recipe

from harness import images, paths
from harness.enclave import build_eif, read_eif


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe ``demo`` whose base image is a small stand-in (no mmdebstrap in unit tests)."""
    monkeypatch.setenv("TEELAB_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("TEELAB_CACHE_DIR", str(tmp_path / "cache"))
    write_recipe(tmp_path / "images", "demo")
    (tmp_path / "vmlinuz").write_bytes(b"k" * 8192)
    (tmp_path / "initrd").write_bytes(b"i" * 8192)
    base = images.BuiltImage("enclave", "e" * 64, "enclave", tmp_path / "vmlinuz", tmp_path / "initrd",
                             "console=ttyS0 teelab.role=enclave", 8192, False, 0.0)  # fmt: skip
    monkeypatch.setattr(images, "build", lambda name, on_step=None: base)
    return tmp_path


def test_build_image_prints_describe_json_with_the_path_and_hits_the_cache(run, recipes: Path) -> None:
    status, out, _ = run("enclave", "build-image", "demo", "--json")
    assert status == 0
    report = json.loads(out)
    image = read_eif(report["Path"])
    assert report["Measurements"]["PCR0"] == image.measurements.pcr0.hex()
    assert report["EifBytes"] == image.size and report["MinimumMemoryMiB"] == 128
    assert (report["ImageName"], report["ImageVersion"], report["Built"]) == ("demo", "2.1", True)
    status, out, _ = run("enclave", "build-image", "demo", "--json")
    assert status == 0 and json.loads(out)["Built"] is False and json.loads(out)["Path"] == report["Path"]


def test_build_image_of_an_unknown_recipe_is_e930(run, recipes: Path) -> None:
    status, _, err = run("enclave", "build-image", "nosuch")
    assert status == 2 and err.startswith("[ E930 ] no enclave recipe 'nosuch'") and "demo" in err


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    (tmp_path / "k").write_bytes(b"k" * 4096)
    (tmp_path / "r").write_bytes(b"r" * 4096)
    build_eif(tmp_path / "app.eif", kernel=tmp_path / "k", cmdline="x", ramdisks=[tmp_path / "r"])
    return tmp_path / "app.eif"


@pytest.mark.parametrize(
    ("args", "code"),
    [(["--vcpus", "3"], "E933"), (["--vcpus", "0"], "E933"), (["--memory", "64"], "E932")],
)
def test_boot_refuses_bad_sizes_before_starting_anything(run, eif: Path, args: list[str], code: str) -> None:
    runs = set(os.listdir(paths.runs_dir()))
    status, out, _ = run("enclave", "boot", str(eif), *args, "--json")
    assert status == 2 and json.loads(out)["error"]["code"] == code
    assert set(os.listdir(paths.runs_dir())) == runs  # no VM was launched


def test_boot_refuses_a_corrupt_image_with_the_readers_code(run, eif: Path) -> None:
    eif.write_bytes(b"not an enclave image" * 40)
    status, _, err = run("enclave", "boot", str(eif))
    assert status == 2 and err.startswith("[ E902 ]")
