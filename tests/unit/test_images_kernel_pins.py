"""Kernel pins beyond the host's suite: a pin names its Debian suite (fetched through the builder's own apt
configuration), falls back to the artifact cache when the archive cannot serve it, and ships its modules as
.ko.xz under usr/lib/modules, which the builder takes."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.images.errors import KernelFetchFailed, RecipeInvalid
from harness.images.kernel import fetch_deb, module_dependencies, sha256_file, unpack
from harness.images.recipe import KernelPin, load_kernel_pin, load_recipe, recipe_names

UNREACHABLE = "http://127.0.0.1:9/debian"  # the discard port: nothing listens, the connection is refused


def xz_module(path: Path, depends: str) -> bytes:
    elf = b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=" + path.name.encode() + b"\0"
    path.write_bytes(lzma.compress(elf))
    return elf


@pytest.fixture
def merged_usr_deb(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A kernel .deb shaped like Debian 13's: modules compressed, under usr/lib/modules."""
    package = tmp_path / "package"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: k\nVersion: 2\nArchitecture: amd64\nMaintainer: lab <lab@example.net>\nDescription: k\n"
    )
    (package / "boot").mkdir()
    (package / "boot" / "vmlinuz-6.12.0-test").write_bytes(os.urandom(1 << 16))
    modules = package / "usr/lib/modules/6.12.0-test/kernel/drivers/virt/coco"
    modules.mkdir(parents=True)
    (modules.parents[3] / "modules.builtin").write_text("kernel/fs/configfs/configfs.ko.xz\n")
    elves = {
        "tsm": xz_module(modules / "tsm.ko.xz", "configfs"),
        "sev_guest": xz_module(modules / "sev-guest.ko.xz", "tsm"),
        "tdx_guest": xz_module(modules / "tdx-guest.ko.xz", "tsm"),
    }
    deb = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(package), str(deb)], check=True, capture_output=True)
    return deb, elves


def test_compressed_modules_under_usr_lib_are_resolved_and_decompressed_once(
    tmp_path: Path, merged_usr_deb: tuple[Path, dict[str, bytes]]
) -> None:
    deb, elves = merged_usr_deb
    pin = KernelPin("k", "2", sha256_file(deb))
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(deb, cache / pin.deb_name)
    tree = unpack(pin, cache)
    assert set(tree.modules) == set(elves) and "configfs" in tree.builtin
    assert module_dependencies(tree.modules["sev_guest"]) == ["tsm"]
    assert tree.with_dependencies(("sev_guest", "tdx_guest")) == ["tsm", "sev_guest", "tdx_guest"]
    plain = tree.module_file("sev_guest")
    assert plain.name == "sev-guest.ko" and plain.read_bytes() == elves["sev_guest"]
    made = plain.stat().st_mtime_ns
    assert tree.module_file("sev_guest") == plain and plain.stat().st_mtime_ns == made
    assert unpack(pin, cache).modules["sev_guest"] == plain  # a later build takes the decompressed file


@pytest.fixture
def unreachable_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Debian mirror refuses connections; the artifact cache is an empty folder of this test's."""
    config = tmp_path / "teelab.toml"
    config.write_text("")
    monkeypatch.setenv("TEELAB_CONFIG", str(config))
    monkeypatch.setenv("TEELAB_DEBIAN_MIRROR", UNREACHABLE)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    monkeypatch.setenv("TEELAB_IMAGES_ARTIFACT_CACHE", str(artifacts))
    return artifacts


def test_a_pin_the_archive_cannot_serve_comes_from_the_artifact_cache(
    tmp_path: Path, merged_usr_deb: tuple[Path, dict[str, bytes]], unreachable_archive: Path
) -> None:
    deb, _ = merged_usr_deb
    pin = KernelPin("linux-image-k", "2", sha256_file(deb), suite="trixie")
    shutil.copyfile(deb, unreachable_archive / pin.deb_name)
    cache = tmp_path / "cache"
    fetched = fetch_deb(pin, cache)
    assert fetched == cache / pin.deb_name and sha256_file(fetched) == pin.sha256
    sources = (cache / "apt-trixie" / "sources.list").read_text()
    assert f"{UNREACHABLE} trixie main" in sources  # the builder's own apt configuration, not the host's
    assert not list(cache.glob(".download-*"))


def test_without_archive_or_artifact_the_fetch_fails_coded_and_leaves_nothing(
    tmp_path: Path, unreachable_archive: Path
) -> None:
    pin = KernelPin("linux-image-k", "2", "0" * 64, suite="trixie")
    cache = tmp_path / "cache"
    with pytest.raises(KernelFetchFailed) as caught:
        fetch_deb(pin, cache)
    assert caught.value.code == "E503"
    assert "apt-get download linux-image-k=2 failed" in caught.value.message
    assert (
        "the artifact cache has no" in caught.value.message and str(unreachable_archive) in caught.value.hint
    )
    assert not list(cache.glob("*.deb")) and not list(cache.glob(".download-*"))


def test_an_artifact_with_another_hash_is_refused_and_removed(
    tmp_path: Path, merged_usr_deb: tuple[Path, dict[str, bytes]], unreachable_archive: Path
) -> None:
    deb, _ = merged_usr_deb
    pin = KernelPin("linux-image-k", "2", "f" * 64, suite="trixie")
    shutil.copyfile(deb, unreachable_archive / pin.deb_name)
    cache = tmp_path / "cache"
    with pytest.raises(KernelFetchFailed, match="the pin says ffff"):
        fetch_deb(pin, cache)
    assert not (cache / pin.deb_name).exists()


def test_kernel_pins_are_not_recipes_and_the_6_12_images_use_theirs() -> None:
    pin = load_kernel_pin("kernel-6.12")
    assert pin.suite == "trixie" and pin.package.startswith("linux-image-6.12.")
    assert load_kernel_pin().suite is None
    assert {"cvm612", "parent612"} <= set(recipe_names()) and not any(
        name.startswith("kernel") for name in recipe_names()
    )
    for name in ("cvm612", "parent612"):
        recipe = load_recipe(name)
        assert recipe.kernel == "kernel-6.12"
        assert {"configfs", "tsm", "sev_guest", "tdx_guest"} <= set(recipe.modules)
    assert load_recipe("cvm").kernel == "kernel"
    with pytest.raises(RecipeInvalid, match="no kernel pin 'cvm'"):
        load_kernel_pin("cvm")
