"""Image recipes, module dependency order and the content address, without building anything."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import images
from harness.images.errors import RecipeInvalid, RecipeUnknown
from harness.images.kernel import KernelTree, module_dependencies, sha256_file, unpack
from harness.images.recipe import KernelPin, load_recipe, recipe_names


def test_recipes_extend_base_and_add_to_its_lists() -> None:
    base_packages = set(load_recipe("enclave").packages)
    parent = load_recipe("parent")
    assert {"python3-minimal", "python3-cryptography", "python3-cbor2", "busybox"} <= base_packages
    assert set(parent.packages) == base_packages | {"dropbear-bin"}
    assert parent.role == "parent" and "teelab.role=parent" in parent.kernel_cmdline()
    assert "vmw_vsock_virtio_transport" in parent.modules
    assert set(recipe_names()) >= {"enclave", "parent"} and "base" not in recipe_names()


def test_unknown_recipe_is_a_coded_error_listing_the_known_ones() -> None:
    with pytest.raises(RecipeUnknown) as caught:
        load_recipe("no-such-image")
    assert caught.value.code == "E501" and "enclave" in caught.value.hint


def write_recipes(directory: Path, **files: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "kernel.toml").write_text('package = "k"\nversion = "1"\nsha256 = "00"\n')
    for name, text in files.items():
        (directory / f"{name}.toml").write_text(text)


def test_bad_recipes_are_refused_with_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEELAB_IMAGES_DIR", str(tmp_path))
    write_recipes(tmp_path, loop='extends = "loop"\nrole = "cvm"\n', norole='suite = "bookworm"\n',
                  badlist='suite = "bookworm"\nrole = "cvm"\n', child='extends = "badlist"\npackages = "x"\n',
                  broken="role = [", alone='suite = "bookworm"\nrole = "cvm"\nmodules = "x"\n')  # fmt: skip
    for name, text in (("loop", "extends itself"), ("norole", "'role'"), ("child", "must be a list"),
                       ("broken", "not valid TOML"), ("alone", "must be a list")):  # fmt: skip
        with pytest.raises(RecipeInvalid, match=text) as caught:
            load_recipe(name)
        assert caught.value.code == "E502" and caught.value.hint


def test_the_image_key_follows_its_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("enclave")
    key = images.image_key(recipe)
    assert images.image_key(load_recipe("enclave")) == key
    assert images.image_key(dataclasses.replace(recipe, cmdline=(*recipe.cmdline, "debug"))) != key
    assert images.image_key(dataclasses.replace(recipe, packages=(*recipe.packages, "strace"))) != key
    monkeypatch.setenv("TEELAB_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert images.image_key(recipe) != key


def fake_module(path: Path, depends: str) -> Path:
    path.write_bytes(
        b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=" + path.stem.encode() + b"\0"
    )
    return path


def test_modules_come_after_their_dependencies(tmp_path: Path) -> None:
    depends = {
        "virtio": "",
        "virtio_ring": "virtio",
        "virtio_pci": "virtio,virtio_ring,virtio_pci_modern_dev",
        "virtio_pci_modern_dev": "",
        "vsock": "",
        "vmw_vsock_virtio_transport_common": "vsock,virtio,virtio_ring",
        "vmw_vsock_virtio_transport": "vmw_vsock_virtio_transport_common,vsock,virtio,virtio_ring",
    }
    ko = {name: fake_module(tmp_path / f"{name}.ko", deps) for name, deps in depends.items()}
    tree = KernelTree(tmp_path, tmp_path / "vmlinuz", ko, frozenset({"virtio_pci_modern_dev"}))
    order = tree.with_dependencies(("virtio_pci", "vmw_vsock_virtio_transport"))
    assert "virtio_pci_modern_dev" not in order  # built in
    assert sorted(order) == sorted(set(ko) - {"virtio_pci_modern_dev"})
    for name in order:
        for dependency in module_dependencies(ko[name]):
            if dependency in order:
                assert order.index(dependency) < order.index(name), (dependency, name)
    with pytest.raises(RecipeInvalid, match="not in the pinned kernel"):
        tree.with_dependencies(("nvidia",))


def test_pruning_keeps_the_newest_builds_and_spares_other_names(tmp_path: Path) -> None:
    from harness.images import cache

    def build(name: str, key: str, age: int) -> Path:
        folder = cache.build_dir(tmp_path, name, key * 16)
        folder.mkdir()
        (folder / "image.json").write_text("{}")
        os.utime(folder / "image.json", (1_000_000 + age, 1_000_000 + age))
        return folder

    ours = [build("enclave", str(i), i) for i in range(5)]
    other = build("enclave-big", "a", 0)
    cache.prune_builds(tmp_path, "enclave", "image.json", keep=ours[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ours[0].name, ours[4].name, ours[3].name, ours[2].name, other.name]
    )


def test_builds_that_share_the_kernel_unpack_it_once_between_them(tmp_path: Path) -> None:
    package = tmp_path / "package"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: k\nVersion: 1\nArchitecture: amd64\nMaintainer: lab <lab@example.net>\nDescription: k\n"
    )
    (package / "boot").mkdir()
    (package / "boot" / "vmlinuz-6.1.0-test").write_bytes(os.urandom(1 << 20))
    modules = package / "lib/modules/6.1.0-test/kernel"
    modules.mkdir(parents=True)
    for index in range(40):
        fake_module(modules / f"m{index}.ko", "")
    deb = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(package), str(deb)], check=True, capture_output=True)
    pin = KernelPin("k", "1", sha256_file(deb))
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(deb, cache / pin.deb_name)
    with concurrent.futures.ThreadPoolExecutor(3) as builders:
        trees = list(builders.map(lambda _: unpack(pin, cache), range(3)))  # re-raises the first failure
    assert [len(tree.modules) for tree in trees] == [40, 40, 40]
