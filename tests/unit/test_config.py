"""teelab.toml and its overrides: flag > environment > file > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import config
from harness.errors import ConfigError


@pytest.fixture
def toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "teelab.toml"
    path.write_text('[vsock]\nbackend = "builtin"\n[kms]\nport = 8000\n')
    monkeypatch.setenv("TEELAB_CONFIG", str(path))
    monkeypatch.delenv("TEELAB_VSOCK_BACKEND", raising=False)
    return path


def test_file_then_environment_then_flag(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.setting("vsock", "backend", "auto") == "builtin"
    assert config.setting("kms", "port") == 8000
    assert config.setting("kms", "missing", "default") == "default"
    monkeypatch.setenv("TEELAB_VSOCK_BACKEND", "kernel")
    assert config.setting("vsock", "backend", "auto") == "kernel"
    assert config.setting("vsock", "backend", "auto", requested="external") == "external"


def test_no_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEELAB_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nowhere"))
    assert config.config_path() is None
    assert config.setting("vsock", "backend", "auto") == "auto"


def test_bad_values_and_bad_files_are_coded_errors(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not one of") as bad:
        config.choice("vsock", "backend", ("auto", "kernel"), "auto")
    assert bad.value.code == "E101"
    assert bad.value.hint.startswith("set TEELAB_VSOCK_BACKEND or [vsock] backend")
    toml.write_text("[vsock\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load()
    toml.write_bytes(b"\xff[vsock]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load()
    monkeypatch.setenv("TEELAB_CONFIG", str(toml.parent / "absent.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load()
    monkeypatch.setenv("TEELAB_CONFIG", str(toml.parent))
    with pytest.raises(ConfigError, match="cannot read"):
        config.load()
