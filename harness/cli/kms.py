"""``teelab kms ...``: serve the lab KMS, make keys with policies, issue credentials, read the audit log."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from harness import paths, userfiles
from harness.cli.render import console, print_json
from harness.errors import UsageError

if TYPE_CHECKING:
    from harness.kms.audit_log import AuditRow
    from harness.kms.store import Store

MAX_AUDIT_ROWS = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    kms = sub.add_parser("kms", help="the lab KMS (attestation-bound key release)")
    _store_options(kms, None)
    cmds = kms.add_subparsers(dest="kms", metavar="COMMAND", required=True)

    serve = cmds.add_parser("serve", help="serve the KMS until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any free one (default: 8000)")
    serve.add_argument("--unix", type=Path, help="listen on this Unix socket instead of TCP")
    serve.add_argument(
        "--tls", action="store_true", help="serve HTTPS with the lab certificate (kms/tls/ca.pem)"
    )
    serve.add_argument("--max-body", type=int, default=65536, help="request body cap in bytes")
    serve.add_argument(
        "--max-connections",
        type=int,
        help="open connections at most (default: 4096): half for connections that have not sent a whole "
        "request head yet, half for those that have; see docs/kms.md",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        help="seconds a request's head and body may take to arrive (default: 10)",
    )
    serve.add_argument(
        "--lab-ca", type=Path, help="lab CA directory (its root counts only where a policy names it)"
    )
    serve.add_argument(
        "--tdx-collateral",
        type=Path,
        help="Intel PCS collateral for TDX and SGX quotes: a JSON file (one object or a list) or a directory "
        "of them",
    )
    serve.set_defaults(func=run_serve)

    create = cmds.add_parser("create-key", help="create a key with a key policy")
    create.add_argument("--policy", type=Path, help="key policy JSON file (default: lab credentials only)")
    create.add_argument("--description", default="")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=run_create_key)

    put = cmds.add_parser("put-policy", help="replace a key's policy")
    put.add_argument("key_id")
    put.add_argument("--policy", type=Path, required=True, help="key policy JSON file")
    put.set_defaults(func=run_put_policy)

    keys = cmds.add_parser("keys", help="list keys")
    keys.add_argument("--json", action="store_true", help="print JSON")
    keys.set_defaults(func=run_keys)

    creds = cmds.add_parser("credentials", help="issue an access key pair for a principal (SigV4)")
    creds.add_argument("name", nargs="?", default="admin", help="principal name (default: admin)")
    creds.add_argument("--json", action="store_true", help="print JSON")
    creds.set_defaults(func=run_credentials)

    audit = cmds.add_parser("audit", help="show the audit log, oldest first")
    audit.add_argument("--key", help="only this key id")
    audit.add_argument(
        "--limit", type=int, default=50, help=f"rows at most, 1..{MAX_AUDIT_ROWS} (default: 50)"
    )
    audit.add_argument("--since", type=int, default=0, help="rows after this row id")
    audit.add_argument(
        "--verify", action="store_true", help="check the audit log's HMAC chain end to end (E1024 if broken)"
    )
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(func=run_audit)
    for command in cmds.choices.values():  # `teelab kms audit --kms-dir D` as well as `kms --kms-dir D audit`
        _store_options(command, argparse.SUPPRESS)


def _store_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--kms-dir", type=Path, default=default, help="KMS state (default: <state dir>/kms)")
    parser.add_argument(
        "--master-key-file",
        type=Path,
        default=default,
        help="the master key as a credential file (32 bytes, raw or base64, mode 0600) instead of "
        "kms/master.key; TEELAB_KMS_MASTER_KEY_FILE does the same",
    )


def register_bench(kinds: argparse._SubParsersAction) -> None:
    bench = kinds.add_parser(
        "kms", help="KMS Decrypt with and without Recipient: requests/s, p50/p99 latency"
    )
    bench.add_argument(
        "--mode",
        choices=("decrypt-recipient", "decrypt"),
        action="append",
        help="what to measure (default: both)",
    )
    bench.add_argument(
        "--clients", type=int, action="append", help="concurrent clients (default: 1, 10, 100)"
    )
    bench.add_argument(
        "--requests-per-client", type=int, default=40, help="requests per client (default: 40)"
    )
    bench.add_argument(
        "--open-rate",
        type=float,
        help="offered req/s of the open-loop run (0: skip; default 320, and 100 with --hostile)",
    )
    bench.add_argument("--profile-dir", type=Path, help="profile the server; pstats files land here")
    bench.add_argument(
        "--hostile",
        type=int,
        metavar="N",
        help="instead: the open-loop load alone, then beside N half-open connections (bar: p99 <= 3x)",
    )
    bench.add_argument(
        "--versus-moto",
        action="store_true",
        help="instead: the same signed Decrypt load against teelab and moto's KMS server, interleaved "
        "(bars: teelab >= 3x moto, Recipient >= 0.75x plain); clients default to 100",
    )
    bench.add_argument("--rounds", type=int, default=5, help="rounds of the --versus-moto run (default: 5)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=lambda args: (run_bench_versus if args.versus_moto else run_bench)(args))


def run_bench(args: argparse.Namespace) -> int:
    from harness.bench.kms import HOSTILE_RATE, MODES, OPEN_RATE, bench_kms, bench_kms_hostile

    clients = tuple(args.clients or (1, 10, 100))
    if min(clients) < 1 or args.requests_per_client < 1:
        raise UsageError("--clients and --requests-per-client must be at least 1")
    if args.hostile is not None and not (1 <= args.hostile <= 100_000 and args.open_rate != 0):
        raise UsageError("--hostile takes 1..100000 connections and needs an --open-rate above 0")
    if args.open_rate is not None and not 0 <= args.open_rate <= 100_000:
        raise UsageError("--open-rate must be 0..100000 requests/s")
    table = Table(title="bench kms (server in a subprocess, load generator in this one)")
    for column in ("mode", "clients", "load", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "bars"):
        table.add_column(
            column, justify="left" if column in ("mode", "load", "bars") else "right", no_wrap=True
        )

    def show(result) -> None:  # type: ignore[no-untyped-def]
        if not args.json:
            f = result.figures
            console.print(
                f"{result.params['mode']} x {result.params['clients']} ({result.params['load']}): "
                f"{f['rps']:.0f} req/s, p99 {f['p99']:.1f} ms"
            )

    with console.status("measuring", spinner="dots") if not args.json else contextlib.nullcontext():
        if args.hostile:
            results = bench_kms_hostile(
                mode=(args.mode or MODES)[0],
                clients=max(clients),
                attackers=args.hostile,
                rate=args.open_rate or HOSTILE_RATE,
                on_result=show,
            )
        else:
            results = bench_kms(
                modes=tuple(args.mode or MODES),
                concurrency=clients,
                requests_per_client=args.requests_per_client,
                open_rate=OPEN_RATE if args.open_rate is None else args.open_rate or None,
                profile_dir=args.profile_dir,
                on_result=show,
            )
    if args.json:
        print_json([{k: v for k, v in r.to_dict().items() if k != "samples"} for r in results])
    else:
        for r in results:
            f = r.figures
            results_of_bars = r.bar_results()
            missed = [f"{b['figure']}{b['op']}{b['limit']:g}" for b in results_of_bars if not b["holds"]]
            bars = (
                ""
                if not results_of_bars
                else (
                    "[red]missed " + ", ".join(missed) + "[/]"
                    if missed
                    else f"[green]{len(results_of_bars)} held[/]"
                )
            )
            table.add_row(
                r.params["mode"],
                str(r.params["clients"]),
                r.params["load"],
                f"{f['rps']:.0f}",
                f"{f['p50']:.2f}",
                f"{f['p99']:.2f}",
                f"{f['max']:.2f}",
                str(int(f["errors"])),
                bars,
            )
        console.print(table)
    return 0 if all(r.ok for r in results) else 1


def run_bench_versus(args: argparse.Namespace) -> int:
    """``bench kms --versus-moto``: one row per target, then the ratios and their bars."""
    from harness.bench.kms_versus import bench_kms_versus

    clients = max(args.clients or (100,))
    if not 1 <= clients <= 10_000 or not 1 <= args.rounds <= 1000 or args.requests_per_client < 1:
        raise UsageError("--clients 1..10000, --rounds 1..1000 and --requests-per-client >= 1")
    if args.hostile is not None or args.mode or args.open_rate is not None or args.profile_dir:
        raise UsageError("--versus-moto takes only --clients, --requests-per-client, --rounds and --json")
    requests = max(300, clients * args.requests_per_client)
    with console.status("measuring", spinner="dots") if not args.json else contextlib.nullcontext():
        results = bench_kms_versus(rounds=args.rounds, clients=clients, requests=requests)
    if args.json:
        print_json([{k: v for k, v in r.to_dict().items() if k != "samples"} for r in results])
        return 0 if all(r.ok for r in results) else 1
    *targets, summary = results
    table = Table(
        title=f"bench kms --versus-moto ({clients} clients, {args.rounds} rounds, each in its process)"
    )
    columns = ("target", "req/s (median)", "by round", "p50 ms", "p99 ms", "errors", "server CPU ms/req")
    for column in columns:
        table.add_column(column, justify="left" if column in ("target", "by round") else "right")
    for r in targets:
        f = r.figures
        rounds = ", ".join(f"{x:.0f}" for x in r.extra["rps_by_round"])
        cpu = f"{r.extra['server_cpu_ms_per_request']:.3f}"
        table.add_row(
            r.params["target"],
            f"{f['rps']:.0f}",
            rounds,
            f"{f['p50']:.2f}",
            f"{f['p99']:.2f}",
            f"{r.errors}",
            cpu,
        )
    console.print(table)
    for bar in summary.bar_results():
        mark = "[green]held[/]" if bar["holds"] else "[red]missed[/]"
        by_round = ", ".join(f"{x:.2f}" for x in summary.extra[f"{bar['figure']} by round"])
        figure = f"{bar['figure']}: {bar['value']:.2f} (bar {bar['op']} {bar['limit']:g}) {mark}"
        console.print(f"{figure}; by round {by_round}")
    for name, value in summary.extra.items():
        if "server CPU" in name:
            console.print(f"{name}: {value:.2f}")
    return 0 if all(r.ok for r in results) else 1


def _kms_dir(args: argparse.Namespace, *, existing: bool = False) -> Path:
    """The KMS directory; UsageError if it names something else than a directory, or (``existing``) if it
    holds no store yet, so that a command that only reads leaves nothing behind."""
    kms_dir = args.kms_dir or paths.state_dir() / "kms"
    if kms_dir.exists() and not kms_dir.is_dir():
        raise UsageError(f"--kms-dir {kms_dir} is not a directory", hint="name the KMS state directory")
    if existing and not (kms_dir / "kms.sqlite3").is_file():
        raise UsageError(
            f"there is no KMS store in {kms_dir}", hint="create a key or credentials first, or fix --kms-dir"
        )
    return kms_dir


def _open_store(args: argparse.Namespace, *, existing: bool = False) -> Store:
    from harness.kms.store import Store

    return Store.open(_kms_dir(args, existing=existing), args.master_key_file)


def _read_policy(path: Path | None) -> str | None:
    return None if path is None else userfiles.read_text(path, "key policy file")


def run_serve(args: argparse.Namespace) -> int:
    from harness.kms.admission import Limits
    from harness.kms.runner import Listen, serve_forever

    given = {"max_connections": args.max_connections, "request_timeout": args.request_timeout}
    limits = Limits(**{name: value for name, value in given.items() if value is not None})
    listen = Listen(args.host, args.port, args.unix, args.tls, args.max_body, limits)
    serve_forever(
        _kms_dir(args),
        listen,
        lab_dir=args.lab_ca,
        tdx_collateral=args.tdx_collateral,
        master_key_file=args.master_key_file,
    )
    return 0


def run_create_key(args: argparse.Namespace) -> int:
    from harness.kms.policy import KeyPolicy, default_policy

    text = _read_policy(args.policy)
    if text is not None:
        KeyPolicy.parse(text)  # refused before a store is made
    store = _open_store(args)
    try:
        text = text or default_policy(store.account)
        KeyPolicy.parse(text)
        record = store.create_key(text, args.description)
    finally:
        store.close()
    if args.json:
        print_json(record.metadata(store.account))
    else:
        console.print(f"created key {record.id}\n  {record.arn}", markup=False)
    return 0


def run_put_policy(args: argparse.Namespace) -> int:
    from harness.kms.errors import KeyNotFound
    from harness.kms.policy import KeyPolicy

    text = _read_policy(args.policy) or ""
    KeyPolicy.parse(text)
    store = _open_store(args, existing=True)
    try:
        if store.get_key(args.key_id) is None:
            raise KeyNotFound(f"key {args.key_id} does not exist", hint="list keys with teelab kms keys")
        store.submit(store.set_policy(args.key_id, text)).result()
    finally:
        store.close()
    console.print(f"policy of {args.key_id} replaced", markup=False)
    return 0


def run_keys(args: argparse.Namespace) -> int:
    store = _open_store(args, existing=True)
    try:
        records = store.list_keys(1000)
    finally:
        store.close()
    if args.json:
        print_json([r.metadata(store.account) for r in records])
        return 0
    table = Table(title="KMS keys")
    for column in ("key id", "state", "created", "description"):
        table.add_column(column)
    for r in records:
        table.add_row(r.id, r.state, _when(r.created), Text(r.description))
    console.print(table)
    return 0


def run_credentials(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        creds = store.issue_credentials(args.name)
    finally:
        store.close()
    if args.json:
        print_json(creds.to_dict())
    else:
        console.print(f"principal {creds.arn}", markup=False)
        console.print(
            f"AWS_ACCESS_KEY_ID={creds.access_key}\nAWS_SECRET_ACCESS_KEY={creds.secret}", markup=False
        )
    return 0


AUDIT_TABLE_WIDTH = 140  # below this (or through a pipe) each record is a block of lines


def _audit_table(rows: list[AuditRow]) -> Table:
    table = Table(title="KMS audit log")
    for column in ("time", "operation", "key", "principal", "evidence", "decision", "status", "reasons"):
        table.add_column(column, overflow="fold")
    for r in rows:
        # every field but the decision's colour comes from requests: Text, never markup
        colour = {"allow": "green", "deny": "red"}.get(r.decision, "yellow")
        table.add_row(
            _when(r.time),
            Text(r.operation),
            Text((r.key_id or "-")[:8]),
            Text((r.principal or "anonymous").split(":")[-1]),
            Text((r.evidence_digest or "-")[:12]),
            Text(r.decision, style=colour),
            str(r.status),
            Text("; ".join(r.reasons)),
        )
    return table


def _print_audit_block(r: AuditRow) -> None:
    """One record as a few labelled lines (request fields printed as text, never as markup)."""
    lines = [
        f"{_when(r.time)}  {r.operation}  {r.decision} {r.status}",
        f"  key {r.key_id or '-'}  principal {r.principal or 'anonymous'}",
        f"  evidence {r.evidence_digest or '-'}",
        *(f"  reason: {reason}" for reason in r.reasons),
    ]
    for line in lines:
        console.print(Text(line), soft_wrap=False, overflow="fold")


def run_audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_AUDIT_ROWS:
        raise UsageError(f"--limit must be 1..{MAX_AUDIT_ROWS}", hint="page with --since ROW_ID")
    if not 0 <= args.since < 2**63:
        raise UsageError("--since must be a row id, 0..2**63-1")
    store = _open_store(args, existing=True)
    try:
        if args.verify:
            rows, head = store.verify_audit()
            if args.json:
                print_json({"rows": rows, "head": head, "intact": True})
            else:
                console.print(f"audit chain intact: {rows} rows, head {head}", markup=False)
            return 0
        rows = list(store.audit(key_id=args.key, limit=args.limit, since_id=args.since))
        pending = store.pending_refusals()
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if console.is_terminal and console.width >= AUDIT_TABLE_WIDTH:
        console.print(_audit_table(rows))
    else:  # piped or narrow: one block per record, nothing cut mid-value
        for r in rows:
            _print_audit_block(r)
    for source, kind, since, counted in pending:
        console.print(
            f"counted, not yet logged: {counted} anonymous {kind} refusals from {source}"
            f" since {_when(since)}",
            markup=False,
        )
    return 0


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
