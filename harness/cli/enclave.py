"""``teelab enclave build``, ``describe-eif``, ``build-image`` (from a recipe) and ``boot`` (under the
emulated security module): enclave images, their measurements, and booting them."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from harness.bench.enclave import bench_carve, bench_eif, bench_enclave, bench_nsm
from harness.cli.arguments import positive_int, seconds
from harness.cli.render import console, print_json, report
from harness.enclave import EifImage, build_eif, describe_image, read_eif
from harness.enclave.errors import EifInputInvalid


def register(sub: argparse._SubParsersAction) -> None:
    enclave = sub.add_parser("enclave", help="build and describe enclave images (EIF)")
    commands = enclave.add_subparsers(dest="enclave_command", metavar="COMMAND", required=True)

    build = commands.add_parser("build", help="pack a kernel, a command line and ramdisks into an EIF")
    build.add_argument("--kernel", required=True, type=Path, help="the kernel (bzImage)")
    build.add_argument("--cmdline", required=True, help="the kernel command line")
    build.add_argument(
        "--ramdisk",
        required=True,
        action="append",
        type=Path,
        dest="ramdisks",
        help="a ramdisk (cpio or cpio.gz); repeat for more, in boot order",
    )
    build.add_argument("--output", required=True, type=Path, help="the EIF to write")
    build.add_argument("--name", help="ImageName in the metadata (default: the output's file name stem)")
    build.add_argument("--version", default="1.0", help="ImageVersion in the metadata (default: 1.0)")
    build.add_argument("--metadata", type=Path, help="a JSON file of custom metadata (CustomMetadata)")
    build.add_argument("--signing-certificate", type=Path, help="the signing certificate (PEM or DER)")
    build.add_argument("--private-key", type=Path, help="the signing key (PEM, EC P-384)")
    build.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64")
    build.add_argument("--json", action="store_true", help="print errors as JSON too")
    build.set_defaults(func=run_build)

    describe = commands.add_parser("describe-eif", help="measurements, signature and metadata of an EIF")
    describe.add_argument("eif", type=Path, help="the enclave image")
    describe.add_argument("--json", action="store_true", help="print nitro-cli's describe-eif JSON")
    describe.add_argument(
        "--ignore-crc",
        action="store_true",
        help="report a checksum mismatch as CheckCRC false instead of refusing the image",
    )
    describe.set_defaults(func=run_describe)

    build_image = commands.add_parser(
        "build-image", help="build an enclave image from images/enclaves/NAME (or take it from the cache)"
    )
    build_image.add_argument("name", help="the enclave recipe: images/enclaves/<name>/enclave.toml")
    build_image.add_argument("--json", action="store_true", help="print describe-eif JSON with the path")
    build_image.set_defaults(func=run_build_image)

    boot = commands.add_parser(
        "boot", help="boot an EIF, verify the attestation document its /app/run reports, and stop"
    )
    boot.add_argument("eif", type=Path, help="the enclave image")
    boot.add_argument("--debug", action="store_true", help="debug mode: documents carry all-zero PCRs")
    boot.add_argument("--vcpus", type=int, help="vCPUs, even (default: the image's, else 2)")
    boot.add_argument("--memory", type=int, dest="memory_mib", help="MiB (default: the image's, else 512)")
    boot.add_argument("--parent-role", help="what PCR3 measures (default: teelab-host)")
    boot.add_argument("--parent-instance", help="what PCR4 measures (default: this host's name)")
    boot.add_argument("--timeout", type=seconds, default=60.0, help="seconds for boot and app each (60)")
    boot.add_argument("--json", action="store_true", help="print JSON")
    boot.set_defaults(func=run_boot)


def run_build(args: argparse.Namespace) -> int:
    custom = None
    if args.metadata is not None:
        try:
            custom = json.loads(args.metadata.read_text())
        except (OSError, ValueError) as err:
            raise EifInputInvalid(
                f"cannot read the custom metadata {args.metadata}: {err}",
                hint="give a JSON file holding an object",
            ) from None
        if not isinstance(custom, dict):
            raise EifInputInvalid(
                f"the custom metadata in {args.metadata} is not a JSON object",
                hint="wrap the values in an object",
            )
    image = build_eif(
        args.output,
        kernel=args.kernel,
        cmdline=args.cmdline,
        ramdisks=args.ramdisks,
        name=args.name,
        version=args.version,
        custom_metadata=custom,
        signing_key=args.private_key,
        signing_certificate=args.signing_certificate,
        arch=args.arch,
    )
    print_json(describe_image(image))
    return 0


def run_describe(args: argparse.Namespace) -> int:
    image = read_eif(args.eif, verify_crc=not args.ignore_crc)
    if args.json:
        print_json(describe_image(image))
    else:
        print_describe_table(image)
    return 0


def run_build_image(args: argparse.Namespace) -> int:
    from harness.enclave.recipes import build_enclave_image

    status = console.status(f"enclave {args.name}", spinner="dots") if not args.json else None
    with status or contextlib.nullcontext():

        def step(name: str) -> None:
            if status is not None:
                status.update(f"enclave {args.name}: {name}")

        built = build_enclave_image(args.name, on_step=step)
    image = read_eif(built.path)
    if args.json:
        print_json(
            {
                "Path": str(built.path),
                "Key": built.key,
                "Built": built.built,
                "Seconds": round(built.seconds, 2),
                "EifBytes": built.eif_bytes,
                "ApplicationRamdiskBytes": built.app_ramdisk_bytes,
                "MinimumMemoryMiB": built.minimum_memory_mib,
                **describe_image(image),
            }
        )
        return 0
    print_describe_table(image)
    how = "built" if built.built else "cached"
    console.print(
        f"enclave [bold]{built.name}[/] {built.version} {built.key[:16]}: {how} in {built.seconds:.2f} s, "
        f"EIF {built.eif_bytes / 2**20:.1f} MiB (application {built.app_ramdisk_bytes:,} bytes), "
        f"needs >= {built.minimum_memory_mib} MiB\n  {built.path}"
    )
    return 0


def run_boot(args: argparse.Namespace) -> int:
    from harness.attest import LAB, Policy, default_lab_dir, verify
    from harness.enclave.plan import launch_of, wait_for_app
    from harness.lab import Lab

    status = console.status(f"booting {args.eif}", spinner="dots") if not args.json else None
    with Lab() as lab, status or contextlib.nullcontext():
        parent = {"parent_role": args.parent_role} if args.parent_role is not None else {}
        boot = lab.boot_enclave(  # a bad image or size is refused before QEMU starts
            args.eif, debug=args.debug, vcpus=args.vcpus, memory_mib=args.memory_mib, agent=False,
            parent_instance=args.parent_instance, timeout=args.timeout, **parent,
        )  # fmt: skip
        launch = launch_of(boot.machine)
        assert launch is not None
        image = launch.image  # the image as it was read, checked and copied for this launch
        if status is not None:
            status.update("waiting for /app/run")
        ready_at = time.monotonic()
        app = wait_for_app(boot.machine, args.timeout)
        app_seconds = time.monotonic() - ready_at
        spec = boot.machine.spec
    policy = Policy(
        roots=(LAB,),
        pcrs={0: image.measurements.pcr0},
        nonce=app.nonce,
        public_key=app.public_key,
        lab_dir=default_lab_dir(),
    )
    verdict = verify(app.document, policy)
    report = {
        "Eif": str(args.eif),
        "EnclaveID": verdict.claims.get("module_id"),
        "DebugMode": args.debug,
        "NumberOfCPUs": spec.vcpus,
        "MemoryMiB": spec.memory_mib,
        "BootSeconds": round(boot.seconds, 2),
        "AppSeconds": round(app_seconds, 2),
        "DocumentBytes": len(app.document),
        "Document": base64.b64encode(app.document).decode(),
        "Measurements": image.measurements.to_dict(),
        "Verdict": verdict.to_dict(),
    }
    if args.json:
        print_json(report)
    else:
        table = Table(title=f"enclave {args.eif}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key in ("EnclaveID", "DebugMode", "NumberOfCPUs", "MemoryMiB", "BootSeconds", "AppSeconds",
                    "DocumentBytes"):  # fmt: skip
            table.add_row(key, str(report[key]))
        table.add_row("PCR0", image.measurements.pcr0.hex())
        table.add_row(
            "verdict", "[green]verifies[/] (lab root, PCR0, nonce, key)" if verdict.ok else "[red]REFUSED[/]"
        )
        for reason in verdict.reasons:
            table.add_row("", escape(str(reason)))
        console.print(table)
    return 0 if verdict.ok else 1


def print_describe_table(image: EifImage) -> None:
    """The describe-eif facts as a table, then the sections."""
    info = describe_image(image)
    table = Table(title=f"{image.path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("EIF version", str(info["EifVersion"]))
    if "ImageName" in info:
        table.add_row("image", f"{info['ImageName']} {info['ImageVersion']}")
    table.add_row("architecture", image.arch)
    for name, value in info["Measurements"].items():
        table.add_row(name, value)
    table.add_row("checksum", _verdict(info["CheckCRC"], f"{image.header.crc32:#010x}"))
    if image.signature is not None:
        cert = info["SigningCertificate"]
        table.add_row("signed by", image.signature.subject)
        table.add_row("certificate", f"{cert['Algorithm']}, {cert['NotBefore']} to {cert['NotAfter']}")
        table.add_row("signature", _verdict(info["SignatureCheck"], image.signature_problem or "signs PCR0"))
    else:
        table.add_row("signed", "no")
    for key, value in info.get("Metadata", {}).items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    console.print(table)
    sections = Table(title="sections")
    for column in ("#", "type", "offset", "bytes"):
        sections.add_column(column, justify="right" if column != "type" else "left")
    for section in image.sections:
        sections.add_row(
            str(section.index), section.type.name.lower(), str(section.offset), f"{section.size:,}"
        )
    console.print(sections)


def _verdict(ok: bool, detail: str) -> str:
    return f"[green]ok[/] ({detail})" if ok else f"[red]FAILED[/] ({detail})"


def register_bench(kinds: argparse._SubParsersAction) -> None:
    """``teelab bench eif`` and ``teelab bench nsm``."""
    eif = kinds.add_parser("eif", help="seconds to build and to describe (read, CRC, PCRs) an enclave image")
    eif.add_argument(
        "--ramdisk-mib", type=positive_int, default=40, help="size of the application ramdisk (default 40)"
    )
    eif.add_argument(
        "-n", "--runs", type=positive_int, default=5, help="number of builds and describes (default: 5)"
    )
    eif.add_argument("--json", action="store_true", help="print JSON")
    eif.set_defaults(func=run_bench_eif)
    nsm = kinds.add_parser("nsm", help="security module latency: Attestation (lab CA signs), ExtendPCR")
    nsm.add_argument(
        "-n", "--requests", type=positive_int, default=200, help="requests of each kind (default: 200)"
    )
    nsm.add_argument("--json", action="store_true", help="print JSON")
    nsm.set_defaults(func=run_bench_nsm)
    enclave = kinds.add_parser(
        "enclave", help="seconds from asking for the hello enclave to its first attestation document (TCG)"
    )
    enclave.add_argument("-n", "--runs", type=positive_int, default=3, help="number of boots (default: 3)")
    enclave.add_argument("--json", action="store_true", help="print JSON")
    enclave.set_defaults(func=run_bench_enclave)
    carve = kinds.add_parser(
        "carve",
        help="a carved enclave to its heartbeat against the same image booted alone, and the give-back",
    )
    carve.add_argument("-n", "--runs", type=positive_int, default=3, help="number of carves (default: 3)")
    carve.add_argument("--json", action="store_true", help="print JSON")
    carve.set_defaults(func=run_bench_carve)


def run_bench_enclave(args: argparse.Namespace) -> int:
    with console.status("booting enclaves", spinner="dots") if not args.json else contextlib.nullcontext():
        result = bench_enclave(args.runs)
    return report(result, args.json)


def run_bench_carve(args: argparse.Namespace) -> int:
    with console.status("carving enclaves", spinner="dots") if not args.json else contextlib.nullcontext():
        result = bench_carve(args.runs)
    return report(result, args.json)


def run_bench_eif(args: argparse.Namespace) -> int:
    with (
        console.status("building and describing", spinner="dots")
        if not args.json
        else contextlib.nullcontext()
    ):
        result = bench_eif(args.ramdisk_mib, args.runs)
    return report(result, args.json)


def run_bench_nsm(args: argparse.Namespace) -> int:
    with (
        console.status("asking the security module", spinner="dots")
        if not args.json
        else contextlib.nullcontext()
    ):
        result = bench_nsm(args.requests)
    return report(result, args.json)
