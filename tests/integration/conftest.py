"""Integration tests boot real guests under TCG (or KVM where the host allows)."""

from __future__ import annotations

import pytest

from harness import images


@pytest.fixture(scope="session")
def enclave_image() -> images.BuiltImage:
    return images.build("enclave")


@pytest.fixture(scope="session")
def parent_image() -> images.BuiltImage:
    return images.build("parent")


@pytest.fixture(scope="session")
def cvm_image() -> images.BuiltImage:
    return images.build("cvm")
