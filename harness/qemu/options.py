"""How QEMU option strings are spelled: ids, comma escaping, sizes, booleans, type checks."""

from __future__ import annotations

import re

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


def size_kib(kib: int) -> str:
    """``1G``, ``2M`` or ``4K``: the largest exact unit."""
    for unit, factor in (("G", 1024 * 1024), ("M", 1024)):
        if kib % factor == 0:
            return f"{kib // factor}{unit}"
    return f"{kib}K"


def qemu_version(host: HostInfo) -> str:
    """The probed QEMU version as text (``7.2.22``)."""
    version = host.qemu.version
    return ".".join(map(str, version)) if version else "of unknown version"


def require_device_type(host: HostInfo, type_name: str) -> None:
    """Raise QemuTypeMissing when the probed QEMU lists device types and ``type_name`` is not one."""
    if host.qemu.device_types and type_name not in host.qemu.device_types:
        raise QemuTypeMissing(
            f"QEMU {qemu_version(host)} has no device type {type_name}",
            hint=f"install a QEMU that offers -device {type_name} or drop that device from the spec",
            type=type_name,
            qemu=host.qemu.binary,
        )


def require_object_type(host: HostInfo, type_name: str) -> None:
    """Raise QemuTypeMissing when the probed QEMU lists object types and ``type_name`` is not one."""
    if host.qemu.object_types and type_name not in host.qemu.object_types:
        raise QemuTypeMissing(
            f"QEMU {qemu_version(host)} has no object type {type_name}",
            hint=f"install a QEMU that offers -object {type_name} or use another memory backend",
            type=type_name,
            qemu=host.qemu.binary,
        )
