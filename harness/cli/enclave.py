"""``teelab enclave build`` and ``teelab enclave describe-eif``: enclave images and their measurements."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.table import Table
from teelab_guest import nsm_wire

from harness.bench.result import Bar, BenchResult
from harness.cli.render import console, print_bench, print_json
from harness.enclave import EifImage, build_eif, describe_image, read_eif
from harness.enclave.errors import EifInputInvalid
from harness.enclave.nsm import SecurityModule
from harness.errors import UsageError


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


# ------------------------------------------------------------------------------------------------ benchmarks
EIF_DESCRIBE_BAR_S = 1.0  # describe (read, CRC, PCRs) of an image with a 40 MiB ramdisk, 2-vCPU host
NSM_ATTESTATION_BAR_MS = 20.0  # one Attestation request signed by the lab CA


def register_bench(kinds: argparse._SubParsersAction) -> None:
    """``teelab bench eif`` and ``teelab bench nsm``."""
    eif = kinds.add_parser("eif", help="seconds to build and to describe (read, CRC, PCRs) an enclave image")
    eif.add_argument(
        "--ramdisk-mib", type=int, default=40, help="size of the application ramdisk (default 40)"
    )
    eif.add_argument("-n", "--runs", type=int, default=5, help="number of builds and describes (default: 5)")
    eif.add_argument("--json", action="store_true", help="print JSON")
    eif.set_defaults(func=run_bench_eif)
    nsm = kinds.add_parser("nsm", help="security module latency: Attestation (lab CA signs), ExtendPCR")
    nsm.add_argument("-n", "--requests", type=int, default=200, help="requests of each kind (default: 200)")
    nsm.add_argument("--json", action="store_true", help="print JSON")
    nsm.set_defaults(func=run_bench_nsm)


def bench_eif(ramdisk_mib: int, runs: int) -> BenchResult:
    """Samples: seconds to describe the image; extra: build seconds and describe throughput."""
    result = BenchResult(
        "eif", "s", {"ramdisk_mib": ramdisk_mib, "runs": runs, "kernel_mib": 8, "bootstrap_mib": 2}
    )
    if ramdisk_mib >= 40:
        result.bars.append(Bar("median", "<=", EIF_DESCRIBE_BAR_S))
    builds = []
    with tempfile.TemporaryDirectory(prefix="teelab-bench-eif-") as tmp:
        root = Path(tmp)
        for name, mib in (("bzImage", 8), ("init.cpio", 2), ("app.cpio", ramdisk_mib)):
            with open(root / name, "wb") as out:
                for _ in range(mib):
                    out.write(os.urandom(1 << 20))
        for _ in range(runs):
            start = time.perf_counter()
            image = build_eif(
                root / "app.eif",
                kernel=root / "bzImage",
                cmdline="console=ttyS0",
                ramdisks=[root / "init.cpio", root / "app.cpio"],
            )
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            read_eif(root / "app.eif")
            result.samples.append(time.perf_counter() - start)
        size_mib = image.size / (1 << 20)
    result.extra["image_mib"] = round(size_mib, 1)
    result.extra["build_median_s"] = round(statistics.median(builds), 3)
    result.extra["describe_mib_per_s"] = round(size_mib / statistics.median(result.samples))
    return result


def bench_nsm(requests: int) -> BenchResult:
    """Samples: milliseconds per Attestation request (lab CA signature included); extra: ExtendPCR and
    DescribePCR microseconds."""
    from harness.attest import LabAuthority

    result = BenchResult(
        "nsm", "ms", {"requests": requests}, bars=[Bar("median", "<=", NSM_ATTESTATION_BAR_MS)]
    )
    with tempfile.TemporaryDirectory(prefix="teelab-bench-nsm-") as tmp:
        authority = LabAuthority.load_or_create(Path(tmp) / "lab-ca")
        module = SecurityModule(
            {0: bytes(48)}, debug=False, issue_document=authority.attestation_document, module_id="bench"
        )
        attestation = nsm_wire.attestation(nonce=os.urandom(32), public_key=os.urandom(300))
        for kind, request, sink in (
            ("extend", nsm_wire.extend_pcr(16, b"x" * 64), []),
            ("describe", nsm_wire.describe_pcr(0), []),
            ("attestation", attestation, result.samples),
        ):
            for _ in range(requests):
                start = time.perf_counter()
                response = module.handle(request)
                sink.append((time.perf_counter() - start) * (1e3 if kind == "attestation" else 1e6))
            nsm_wire.decode_response(response)  # raises if the last answer was an error
            if kind != "attestation":
                result.extra[f"{kind}_pcr_median_us"] = round(statistics.median(sink), 1)
    return result


def run_bench_eif(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.ramdisk_mib < 1:
        raise UsageError("--runs and --ramdisk-mib must be at least 1")
    with (
        console.status("building and describing", spinner="dots")
        if not args.json
        else contextlib.nullcontext()
    ):
        result = bench_eif(args.ramdisk_mib, args.runs)
    return _report(result, args.json)


def run_bench_nsm(args: argparse.Namespace) -> int:
    if args.requests < 1:
        raise UsageError("--requests must be at least 1")
    with (
        console.status("asking the security module", spinner="dots")
        if not args.json
        else contextlib.nullcontext()
    ):
        result = bench_nsm(args.requests)
    return _report(result, args.json)


def _report(result: BenchResult, as_json: bool) -> int:
    if as_json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    return 0 if result.ok else 1
