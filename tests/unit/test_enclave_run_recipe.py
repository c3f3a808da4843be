"""Enclave recipes (images/enclaves/<name>/): loading and its errors, the cache key, and builds over a
small stand-in base image: the EIF's layout, reproducible application ramdisks, cache hits, nothing left
behind on refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from harness import images
from harness.enclave import read_eif
from harness.enclave import recipes as enclave_images
from harness.enclave.eif import SectionType
from harness.enclave.errors import (
    EnclaveMemoryTooSmall,
    EnclaveRecipeInvalid,
    EnclaveRecipeUnknown,
    EnclaveVcpuCount,
)
from harness.images import cache
from harness.images.recipe import recipes_dir

REPO_IMAGES = Path(__file__).resolve().parents[2] / "images"
RECIPE = """name = "{name}"
version = "2.1"
base = "enclave"
vcpus = {vcpus}
memory_mib = {memory}
cmdline = ["app.mode=test"]
"""


@pytest.fixture
def lab_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An images/ folder with one enclave recipe ``demo``, and a private cache dir."""
    root = tmp_path / "images"
    monkeypatch.setenv("TEELAB_IMAGES_DIR", str(root))
    monkeypatch.setenv("TEELAB_CACHE_DIR", str(tmp_path / "cache"))
    write_recipe(root, "demo")
    return root


def write_recipe(
    root: Path, name: str, *, vcpus: int = 2, memory: int = 256, text: str | None = None
) -> Path:
    folder = root / "enclaves" / name
    (folder / "app" / "lib").mkdir(parents=True, exist_ok=True)
    (folder / "enclave.toml").write_text(text or RECIPE.format(name=name, vcpus=vcpus, memory=memory))
    run = folder / "app" / "run"
    run.write_text("#!/bin/sh\necho hello\n")
    run.chmod(0o755)
    (folder / "app" / "lib" / "data.txt").write_text("payload\n")
    return folder


