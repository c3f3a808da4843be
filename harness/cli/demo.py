"""``teelab demo``: the main job with a live view of its phases, a summary, and ``--json``."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.cli.render import console, print_json
from harness.demo import LEGS, DemoResult, Phase, run_demo


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
        console.print(phase_line(phase, console.width), highlight=False)
        status.update(f"teelab demo: after {phase.name}")

    with status if status is not None else contextlib.nullcontext():
        result = run_demo(show)
    if args.json:
        print_json(result.to_dict())
        return 0 if result.ok else 1
    print_summary(result, console)
    return 0 if result.ok else 1


LEG_TITLES = {"cvm": "CVM", "enclave": "enclave"}
LIVE_HIDDEN = ("decisions", "enclave_decisions", "endpoint", "measure")  # the summary or --json shows these


def phase_line(phase: Phase, width: int = 80) -> str:
    """One line of the live view, at most ``width`` columns: the phase, its seconds and its details, long
    tokens (hex, key ids) shortened; the summary and ``--json`` keep them whole."""
    head = f"✓ {phase.name:<14} {phase.seconds:6.2f} s  "
    detail = " ".join(f"{k}={_short(v)}" for k, v in phase.detail.items() if k not in LIVE_HIDDEN)
    room = max(width - 1 - len(head), 8)  # a terminal wraps a line that reaches its last column
    if len(detail) > room:
        detail = detail[: room - 3] + "..."
    return f"[green]✓[/] [bold]{phase.name:<14}[/] {phase.seconds:6.2f} s  {escape(detail)}"


def print_summary(result: DemoResult, out: Console) -> None:
    """Who was served and refused, why (the KMS's audit), each phase's and leg's time, and the verdict."""
    table = Table(title="confidential VMs, enclaves and the lab KMS")
    for column in ("leg", "guest", "measurement", "KMS", "detail"):
        table.add_column(column)
    for leg, guests, field in (("CVM", result.cvms, "measurement"), ("enclave", result.enclaves, "pcr0")):
        for name, guest in guests.items():
            outcome = guest.get("outcome", "?")
            colour = "green" if outcome == "served" else "yellow" if outcome == "refused" else "red"
            served = outcome == "served"
            detail = f"secret sha256 {guest['sha256'][:16]}..." if served else guest.get("error", "")
            measured = f"{'PCR0 ' if field == 'pcr0' else ''}{str(guest.get(field, ''))[:16]}..."
            table.add_row(leg, name, measured, f"[{colour}]{outcome}[/]", detail)
    out.print(table)
    audit = next((p.detail for p in result.phases if p.name == "audit"), {})
    for decision in [*audit.get("decisions", []), *audit.get("enclave_decisions", [])]:
        why = [r for r in decision["reasons"] if "does not hold" in r or "allows" in r]
        text = re.sub(r"[0-9a-f]{16,}", lambda m: m[0][:12] + "...", "; ".join(why))
        out.print(f"  KMS audit: {decision['decision']}: {text}", highlight=False)
    legs = result.legs()
    for leg, names in LEGS.items():
        phases = [p for p in result.phases if p.name in names]
        times = ", ".join(f"{p.name.removeprefix('enclave-')} {p.seconds:.1f}" for p in phases)
        out.print(f"  {LEG_TITLES[leg]} leg {legs[leg]:.1f} s: {times}", highlight=False)
    if "enclave_over_cvm" in legs:
        out.print(f"  enclave leg / CVM leg: {legs['enclave_over_cvm']:.2f}", highlight=False)
    measure = next((p.detail.get("measure") for p in result.phases if p.name == "plan"), None)
    if measure:
        # one line however wide, so that it can be copied whole
        command = shlex.join(measure)
        out.print(f"  expected measurement, on its own: {command}", highlight=False, soft_wrap=True)
    verdict = "[green]demo OK[/]" if result.ok else "[red]demo FAILED[/]"
    out.print(
        f"{verdict} in {result.seconds:.1f} s: expected CVM and enclave served over TLS, modified refused"
    )


def _short(value: object) -> str:
    """A phase detail for the live view: tokens longer than 20 characters cut to 12 (hex, key ids)."""
    return re.sub(r"[^\s]{21,}", lambda m: m[0][:12] + "...", str(value))
