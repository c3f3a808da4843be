"""``teelab kms ...``: serve the lab KMS, make keys with policies, issue credentials, read the audit log."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

from rich.table import Table

from harness import paths
from harness.cli.render import console, print_json
from harness.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    kms = sub.add_parser("kms", help="the lab KMS (attestation-bound key release)")
    kms.add_argument("--kms-dir", type=Path, help="KMS state (default: <state dir>/kms)")
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
        "--lab-ca", type=Path, help="lab CA directory (its root counts only where a policy names it)"
    )
    serve.add_argument(
        "--tdx-collateral",
        type=Path,
        help="Intel PCS collateral for TDX quotes: a JSON file (one object or a list) or a directory of them",
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
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--since", type=int, default=0, help="rows after this row id")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(func=run_audit)


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
        default=320.0,
        help="offered req/s of the open-loop run at the most clients (0: skip; default: 320)",
    )
    bench.add_argument("--profile-dir", type=Path, help="profile the server; pstats files land here")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from harness.bench.kms import MODES, bench_kms

    clients = tuple(args.clients or (1, 10, 100))
    if min(clients) < 1 or args.requests_per_client < 1:
        raise UsageError("--clients and --requests-per-client must be at least 1")
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
        results = bench_kms(
            modes=tuple(args.mode or MODES),
            concurrency=clients,
            requests_per_client=args.requests_per_client,
            open_rate=args.open_rate or None,
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


def _kms_dir(args: argparse.Namespace) -> Path:
    return args.kms_dir or paths.state_dir() / "kms"


def _read_policy(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(
            f"cannot read policy file {path}: {exc.strerror}", hint="give a readable JSON file"
        ) from None


def run_serve(args: argparse.Namespace) -> int:
    from harness.kms.runner import Listen, serve_forever

    listen = Listen(args.host, args.port, args.unix, args.tls, args.max_body)
    serve_forever(_kms_dir(args), listen, lab_dir=args.lab_ca, tdx_collateral=args.tdx_collateral)
    return 0


def run_create_key(args: argparse.Namespace) -> int:
    from harness.kms.policy import KeyPolicy, default_policy
    from harness.kms.store import Store

    text = _read_policy(args.policy)
    store = Store.open(_kms_dir(args))
    try:
        text = text or default_policy(store.account)
        KeyPolicy.parse(text)
        record = store.create_key(text, args.description)
    finally:
        store.close()
    if args.json:
        print_json(record.metadata(store.account))
    else:
        console.print(f"created key {record.id}\n  {record.arn}")
    return 0


def run_put_policy(args: argparse.Namespace) -> int:
    from harness.kms.errors import KeyNotFound
    from harness.kms.policy import KeyPolicy
    from harness.kms.store import Store

    text = _read_policy(args.policy) or ""
    KeyPolicy.parse(text)
    store = Store.open(_kms_dir(args))
    try:
        if store.get_key(args.key_id) is None:
            raise KeyNotFound(f"key {args.key_id} does not exist", hint="list keys with teelab kms keys")
        store.submit(store.set_policy(args.key_id, text)).result()
    finally:
        store.close()
    console.print(f"policy of {args.key_id} replaced")
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from harness.kms.store import Store

    store = Store.open(_kms_dir(args))
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
        table.add_row(r.id, r.state, _when(r.created), r.description)
    console.print(table)
    return 0


def run_credentials(args: argparse.Namespace) -> int:
    from harness.kms.store import Store

    store = Store.open(_kms_dir(args))
    try:
        creds = store.issue_credentials(args.name)
    finally:
        store.close()
    if args.json:
        print_json(creds.to_dict())
    else:
        console.print(f"principal {creds.arn}")
        console.print(f"AWS_ACCESS_KEY_ID={creds.access_key}\nAWS_SECRET_ACCESS_KEY={creds.secret}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from harness.kms.store import Store

    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    store = Store.open(_kms_dir(args))
    try:
        rows = list(store.audit(key_id=args.key, limit=args.limit, since_id=args.since))
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    table = Table(title="KMS audit log")
    for column in ("time", "operation", "key", "principal", "evidence", "decision", "status", "reasons"):
        table.add_column(column, overflow="fold")
    for r in rows:
        colour = {"allow": "green", "deny": "red"}.get(r.decision, "yellow")
        table.add_row(
            _when(r.time),
            r.operation,
            (r.key_id or "-")[:8],
            (r.principal or "anonymous").split(":")[-1],
            (r.evidence_digest or "-")[:12],
            f"[{colour}]{r.decision}[/]",
            str(r.status),
            "; ".join(r.reasons),
        )
    console.print(table)
    return 0


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
