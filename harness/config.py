"""teelab.toml: one configuration file, overridden by environment variables, overridden by CLI flags.

The file is ``$TEELAB_CONFIG``, else ``./teelab.toml``, else ``$XDG_CONFIG_HOME/teelab/teelab.toml``. A
setting ``[vsock] backend = "builtin"`` is overridden by ``TEELAB_VSOCK_BACKEND=...``, and both by a flag the
caller passes as ``requested``. Defaults come from the caller (usually the host probe's choice).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

ENV_CONFIG = "TEELAB_CONFIG"


def config_path() -> Path | None:
    """The configuration file in use, or None when there is none."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    candidates = [Path("teelab.toml")]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    candidates.append(Path(xdg) / "teelab" / "teelab.toml")
    return next((p for p in candidates if p.is_file()), None)


def load() -> dict[str, Any]:
    """The whole file as a dict of sections (empty when there is no file)."""
    path = config_path()
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"{ENV_CONFIG} names {path}, which does not exist", hint=f"unset {ENV_CONFIG}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}", hint=f"make {path} a readable file", path=str(path)
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", hint=f"fix {path}", path=str(path)) from exc


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides ``[section] key``: ``TEELAB_VSOCK_BACKEND``."""
    return f"TEELAB_{section}_{key}".upper().replace("-", "_")


def setting(section: str, key: str, default: Any = None, *, requested: Any = None) -> Any:
    """``requested`` if given, else ``TEELAB_<SECTION>_<KEY>``, else ``[section] key`` of the file, else
    ``default``."""
    if requested is not None:
        return requested
    env = env_name(section, key)
    if os.environ.get(env):
        return os.environ[env]
    table = load().get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{section}] in {config_path()} is not a table", hint=f"write [{section}] then key = value"
        )
    return table.get(key, default)


def choice(
    section: str, key: str, allowed: tuple[str, ...], default: str, *, requested: str | None = None
) -> str:
    """A setting that must be one of ``allowed``; a ``ConfigError`` names where the bad value came from."""
    value = setting(section, key, default, requested=requested)
    if value not in allowed:
        raise ConfigError(
            f"{section}.{key} = {value!r} is not one of {', '.join(allowed)}",
            hint=f"set {env_name(section, key)} or [{section}] {key} in teelab.toml to one of them",
            value=value,
        )
    return str(value)