@pytest.fixture
def base(tmp_path: Path) -> images.BuiltImage:
    """A stand-in for the enclave base image: small kernel and initrd files."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "vmlinuz").write_bytes(b"\x7fkernel" * 4096)
    (folder / "initrd.cpio").write_bytes(b"070701bootstrap" * 2048)
    return images.BuiltImage(
        name="enclave",
        key="b" * 64,
        role="enclave",
        kernel=folder / "vmlinuz",
        initrd=folder / "initrd.cpio",
        cmdline="console=ttyS0 quiet teelab.role=enclave",
        initrd_bytes=(folder / "initrd.cpio").stat().st_size,
        built=False,
        seconds=0.0,
    )


def cpio_listing(data: bytes) -> list[str]:
    """``cpio -tv`` of an archive: mode, owner, size, date and name per line."""
    done = subprocess.run(["cpio", "-tv", "--quiet"], input=data, capture_output=True, check=True)
    return done.stdout.decode().splitlines()


# ---------------------------------------------------------------------------------------------- recipes


def test_the_sample_recipe_loads_with_defaults_that_keep_the_sizing_rules(monkeypatch) -> None:
    monkeypatch.setenv("TEELAB_IMAGES_DIR", str(REPO_IMAGES))
    assert "hello" in enclave_images.enclave_recipe_names()
    recipe = enclave_images.load_enclave_recipe("hello")
    assert (recipe.base, recipe.vcpus % 2, recipe.memory_mib >= 128) == ("enclave", 0, True)
    assert os.access(recipe.app_dir / "run", os.X_OK)


def test_a_recipe_loads_all_its_fields(lab_images: Path) -> None:
    recipe = enclave_images.load_enclave_recipe("demo")
    assert recipe.inputs() == {
        "name": "demo",
        "version": "2.1",
        "description": "",
        "base": "enclave",
        "vcpus": 2,
        "memory_mib": 256,
        "cmdline": ("app.mode=test",),
    }
    assert [e[0] for e in enclave_images.app_entries(recipe.app_dir)] == ["lib", "lib/data.txt", "run"]


@pytest.mark.parametrize("name", ["nosuch", "../demo", "Demo", ""])
def test_an_unknown_recipe_names_the_known_ones(lab_images: Path, name: str) -> None:
    with pytest.raises(EnclaveRecipeUnknown, match="no enclave recipe") as caught:
        enclave_images.load_enclave_recipe(name)
    assert caught.value.code == "E930" and "demo" in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "other"\nversion = "1"\nbase = "enclave"\nvcpus = 2\nmemory_mib = 256\n', "folder's name"),
        ('name = "demo"\nbase = "enclave"\nvcpus = 2\nmemory_mib = 256\n', "version must be"),
        ('name = "demo"\nversion = "1"\nvcpus = 2\nmemory_mib = 256\n', "base must be"),
        ('name = "demo"\nversion = "1"\nbase = "enclave"\nvcpus = "2"\nmemory_mib = 256\n', "vcpus must be"),
        ('name = "demo"\nversion = "1"\nbase = "enclave"\nvcpus = 2\n', "memory_mib must be"),
        (
            'name = "demo"\nversion = "1"\nbase = "e"\nvcpus = 2\nmemory_mib = 256\nmemroy = 1\n',
            "unknown keys",
        ),
        (
            'name = "demo"\nversion = "1"\nbase = "e"\nvcpus = 2\nmemory_mib = 256\ncmdline = "a b"\n',
            "cmdline",
        ),
        (
            'name = "demo"\nversion = "1"\nbase = "e"\nvcpus = 2\nmemory_mib = 256\ncmdline = ["a b"]\n',
            "cmdline",
        ),
        (
            'name = "demo"\nversion = "1"\nbase = "e"\nvcpus = 2\nmemory_mib = 256\ncmdline = [""]\n',
            "cmdline",
        ),
        ("name = [", "not valid TOML"),
    ],
)
def test_a_malformed_recipe_is_refused_with_e931(lab_images: Path, text: str, match: str) -> None:
    (lab_images / "enclaves" / "demo" / "enclave.toml").write_text(text)
    with pytest.raises(EnclaveRecipeInvalid, match=match) as caught:
        enclave_images.load_enclave_recipe("demo")
    assert caught.value.code == "E931" and caught.value.exit_status == 2


def test_recipe_defaults_must_keep_the_sizing_rules(lab_images: Path) -> None:
    write_recipe(lab_images, "odd", vcpus=3)
    with pytest.raises(EnclaveVcpuCount, match="even"):
        enclave_images.load_enclave_recipe("odd")
    write_recipe(lab_images, "small", memory=96)
    with pytest.raises(EnclaveMemoryTooSmall, match="at least 128 MiB"):
        enclave_images.load_enclave_recipe("small")


def test_the_app_folder_holds_files_only(lab_images: Path) -> None:
    app = lab_images / "enclaves" / "demo" / "app"
    (app / "link").symlink_to("run")
    with pytest.raises(EnclaveRecipeInvalid, match="app/link is not a regular file"):
        enclave_images.load_enclave_recipe("demo")
    shutil.rmtree(app)
    app.mkdir()
    (app / "empty").mkdir()
    with pytest.raises(EnclaveRecipeInvalid, match="holds no file"):
        enclave_images.load_enclave_recipe("demo")
    shutil.rmtree(app)
    with pytest.raises(EnclaveRecipeInvalid, match="is not a folder"):
        enclave_images.load_enclave_recipe("demo")


# ---------------------------------------------------------------------------------------------- cache key


def test_the_key_follows_the_inputs_and_nothing_else(
    lab_images: Path, base: images.BuiltImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = enclave_images.load_enclave_recipe("demo")
    key = enclave_images.enclave_key(recipe, base)
    assert enclave_images.enclave_key(recipe, base) == key
    # where the recipe lives and when its files were touched do not matter
    moved = tmp_path / "elsewhere"
    shutil.copytree(lab_images, moved)
    for path in moved.rglob("*"):
        os.utime(path, (1, 1))
    monkeypatch.setenv("TEELAB_IMAGES_DIR", str(moved))
    assert enclave_images.enclave_key(enclave_images.load_enclave_recipe("demo"), base) == key
    # Python's bytecode caches left by running the app on the host are not inputs
    (moved / "enclaves/demo/app/__pycache__").mkdir()
    (moved / "enclaves/demo/app/__pycache__/x.cpython-311.pyc").write_bytes(b"junk")
    (moved / "enclaves/demo/app/lib/y.pyc").write_bytes(b"junk")
    assert enclave_images.enclave_key(enclave_images.load_enclave_recipe("demo"), base) == key


def test_each_input_moves_the_key(lab_images: Path, base: images.BuiltImage) -> None:
    def key() -> str:
        return enclave_images.enclave_key(enclave_images.load_enclave_recipe("demo"), base)

    keys = {key()}
    app = lab_images / "enclaves" / "demo" / "app"
    (app / "lib" / "data.txt").write_text("payload 2\n")
    keys.add(key())
    (app / "lib" / "data.txt").chmod(0o755)
    keys.add(key())
    (app / "lib" / "more").mkdir()
    keys.add(key())
    (app / "lib" / "data.txt").rename(app / "lib" / "more" / "data.txt")
    keys.add(key())
    toml = lab_images / "enclaves" / "demo" / "enclave.toml"
    toml.write_text(toml.read_text().replace('"app.mode=test"', '"app.mode=prod"'))
    keys.add(key())
    toml.write_text(toml.read_text().replace("memory_mib = 256", "memory_mib = 258"))
    keys.add(key())
    recipe = enclave_images.load_enclave_recipe("demo")
    keys.add(enclave_images.enclave_key(recipe, replace(base, key="c" * 64)))
    assert len(keys) == 8


# ---------------------------------------------------------------------------------------------- builds


def test_a_build_packs_the_base_and_the_app_and_a_second_build_is_a_cache_hit(
    lab_images: Path, base: images.BuiltImage
) -> None:
    steps: list[str] = []
    built = enclave_images.build_enclave_image("demo", base=base, on_step=steps.append)
    assert built.built and steps == ["application ramdisk", "eif"]
    image = read_eif(built.path)
    assert image.measurements == built.measurements
    assert built.eif_bytes == image.size == built.path.stat().st_size
    assert image.cmdline.decode() == "console=ttyS0 quiet app.mode=test teelab.role=enclave" == built.cmdline
    kernel, ramdisks = image.kernel, image.ramdisks
    assert b"".join(image.section_chunks(kernel)) == base.kernel.read_bytes()
    assert len(ramdisks) == 2 and b"".join(image.section_chunks(ramdisks[0])) == base.initrd.read_bytes()
    app = b"".join(image.section_chunks(ramdisks[1]))
    assert len(app) == built.app_ramdisk_bytes
    listing = cpio_listing(app)
    assert [line.split()[-1] for line in listing] == ["app", "app/lib", "app/lib/data.txt", "app/run"]
    assert [line.split()[0] for line in listing] == ["drwxr-xr-x", "drwxr-xr-x", "-rw-r--r--", "-rwxr-xr-x"]
    assert {tuple(line.split()[2:4]) for line in listing} == {("root", "root")}
    assert {tuple(line.split()[5:8]) for line in listing} == {("Jan", "1", "1970")}  # mtime 0
    assert image.metadata["ImageName"] == "demo" and image.metadata["ImageVersion"] == "2.1"
    custom = image.metadata["CustomMetadata"]
    assert (custom["CPUCount"], custom["MemoryMiB"], custom["BaseKey"]) == (2, 256, base.key)
    assert [s.type for s in image.sections if s.type is not SectionType.METADATA][:2] == [
        SectionType.KERNEL,
        SectionType.CMDLINE,
    ]
    again = enclave_images.build_enclave_image("demo", base=base)
    assert not again.built
    assert (again.path, again.key, again.measurements) == (built.path, built.key, built.measurements)
    assert again.path.stat().st_mtime_ns == built.path.stat().st_mtime_ns


def test_equal_inputs_give_equal_measurements_whatever_the_files_dates(
    lab_images: Path, base: images.BuiltImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = enclave_images.build_enclave_image("demo", base=base)
    for path in (lab_images / "enclaves").rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    monkeypatch.setenv("TEELAB_CACHE_DIR", str(tmp_path / "other-cache"))
    second = enclave_images.build_enclave_image("demo", base=base)
    assert second.built and second.path != first.path
    assert second.measurements == first.measurements  # PCR0-2 do not depend on time or place


def test_an_app_change_changes_pcr2_only_and_keeps_old_builds_bounded(
    lab_images: Path, base: images.BuiltImage
) -> None:
    run = lab_images / "enclaves" / "demo" / "app" / "run"
    builds = []
    for n in range(cache.KEEP_BUILDS + 2):
        run.write_text(f"#!/bin/sh\necho hello {n}\n")
        builds.append(enclave_images.build_enclave_image("demo", base=base))
    first, second = builds[:2]
    assert first.measurements.pcr1 == second.measurements.pcr1
    assert first.measurements.pcr2 != second.measurements.pcr2
    assert first.measurements.pcr0 != second.measurements.pcr0
    kept = sorted(p.name for p in enclave_images.enclaves_dir().iterdir() if p.is_dir())
    assert len(kept) == cache.KEEP_BUILDS
    assert builds[-1].directory.name in kept and builds[0].directory.name not in kept


def test_a_recipe_whose_memory_is_below_four_times_its_image_is_refused_and_leaves_nothing(
    lab_images: Path, base: images.BuiltImage, tmp_path: Path
) -> None:
    big = tmp_path / "big-initrd"
    with open(big, "wb") as out:
        out.truncate(40 << 20)  # a 40 MiB bootstrap ramdisk: 4 x the image is over 160 MiB
    write_recipe(lab_images, "demo", memory=128)
    with pytest.raises(EnclaveMemoryTooSmall, match=r"needs at least 16\d MiB") as caught:
        enclave_images.build_enclave_image("demo", base=replace(base, initrd=big))
    assert caught.value.code == "E932" and caught.value.evidence["memory_mib"] == 128
    leftovers = [p.name for p in enclave_images.enclaves_dir().iterdir() if not p.name.startswith(".lock-")]
    assert leftovers == []


def test_the_recipes_folder_is_beside_the_image_recipes(lab_images: Path) -> None:
    assert enclave_images.enclave_recipes_dir() == recipes_dir() / "enclaves" == lab_images / "enclaves"
    assert "demo" not in images.recipe_names()  # an enclave recipe is not a base image recipe
