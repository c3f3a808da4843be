"""``teelab bench tpm``: a vTPM's cost to a CVM's boot, and its attestation round trip beside SNP's."""

from __future__ import annotations

import argparse

from harness.bench.tpm import bench_tpm
from harness.cli.arguments import positive_int
from harness.cli.render import console, report
from harness.lab import Lab


def register_bench(kinds: argparse._SubParsersAction) -> None:
    bench = kinds.add_parser(
        "tpm", help="boot time with and without a vTPM; vTPM and SNP attestation round trips of one CVM"
    )
    bench.add_argument("--boots", type=positive_int, default=3, help="boots of each kind (default: 3)")
    bench.add_argument(
        "-n", "--rounds", type=positive_int, default=10, help="round trips of each kind (default: 10)"
    )
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    def say(name: str, value: str) -> None:
        if not args.json:
            console.print(f"{name}: {value}")

    with Lab() as lab:
        result = bench_tpm(lab, boots=args.boots, rounds=args.rounds, on_step=say)
    return report(result, args.json)
