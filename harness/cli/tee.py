"""``teelab tee status``: which TEE backend each kind gets on this host; ``teelab bench tee``: what an
evidence request costs through the emulated security processor, host-side and from inside a TCG guest."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rich.table import Table

from harness.bench.tee import bench_guest, bench_service
from harness.cli.arguments import positive_int
from harness.cli.render import console, print_json, report
from harness.host.probe import probe
from harness.tee.platforms import choose_backend, real_tee_missing


def register(sub: argparse._SubParsersAction) -> None:
    tee = sub.add_parser("tee", help="confidential-guest backends on this host")
    actions = tee.add_subparsers(dest="tee", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="real or emulated, per TEE kind, and why")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run_status)


def register_bench(kinds: argparse._SubParsersAction) -> None:
    bench = kinds.add_parser("tee", help="milliseconds per evidence request through the emulated device")
    bench.add_argument("--kind", choices=("snp", "tdx"), default="snp")
    bench.add_argument("-n", "--runs", type=positive_int, default=200, help="requests (default: 200)")
    bench.add_argument(
        "--guest", action="store_true", help="also boot a TCG guest and time get_evidence in it"
    )
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=run_bench)


def run_status(args: argparse.Namespace) -> int:
    host = probe()
    rows = []
    for kind in ("snp", "tdx", "sgx"):
        backend = choose_backend(kind, host)
        missing = real_tee_missing(kind, host)
        rows.append({"kind": kind, "backend": type(backend).__name__, "emulated": backend.emulated,
                     "why": "; ".join(missing) or "the host offers it"})  # fmt: skip
    if args.json:
        print_json(rows)
        return 0
    table = Table("kind", "backend", "why", title="teelab tee status")
    for row in rows:
        table.add_row(row["kind"], row["backend"], row["why"])
    console.print(table)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    def progress(what: str) -> Callable[[int, float], None]:
        def show(index: int, value: float) -> None:
            if not args.json and (index + 1) % max(1, args.runs // 4) == 0:
                console.print(f"{what} {index + 1}/{args.runs}: {value:.2f} ms")

        return show

    results = [bench_service(args.kind, args.runs, on_sample=progress("service"))]
    if args.guest:
        results.append(bench_guest(args.kind, args.runs))
    return report(results if len(results) > 1 else results[0], args.json)
