"""``teelab enclave build`` and ``teelab enclave describe-eif``: enclave images and their measurements."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from harness.cli.render import console, print_json
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
        table.add_row("signed by", image.signature.certificate.subject.rfc4514_string())
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
