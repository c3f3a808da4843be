"""``teelab measure``: the expected SEV-SNP launch measurement or TDX MRTD/RTMRs of a guest."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.arguments import positive_int
from harness.cli.render import print_json
from harness.tee.measure import DEFAULT_GUEST_FEATURES, DEFAULT_VCPU_TYPE, LaunchInputs, measure


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (0x30000 or 196608)") from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "measure",
        help="expected SNP launch measurement or TDX MRTD/RTMRs of a guest",
        description="Print the values the (real or emulated) security processor puts in the evidence "
        "of a guest launched from these inputs.",
    )
    parser.add_argument("--kind", choices=("snp", "tdx"), required=True)
    parser.add_argument("--kernel", type=Path, help="kernel image (-kernel)")
    parser.add_argument("--initrd", type=Path, help="initial ramdisk (-initrd)")
    parser.add_argument("--cmdline", default="", help="kernel command line (-append)")
    parser.add_argument("--vcpus", type=positive_int, default=1, help="boot vCPU count (default: 1)")
    parser.add_argument(
        "--vcpu-type", default=DEFAULT_VCPU_TYPE, help=f"SNP: QEMU -cpu model (default: {DEFAULT_VCPU_TYPE})"
    )
    parser.add_argument("--firmware", type=Path, help="OVMF image (-bios)")
    parser.add_argument(
        "--policy", type=_integer, help="SNP guest policy (default 0x30000) or TDX TD attributes (0x10000000)"
    )
    parser.add_argument(
        "--guest-features",
        type=_integer,
        default=DEFAULT_GUEST_FEATURES,
        help=f"SNP: SEV_FEATURES of the VMSA (default: {DEFAULT_GUEST_FEATURES:#x})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inputs = LaunchInputs(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        vcpus=args.vcpus,
        vcpu_type=args.vcpu_type,
        firmware=args.firmware,
        policy=args.policy,
        guest_features=args.guest_features,
    )
    result = measure(args.kind, inputs).to_dict()
    if args.json:
        print_json(result)
        return 0
    for key, value in result.items():
        if key == "events":
            for event in value:
                print(f"event          RTMR{event['rtmr']} {event['name']:<10} {event['digest']}")
        elif key == "inputs":
            for name, measured in value.items():
                print(f"input          {name:<14} {measured}")
        else:
            print(f"{key:<14} {value}")
    return 0
