"""The ``teelab`` command: thin argument parsing over the library; each area registers its subcommands."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from harness.errors import LabError

DESCRIPTION = (
    "teelab: a lab harness for confidential computing on QEMU/KVM: SEV-SNP, TDX and enclave VMs, "
    "emulated byte-exactly where the hardware is missing. `teelab explain CODE` explains an error."
)

# Modules that define ``register(subparsers)``; each adds its own subcommands.
COMMAND_MODULES = (
    "harness.cli.doctor",
    "harness.cli.image",
    "harness.cli.bench",
    "harness.cli.demo",
    "harness.cli.explain",
    "harness.cli.kms",
    "harness.cli.measure",
    "harness.cli.tee",
    "harness.cli.enclave",
    "harness.cli.attest",
    "harness.cli.vsock",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teelab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LabError as err:
        if getattr(args, "json", False):
            print(json.dumps({"error": err.to_dict()}, indent=2))
        else:
            print(str(err), file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
