"""Typed QEMU character devices (``-chardev``): a socket (path or inherited fd), a channel, stdio, a file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from harness.host.model import HostInfo
from harness.qemu.errors import OptionInvalid
from harness.qemu.options import check_id, escape, onoff


class Chardev(ABC):
    """One ``-chardev``; its ``id`` is what devices, monitors and serial ports refer to."""

    id: str

    def validate(self, host: HostInfo) -> None:
        check_id("chardev", self.id)

    @abstractmethod
    def backend(self) -> str:
        """The option string after ``-chardev``."""

    def args(self) -> list[str]:
        return ["-chardev", self.backend()]


@dataclass(frozen=True)
class ChardevSocket(Chardev):
    """A Unix socket: ``path`` (listening if ``server``) or an inherited ``fd`` (a socketpair end)."""

    id: str
    path: Path | None = None
    fd: int | None = None
    server: bool = False
    wait: bool = False

    def validate(self, host: HostInfo) -> None:
        super().validate(host)
        if (self.path is None) == (self.fd is None):
            raise OptionInvalid(
                f"chardev {self.id} needs exactly one of path and fd",
                hint="give ChardevSocket either path=Path(...) or fd=N",
                id=self.id,
            )
        if self.fd is not None and (self.fd < 0 or self.server):
            raise OptionInvalid(
                f"chardev {self.id}: fd={self.fd} must be a connected descriptor >= 0, not a server",
                hint="pass an inherited, connected fd (e.g. from socket.socketpair()) with server=False",
                id=self.id,
            )

    def backend(self) -> str:
        if self.fd is not None:
            return f"socket,id={self.id},fd={self.fd}"
        text = f"socket,id={self.id},path={escape(self.path)}"
        if self.server:
            text += f",server=on,wait={onoff(self.wait)}"
        return text


@dataclass(frozen=True)
class ChardevStdio(Chardev):
    """QEMU's own stdin/stdout; ``signal`` lets Ctrl-C reach QEMU."""

    id: str
    signal: bool = False

    def backend(self) -> str:
        return f"stdio,id={self.id},signal={onoff(self.signal)}"


@dataclass(frozen=True)
class ChardevFile(Chardev):
    """Output written to a file."""

    id: str
    path: Path

    def backend(self) -> str:
        return f"file,id={self.id},path={escape(self.path)}"


@dataclass(frozen=True)
class ChardevChannel(Chardev):
    """A socketpair between QEMU and the harness: ``Machine`` makes it at launch, passes one end to QEMU as
    ``fd=N`` and keeps the other (``machine.channel(id)``). No path, so nothing is left behind. In ``run.sh``
    it becomes a listening socket ``<id>.sock`` beside the script."""

    id: str

    def backend(self) -> str:
        return ChardevSocket(self.id, path=Path(f"{self.id}.sock"), server=True, wait=False).backend()
