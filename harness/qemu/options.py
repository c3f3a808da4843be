"""How QEMU option strings are spelled: ids, comma escaping, sizes, booleans, type checks."""

from __future__ import annotations

import re
from typing import Literal

from harness.host.model import HostInfo
from harness.qemu.errors import OptionInvalid, QemuTypeMissing

_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


def check_id(kind: str, value: str) -> None:
    """Raise OptionInvalid unless ``value`` is an id QEMU accepts (a letter, then letters, digits, ._-)."""
    if not _ID.fullmatch(value):
        raise OptionInvalid(
            f"{kind} id {value!r} is not a QEMU id",
            hint="start the id with a letter and use only letters, digits, '.', '_' and '-'",
            id=value,
        )


def escape(value: object) -> str:
    """A value inside a comma-separated option string: commas doubled."""
    return str(value).replace(",", ",,")


def onoff(value: bool) -> str:
    return "on" if value else "off"


def truefalse(value: bool) -> str:
    return "true" if value else "false"


def size_mib(mib: int) -> str:
    """``2G`` when a whole number of GiB, else ``256M``."""
    return f"{mib // 1024}G" if mib and mib % 1024 == 0 else f"{mib}M"


def qemu_version(host: HostInfo) -> str:
    """The probed QEMU version as text (``7.2.22``)."""
    version = host.qemu.version
    return ".".join(map(str, version)) if version else "of unknown version"


def require_type(host: HostInfo, kind: Literal["device", "object"], type_name: str, hint: str) -> None:
    """Raise QemuTypeMissing when the probed QEMU lists its ``kind`` types and ``type_name`` is not one."""
    offered = host.qemu.device_types if kind == "device" else host.qemu.object_types
    if offered and type_name not in offered:
        raise QemuTypeMissing(
            f"QEMU {qemu_version(host)} has no {kind} type {type_name}",
            hint=hint,
            type=type_name,
            qemu=host.qemu.binary,
        )
