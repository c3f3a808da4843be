"""Output helpers shared by commands: JSON for machines, rich tables for people."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.bench.result import BenchResult

console = Console()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def report(results: BenchResult | list[BenchResult], as_json: bool) -> int:
    """Print one benchmark's result (or several) as JSON or tables; the exit status: 0 if every bar holds."""
    many = results if isinstance(results, list) else [results]
    if as_json:
        print_json([r.to_dict() for r in many] if isinstance(results, list) else many[0].to_dict())
    else:
        for result in many:
            print_bench(result)
    return 0 if all(r.ok for r in many) else 1


def print_bench(result: BenchResult) -> None:
    """A benchmark's figures and bars as a table."""
    table = Table(title=f"bench {result.name} ({', '.join(f'{k}={v}' for k, v in result.params.items())})")
    table.add_column("figure")
    table.add_column(f"value ({result.unit})", justify="right")
    table.add_column("bar")
    bars = {b["figure"]: b for b in result.bar_results()}
    for name, value in result.figures.items():
        bar = bars.get(name)
        verdict = ""
        if bar:
            verdict = f"{bar['op']} {bar['limit']:g} " + (
                "[green]holds[/]" if bar["holds"] else "[red]MISSED[/]"
            )
        table.add_row(name, f"{value:.3f}", verdict)
    for key, value in result.extra.items():
        table.add_row(key, str(value), "")
    console.print(table)
    console.print("samples: " + " ".join(f"{s:.2f}" for s in result.samples))
