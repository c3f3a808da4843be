"""``teelab fleet doctor|test -i INVENTORY``: every lab host of an Ansible inventory over SSH (paramiko, host
keys from known_hosts only): one capability table, and the suite run where a capability is present."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from harness.cli.render import console, print_json
from harness.errors import LabError
from harness.host.capability import GROUPS
from harness.host.remote import FleetHost, RemoteHost, capabilities, read_inventory, run_suite


def register(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="the lab hosts of an Ansible inventory, over SSH: doctor, test")
    commands = fleet.add_subparsers(dest="fleet", metavar="COMMAND", required=True)
    doctor = commands.add_parser("doctor", help="one capability table for every host of the inventory")
    test = commands.add_parser(
        "test", help="run the suite on the hosts that have a capability, fetch results"
    )
    for parser in (doctor, test):
        parser.add_argument("-i", "--inventory", type=Path, required=True, help="Ansible inventory file")
        parser.add_argument("--known-hosts", type=Path, help="host keys (default ~/.ssh/known_hosts)")
        parser.add_argument("--json", action="store_true", help="print JSON")
    doctor.set_defaults(func=run_doctor)
    test.add_argument(
        "-m",
        "--capability",
        required=True,
        choices=GROUPS,
        metavar="GROUP",
        help=f"the capability group hosts must have: {', '.join(GROUPS)}",
    )
    test.add_argument("--out", type=Path, default=Path("fleet-results"), help="where results come back to")
    test.add_argument("pytest_args", nargs="*", help="pytest arguments (after --)")
    test.set_defaults(func=run_test)


def survey(hosts: list[FleetHost], known_hosts: Path | None) -> list[dict[str, Any]]:
    """Each host's own report (or why it could not give one)."""
    rows = []
    for host in hosts:
        row: dict[str, Any] = {"host": host.name, "inventory_groups": list(host.groups)}
        try:
            with RemoteHost(host, known_hosts=known_hosts) as remote:
                report = capabilities(remote)
        except LabError as err:
            row["error"] = err.to_dict()
        else:
            row["capable"] = [g for g, missing in report["groups"].items() if not missing]
            row["missing"] = report["groups"]
            row["accel"] = report.get("accel")
            row["qemu"] = ".".join(map(str, report.get("qemu", {}).get("version") or [])) or None
        rows.append(row)
    return rows


def run_doctor(args: argparse.Namespace) -> int:
    rows = survey(read_inventory(args.inventory), args.known_hosts)
    if args.json:
        print_json(rows)
    else:
        table = Table(title="teelab fleet doctor")
        for column in ("host", "inventory groups", "accel", "QEMU", "capable", "error"):
            table.add_column(column)
        for row in rows:
            error = row.get("error", {})
            table.add_row(row["host"], " ".join(row["inventory_groups"]), row.get("accel") or "-",
                          row.get("qemu") or "-", " ".join(row.get("capable", [])) or "-",
                          f"{error.get('code', '')} {error.get('message', '')}".strip())  # fmt: skip
        console.print(table)
    return 0 if all("error" not in row for row in rows) else 1


def run_test(args: argparse.Namespace) -> int:
    hosts = read_inventory(args.inventory)
    rows = survey(hosts, args.known_hosts)
    chosen = {row["host"] for row in rows if args.capability in row.get("capable", [])}
    results: list[dict[str, Any]] = []
    for host in hosts:
        if host.name not in chosen:
            continue
        with RemoteHost(host, known_hosts=args.known_hosts) as remote:
            run = run_suite(remote, list(args.pytest_args), args.out)
        results.append({"host": run.host, "returncode": run.returncode, "results": str(run.results),
                        "files": [str(f.relative_to(run.results)) for f in run.files]})  # fmt: skip
    skipped = [row["host"] for row in rows if row["host"] not in chosen]
    if args.json:
        print_json({"capability": args.capability, "ran": results, "skipped": skipped, "survey": rows})
    else:
        for result in results:
            console.print(
                f"{result['host']}: pytest exit {result['returncode']}, results in {result['results']}"
            )
        console.print(f"not run (no {args.capability}): {', '.join(skipped) or 'none'}")
    return 0 if results and all(r["returncode"] == 0 for r in results) else 1
