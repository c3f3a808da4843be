"""libvirt backend: the same ``VMSpec`` as libvirt domain XML (``domain_xml``), run by libvirtd through
libvirt-python as a ``LibvirtMachine`` (the ``Machine`` interface)."""

from harness.libvirt.domain import domain_xml
from harness.libvirt.errors import DomainStartFailed, LibvirtError, LibvirtUnavailable, LibvirtUnsupported
from harness.libvirt.machine import LibvirtMachine

__all__ = [
    "DomainStartFailed",
    "LibvirtError",
    "LibvirtMachine",
    "LibvirtUnavailable",
    "LibvirtUnsupported",
    "domain_xml",
]
