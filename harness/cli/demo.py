"""``teelab demo``: the main job with each phase's time, a summary, and ``--json``."""

from __future__ import annotations

import argparse
import contextlib

from rich.table import Table

from harness.cli.render import console, print_json
from harness.demo import Phase, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the main job end to end")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def show(phase: Phase) -> None:
        if not args.json:
            detail = " ".join(f"{k}={v}" for k, v in phase.detail.items() if k != "artifacts")
            console.print(f"[bold]{phase.name:<14}[/] {phase.seconds:6.2f} s  {detail}")

    with console.status("running the demo", spinner="dots") if not args.json else contextlib.nullcontext():
        result = run_demo(show)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.ok else 1
    table = Table(title="teelab demo")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for phase in result.phases:
        table.add_row(phase.name, f"{phase.seconds:.2f}")
    table.add_row("[bold]total[/]", f"{sum(p.seconds for p in result.phases):.2f}")
    console.print(table)
    console.print("[green]demo OK[/]" if result.ok else "[red]demo FAILED[/]")
    return 0 if result.ok else 1
