"""``teelab demo --tpm``: the vTPM leg, with a live view of its phases, a verdict and ``--json``."""

from __future__ import annotations

import argparse

from harness.cli.render import console, print_json
from harness.demo_tpm import TpmPhase, run_tpm_demo


def run_tpm(args: argparse.Namespace) -> int:
    def show(phase: TpmPhase) -> None:
        if not args.json:
            detail = " ".join(f"{k}={v}" for k, v in phase.detail.items())
            console.print(
                f"[green]✓[/] [bold]{phase.name:<9}[/] {phase.seconds:6.2f} s  {detail}", highlight=False
            )

    result = run_tpm_demo(show)
    if args.json:
        print_json(result.to_dict())
    else:
        verdict = "[green]demo --tpm OK[/]" if result.ok else "[red]demo --tpm FAILED[/]"
        console.print(f"{verdict} in {result.seconds:.1f} s")
    return 0 if result.ok else 1
