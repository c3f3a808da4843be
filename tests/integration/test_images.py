"""Built guest images: what is in them, their size bar, and that unchanged inputs are never rebuilt."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import images

ENCLAVE_INITRD_LIMIT = 40 * 1000 * 1000  # the foundation bar: an enclave needs >= 4 x its image in RAM


def cpio_names(image: images.BuiltImage) -> set[str]:
    with open(image.initrd, "rb") as archive:
        listing = subprocess.run(
            ["cpio", "-t", "--quiet"], stdin=archive, capture_output=True, text=True, check=True
        )
    return set(listing.stdout.split())


def test_enclave_initramfs_is_within_the_size_bar(enclave_image: images.BuiltImage) -> None:
    assert enclave_image.initrd.stat().st_size == enclave_image.initrd_bytes
    assert enclave_image.initrd_bytes <= ENCLAVE_INITRD_LIMIT, enclave_image.initrd_bytes


def test_a_second_build_comes_from_the_cache(enclave_image: images.BuiltImage) -> None:
    again = images.build("enclave")
    assert not again.built
    assert (again.key, again.initrd, again.kernel) == (
        enclave_image.key,
        enclave_image.initrd,
        enclave_image.kernel,
    )
    assert again.initrd.stat().st_mtime == enclave_image.initrd.stat().st_mtime


def test_image_holds_guest_init_modules_and_sourceless_python(enclave_image: images.BuiltImage) -> None:
    names = cpio_names(enclave_image)
    assert {"init", "etc/teelab/modules", "bin/sh", "usr/bin/python3.11"} <= names
    assert "usr/lib/python3/dist-packages/teelab_guest/init.py" in names  # guest-init keeps its sources
    assert "lib/modules/teelab/vmw_vsock_virtio_transport.ko" in names
    stdlib = [n for n in names if n.startswith("usr/lib/python3.11/")]
    assert "usr/lib/python3.11/json/decoder.pyc" in stdlib
    assert not [n for n in stdlib if n.endswith(".py")], "stdlib sources should be dropped for .pyc"
    assert not [n for n in names if n.startswith(("usr/share/doc/", "usr/share/locale/", "var/lib/dpkg/"))]


def test_parent_image_adds_dropbear(parent_image: images.BuiltImage) -> None:
    names = cpio_names(parent_image)
    assert "usr/sbin/dropbear" in names
    assert "teelab.role=parent" in parent_image.cmdline


def test_image_build_cli_reports_a_cached_build() -> None:
    done = subprocess.run([sys.executable, "-m", "harness.cli", "image", "build", "enclave", "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    report = json.loads(done.stdout)
    assert report["built"] is False and report["initrd_bytes"] <= ENCLAVE_INITRD_LIMIT
