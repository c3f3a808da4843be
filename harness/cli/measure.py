"""``teelab measure``: the expected SEV-SNP launch measurement, TDX MRTD/RTMRs, vTPM PCRs of a guest, or an
SGX enclave's MRENCLAVE."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness import images
from harness.cli.arguments import positive_int
from harness.cli.render import print_json
from harness.errors import UsageError
from harness.lab import Lab
from harness.tee import tpm_measure
from harness.tee.measure import DEFAULT_GUEST_FEATURES, DEFAULT_VCPU_TYPE, LaunchInputs, measure
from harness.tee.sgx import PAGE, load_enclave_description


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (0x30000 or 196608)") from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "measure",
        help="expected SNP launch measurement, TDX MRTD/RTMRs or vTPM PCRs of a guest",
        description="Print the values the (real or emulated) security processor puts in the evidence "
        "of a guest launched from these inputs.",
    )
    parser.add_argument("--kind", choices=("snp", "tdx", "tpm", "sgx"), required=True)
    parser.add_argument(
        "--enclave", type=Path, help="sgx: an enclave description (TOML; docs/attestation.md) to hash"
    )
    parser.add_argument("--mrenclave", help="sgx: the MRENCLAVE (hex), when there is no description")
    parser.add_argument(
        "--image",
        help="a lab image (images/NAME.toml): measure the launch a lab CVM of it gets (its kernel, initrd, "
        "command line, vCPUs and firmware, as `teelab demo` and the cvm fixture boot it)",
    )
    parser.add_argument(
        "--cmdline-extra", default="", help="with --image: what the lab adds to the image's command line"
    )
    parser.add_argument("--kernel", type=Path, help="kernel image (-kernel)")
    parser.add_argument("--initrd", type=Path, help="initial ramdisk (-initrd)")
    parser.add_argument("--cmdline", default="", help="kernel command line (-append)")
    parser.add_argument(
        "--vcpus", type=positive_int, help="boot vCPU count (default: 1; with --image, the lab's 2)"
    )
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
    if args.kind == "tpm":
        return _print_tpm(_measure_tpm(args), args.json)
    if args.kind == "sgx":
        result = _measure_sgx(args)
        if args.json:
            print_json(result)
        else:
            print(f"{'mrenclave':<14} {result['mrenclave']}")
        return 0
    result = _measure_launch(args)
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


def _measure_launch(args: argparse.Namespace) -> dict[str, Any]:
    """SNP or TDX: from --image as the lab launches it, or from the launch inputs given."""
    if args.enclave is not None or args.mrenclave is not None:
        raise UsageError("--enclave and --mrenclave go with --kind sgx")
    if args.image is not None:
        return _measure_image(args)
    if args.cmdline_extra:
        raise UsageError("--cmdline-extra goes with --image", hint="put it in --cmdline instead")
    inputs = LaunchInputs(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        vcpus=args.vcpus or 1,
        vcpu_type=args.vcpu_type,
        firmware=args.firmware,
        policy=args.policy,
        guest_features=args.guest_features,
    )
    return measure(args.kind, inputs).to_dict()


def _measure_image(args: argparse.Namespace) -> dict[str, object]:
    """What a lab CVM of ``args.image`` will carry: the lab plans the launch and its TEE computes it."""
    if args.kernel or args.initrd or args.cmdline or args.firmware:
        raise UsageError(
            "--image takes its kernel, initrd, command line and firmware from the lab",
            hint="drop --kernel/--initrd/--cmdline/--firmware, or drop --image",
        )
    options = {"policy": args.policy} if args.policy is not None else {}
    if args.kind == "snp":
        options |= {"vcpu_type": args.vcpu_type, "guest_features": args.guest_features}
    elif args.policy is not None:
        options = {"attributes": args.policy}
    with Lab() as lab:
        plan = lab.plan_cvm(
            images.build(args.image), name=f"measure-{args.image}", kind=args.kind, vsock=False,
            cmdline_extra=args.cmdline_extra, vcpus=args.vcpus or 2, **options,
        )  # fmt: skip
        try:
            measured = plan.tee.measurement
            assert measured is not None
            result = measured.to_dict()
        finally:
            plan.tee.close()
    return {"image": args.image, "cmdline": plan.spec.cmdline, **result}


def _measure_tpm(args: argparse.Namespace) -> dict[str, object]:
    """The vTPM PCRs 0-9 guest-init will have, from --image (as a lab CVM boots) or --initrd and --cmdline."""
    if args.image is not None:
        image = images.build(args.image)
        with Lab() as lab:
            plan = lab.plan_cvm(
                image, name=f"measure-{args.image}", vsock=False, cmdline_extra=args.cmdline_extra
            )
            plan.tee.close()
        cmdline, initrd = plan.spec.cmdline, image.initrd
    elif args.initrd is None or args.cmdline_extra:
        raise UsageError("--kind tpm needs --image, or --initrd and --cmdline", hint="the PCRs cover both")
    else:
        cmdline, initrd = args.cmdline, args.initrd
    return {"cmdline": cmdline, **tpm_measure.predict(cmdline, initrd).to_dict()}


def _print_tpm(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print_json(result)
        return 0
    print(f"{'cmdline':<14} {result['cmdline']}")
    for index, value in result["pcrs"].items():
        print(f"{'pcr' + index:<14} {value}")
    for event in result["events"]:
        print(f"event          PCR{event['pcr']} {event['type']:<15} {event['digest']}")
    return 0


def _measure_sgx(args: argparse.Namespace) -> dict[str, object]:
    """MRENCLAVE from --enclave (the ECREATE/EADD/EEXTEND hash of its pages), or --mrenclave as given."""
    if (args.enclave is None) == (args.mrenclave is None):
        raise UsageError("--kind sgx needs --enclave DESCRIPTION or --mrenclave HEX (one of them)")
    if args.enclave is not None:
        layout = load_enclave_description(args.enclave)
        pages = sum(len(region.content) // PAGE for region in layout.regions)
        return {"kind": "sgx", "mrenclave": layout.mrenclave().hex(), "size": layout.size, "pages": pages}
    try:
        mrenclave = bytes.fromhex(args.mrenclave.removeprefix("0x"))
    except ValueError:
        mrenclave = b""
    if len(mrenclave) != 32:
        raise UsageError("--mrenclave must be 32 bytes of hex", hint="64 hex digits")
    return {"kind": "sgx", "mrenclave": mrenclave.hex()}
