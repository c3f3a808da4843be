"""The ``teelab`` command: thin argument parsing over the library; each area registers its subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from harness import __version__
from harness.cli import attest, bench, demo, doctor, enclave, explain, fleet, image, kms, measure, tee, vsock
from harness.cli.remote import run_on_host
from harness.errors import LabError, UsageError
from harness.libvirt.uri import parse_uri

DESCRIPTION = (
    "teelab: a lab harness for confidential computing on QEMU/KVM: SEV-SNP, TDX and enclave VMs, "
    "emulated byte-exactly where the hardware is missing. `teelab explain CODE` explains an error."
)

# Each defines ``register(subparsers)`` and adds its own subcommands, in this order.
COMMAND_MODULES = (doctor, image, bench, demo, explain, kms, measure, tee, enclave, attest, vsock, fleet)


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are E102 (exit 2), printed like every other coded error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` lists the arguments")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="teelab", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"teelab {__version__}")
    parser.add_argument(
        "--host",
        dest="remote_host",
        metavar="[USER@]HOST[:PORT]",
        help="run the command on a lab host over SSH",
    )
    parser.add_argument(
        "--known-hosts", dest="remote_known_hosts", type=Path, metavar="FILE", help="host keys for --host"
    )
    parser.add_argument(
        "--backend",
        dest="vm_backend",  # subcommands have --backend options of their own
        choices=("qemu", "libvirt"),
        help="run VMs with QEMU directly or through libvirtd (default: TEELAB_BACKEND, teelab.toml, qemu)",
    )
    parser.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help="libvirtd to run VMs with (implies --backend libvirt): qemu:///system (default) or a lab host's "
        "qemu+ssh://user@host[:port]/system?keyfile=KEY&known_hosts=FILE (default: TEELAB_LIBVIRT_URI)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    _finish(parser)
    return parser


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help opens with its one-line help, and every level names its choices COMMAND."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if not isinstance(action, argparse._SubParsersAction):
            continue
        action.metavar = "COMMAND"
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, child in action.choices.items():
            if not child.description and helps.get(name):
                child.description = helps[name][0].upper() + helps[name][1:] + "."
            _finish(child)


def _choose_vm_backend(args: argparse.Namespace) -> None:
    """--backend and --libvirt-uri reach every Lab of this command (and of its child processes)."""
    backend = args.vm_backend
    if args.libvirt_uri:
        if backend == "qemu":
            raise UsageError("--libvirt-uri is for the libvirt backend", hint="drop --backend qemu")
        parse_uri(args.libvirt_uri)  # E463 now rather than at the first VM
        os.environ["TEELAB_LIBVIRT_URI"] = args.libvirt_uri
        backend = "libvirt"
    if backend:
        os.environ["TEELAB_BACKEND"] = backend


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if not argv:  # bare `teelab`: what it can do
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        if args.remote_host:
            return run_on_host(args.remote_host, args.remote_known_hosts, argv)
        _choose_vm_backend(args)
        return int(args.func(args) or 0)
    except LabError as err:
        # --json asked for JSON, also when the arguments themselves were refused (args is None then)
        if getattr(args, "json", False) or (args is None and "--json" in argv):
            print(json.dumps({"error": err.to_dict()}, indent=2))
        else:
            print(str(err), file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output (``| head``) went away: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
