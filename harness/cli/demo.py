"""``teelab demo``: the main job with a live view of its phases, a summary, and ``--json``."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex

from rich.table import Table

from harness.cli.render import console, print_json
from harness.demo import Phase, run_demo


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run the main job: the KMS serves the expected CVM and enclave, refuses the others"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--tpm",
        action="store_true",
        help="the vTPM leg: an attested CVM unlocks its LUKS2 disk, another cannot",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tpm:
        from harness.cli.demo_tpm import run_tpm

        return run_tpm(args)
    status = console.status("teelab demo: starting", spinner="dots") if not args.json else None

    def show(phase: Phase) -> None:
        if status is None:
            return
        detail = " ".join(
            f"{k}={_short(v)}"
            for k, v in phase.detail.items()
            if k not in ("decisions", "enclave_decisions", "endpoint", "measure")
        )
        console.print(f"[green]✓[/] [bold]{phase.name:<9}[/] {phase.seconds:6.2f} s  {detail}")
        status.update(f"teelab demo: after {phase.name}")

    with status if status is not None else contextlib.nullcontext():
        result = run_demo(show)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.ok else 1
    table = Table(title="confidential VMs, enclaves and the lab KMS")
    for column in ("leg", "guest", "measurement", "KMS", "detail"):
        table.add_column(column)
    for leg, guests, field in (("CVM", result.cvms, "measurement"), ("enclave", result.enclaves, "pcr0")):
        for name, guest in guests.items():
            outcome = guest.get("outcome", "?")
            colour = "green" if outcome == "served" else "yellow" if outcome == "refused" else "red"
            served = outcome == "served"
            detail = f"secret sha256 {guest['sha256'][:16]}..." if served else guest.get("error", "")
            measured = f"{'PCR0 ' if field == 'pcr0' else ''}{str(guest.get(field, ''))[:24]}..."
            table.add_row(leg, name, measured, f"[{colour}]{outcome}[/]", detail)
    console.print(table)
    audit = next((p.detail for p in result.phases if p.name == "audit"), {})
    for decision in [*audit.get("decisions", []), *audit.get("enclave_decisions", [])]:
        why = [r for r in decision["reasons"] if "does not hold" in r or "allows" in r]
        text = re.sub(r"[0-9a-f]{16,}", lambda m: m[0][:12] + "...", "; ".join(why))
        console.print(f"  KMS audit: {decision['decision']}: {text}", highlight=False, soft_wrap=True)
    legs = result.legs()
    times = "  ".join(f"{p.name} {p.seconds:.1f}" for p in result.phases)
    console.print(f"  phases (s): {times}", highlight=False, soft_wrap=True)
    console.print(
        f"  CVM leg {legs['cvm']:.1f} s, enclave leg {legs['enclave']:.1f} s "
        f"(x{legs.get('enclave_over_cvm', 0):.2f})",
        highlight=False,
    )
    measure = next((p.detail.get("measure") for p in result.phases if p.name == "plan"), None)
    if measure:
        console.print(
            f"  expected measurement, on its own: {shlex.join(measure)}", highlight=False, soft_wrap=True
        )
    verdict = "[green]demo OK[/]" if result.ok else "[red]demo FAILED[/]"
    console.print(
        f"{verdict}: expected CVM and enclave served over TLS, modified ones refused ({result.seconds:.1f} s)"
    )
    return 0 if result.ok else 1


def _short(value: object) -> str:
    """A phase detail for the live view: long hex values shortened (``--json`` keeps them whole)."""
    return re.sub(r"[0-9a-f]{24,}", lambda m: m[0][:16] + "...", str(value))
