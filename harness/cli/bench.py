"""``teelab bench ...``: benchmarks with a table on a terminal and ``--json`` for machines."""

from __future__ import annotations

import argparse

from harness.bench.boot import bench_boot
from harness.bench.image import bench_image
from harness.cli import attest, enclave, kms, tee, tpm, vsock
from harness.cli.arguments import non_negative_int, positive_int
from harness.cli.render import console, print_bench, print_json
from harness.lab import Lab

# CLI modules that add their own ``teelab bench <name>`` through ``register_bench(subparsers)``.
BENCH_MODULES = (attest, enclave, kms, tee, tpm, vsock)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    boot = kinds.add_parser("boot", help="seconds from launch to guest-init ready, over N boots")
    boot.add_argument("--image", default="enclave", help="image recipe to boot (default: enclave)")
    boot.add_argument("-n", "--runs", type=positive_int, default=5, help="number of boots (default: 5)")
    boot.add_argument("--vcpus", type=positive_int, default=2)
    boot.add_argument("--memory", type=positive_int, default=512, help="guest memory in MiB")
    boot.add_argument(
        "--backend",
        choices=("qemu", "libvirt", "both"),
        help="VM backend (default: teelab --backend, TEELAB_BACKEND, teelab.toml, qemu); both: side by side",
    )
    boot.add_argument("--json", action="store_true", help="print JSON")
    boot.set_defaults(func=run_boot)
    image = kinds.add_parser("image", help="seconds to build a guest image, cold (empty cache) and warm")
    image.add_argument("--image", default="enclave", help="image recipe (default: enclave)")
    image.add_argument("-n", "--runs", type=positive_int, default=5, help="warm builds (default: 5)")
    image.add_argument("--no-cold", action="store_true", help="skip the cold build")
    image.add_argument("--json", action="store_true", help="print JSON")
    image.set_defaults(func=run_image)
    unseal = kinds.add_parser("unseal", help="a guest's unseal round trip to the KMS, TLS against plain HTTP")
    unseal.add_argument(
        "-n", "--rounds", type=positive_int, default=100, help="round trips per mode (default: 100)"
    )
    unseal.add_argument(
        "--cold", type=non_negative_int, default=5, help="more on fresh connections (default: 5)"
    )
    unseal.add_argument("--json", action="store_true", help="print JSON")
    unseal.set_defaults(func=run_unseal)
    for module in BENCH_MODULES:
        module.register_bench(kinds)


def run_boot(args: argparse.Namespace) -> int:
    if args.backend == "both":
        return run_boot_backends(args)
    with Lab(backend=args.backend) as lab:

        def progress(index: int, seconds: float) -> None:
            if not args.json:
                console.print(f"boot {index + 1}/{args.runs}: {seconds:.2f} s")

        result = bench_boot(
            lab, args.image, args.runs, vcpus=args.vcpus, memory_mib=args.memory, on_sample=progress
        )
    if args.json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    return 0 if result.ok else 1


def run_boot_backends(args: argparse.Namespace) -> int:
    from harness.bench.backends import bench_backends
    from harness.host.probe import probe

    def progress(index: int, backend: str, seconds: float) -> None:
        if not args.json:
            console.print(f"boot {index + 1}/{args.runs} {backend}: {seconds:.2f} s")

    result = bench_backends(
        probe(), args.image, args.runs, vcpus=args.vcpus, memory_mib=args.memory, on_sample=progress
    )
    if args.json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    return 0 if result.ok else 1


def run_image(args: argparse.Namespace) -> int:
    def progress(kind: str, seconds: float) -> None:
        if not args.json:
            console.print(f"{kind} build: {seconds:.2f} s")

    result = bench_image(args.image, args.runs, cold=not args.no_cold, on_sample=progress)
    if args.json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    cold_ok = args.no_cold or str(result.extra.get("cold_bar", "")).endswith("holds")
    return 0 if result.ok and cold_ok else 1


def run_unseal(args: argparse.Namespace) -> int:
    from harness.bench.unseal import bench_unseal

    with Lab() as lab:
        result = bench_unseal(
            lab, rounds=args.rounds, cold=args.cold, on_step=None if args.json else _say_step
        )
    if args.json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    return 0 if result.ok else 1


def _say_step(name: str, value: str) -> None:
    console.print(f"{name}: {value}")
