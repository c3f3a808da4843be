"""``teelab attest verify|show|roots|lab|issue``: verify evidence against a policy file, decode it, list
roots, export the lab CA, and issue lab evidence; ``teelab bench attest``."""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import datetime as dt
import json
import os
import string
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text

from harness import userfiles
from harness.attest import (
    KINDS,
    LabAuthority,
    Policy,
    Verdict,
    default_lab_dir,
    detect_kind,
    load_lab_certificates,
    parse,
    verify,
)
from harness.attest.errors import EvidenceFileError
from harness.attest.roots import VENDOR_ROOTS, vendor_anchors
from harness.attest.tpm_ca import TPM_DIR, tpm_anchor
from harness.cli.render import console, print_bench, print_json
from harness.errors import UsageError

_TEXT = set(string.hexdigits + string.ascii_letters + string.digits + "+/=_-\r\n\t ")


def register(sub: argparse._SubParsersAction) -> None:
    attest = sub.add_parser("attest", help="verify and inspect attestation evidence (SNP, TDX, SGX, Nitro)")
    commands = attest.add_subparsers(dest="attest", metavar="ACTION", required=True)

    check = commands.add_parser("verify", help="verify evidence against a policy; exit 0 only if it holds")
    check.add_argument("file", type=Path, help="evidence: raw bytes, hex or base64")
    check.add_argument("--policy", type=Path, required=True, help="policy TOML (see docs/attestation.md)")
    check.add_argument("--at", help="verify as of this ISO time (evidence whose certificates expired)")
    check.add_argument(
        "--cert",
        type=Path,
        action="append",
        default=[],
        help="certificate(s) the evidence lacks: SNP VCEK/VLEK (DER, PEM or cert table)",
    )
    check.add_argument("--collateral", type=Path, help="TDX collateral JSON (Intel PCS, dcap-qvl shape)")
    check.add_argument("--kind", choices=KINDS, help="evidence kind (detected when omitted)")
    check.add_argument("--lab-dir", type=Path, help="lab CA directory (default: the state dir's lab-ca)")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.set_defaults(func=run_verify)

    show = commands.add_parser("show", help="decode evidence and print every field")
    show.add_argument("file", type=Path)
    show.add_argument("--kind", choices=KINDS)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    roots = commands.add_parser("roots", help="list the roots of trust policies can name")
    roots.add_argument("--lab-dir", type=Path)
    roots.add_argument("--json", action="store_true")
    roots.set_defaults(func=run_roots)

    lab = commands.add_parser("lab", help="create (once) and describe the lab CA; --export writes its PEMs")
    lab.add_argument("--lab-dir", type=Path)
    lab.add_argument("--export", type=Path, help="directory to write every lab certificate to, as PEM")
    lab.add_argument("--json", action="store_true")
    lab.set_defaults(func=run_lab)

    issue = commands.add_parser("issue", help="issue lab evidence (for trying policies and tools)")
    issue.add_argument("kind", choices=KINDS)
    issue.add_argument("--out", type=Path, required=True)
    issue.add_argument("--report-data", default="", help="hex, up to 64 bytes (SNP, TDX, SGX); zero-padded")
    issue.add_argument(
        "--measurement", default="", help="hex: SNP measurement / TDX MRTD / SGX MRENCLAVE / Nitro PCR0"
    )
    issue.add_argument("--nonce", help="hex (Nitro)")
    issue.add_argument(
        "--debug", action="store_true", help="a debug guest (policy bit, TD attribute, SGX DEBUG, zero PCRs)"
    )
    issue.add_argument("--lab-dir", type=Path)
    issue.set_defaults(func=run_issue)


def register_bench(kinds: argparse._SubParsersAction) -> None:
    bench = kinds.add_parser("attest", help="evidence verified per second (SNP bar: >= 500/s)")
    bench.add_argument("--kind", choices=(*KINDS, "all"), default="all")
    bench.add_argument("-n", "--count", type=int, default=500, help="evidence items per round (default: 500)")
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=run_bench)


# --- helpers ----------------------------------------------------------------------------------------------
def read_evidence(path: Path) -> bytes:
    """File bytes; a text file of hex or base64 is decoded (vendor samples come in all three forms)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EvidenceFileError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    if data and set(data.decode("latin-1")) <= _TEXT:
        text = b"".join(data.split())
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            pass
    return data


def _hex_arg(value: str, name: str, size: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"--{name} is not hex", hint=f"give --{name} as hex digits") from None
    if size is not None:
        if len(raw) > size:
            raise UsageError(f"--{name} is {len(raw)} bytes, at most {size}")
        raw = raw.ljust(size, b"\0")
    return raw


def _at(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--at {value!r} is not an ISO time", hint="e.g. --at 2025-06-20T00:00:00Z"
        ) from None
    if not 1970 <= moment.year <= 9998:
        raise UsageError(f"--at {value!r} is outside 1970..9998", hint="e.g. --at 2025-06-20T00:00:00Z")
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def write_files(outputs: dict[Path, bytes]) -> None:
    """Write every file or none: each goes to a temporary file beside it, renamed into place once all are
    written; on an error the temporary files are removed and E830 names the file."""
    staged: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for path, data in outputs.items():
            temporary = staged[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_bytes(data)
        for path, temporary in staged.items():
            temporary.replace(path)
            placed.append(path)
    except OSError as exc:
        for leftover in (*staged.values(), *placed):
            leftover.unlink(missing_ok=True)
        raise EvidenceFileError(
            f"cannot write {path}: {exc.strerror or exc}",
            path=str(path),
            hint="write to an existing directory you may write in",
        ) from None


def _lab_dir(value: Path | None) -> Path:
    return userfiles.directory(value, "lab CA directory") if value is not None else default_lab_dir()


# --- commands ---------------------------------------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    evidence = read_evidence(args.file)
    policy = Policy.from_toml(args.policy)
    if args.lab_dir is not None:
        policy = dataclasses.replace(policy, lab_dir=_lab_dir(args.lab_dir))
    collateral = None
    if args.collateral is not None:
        try:
            collateral = json.loads(args.collateral.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise EvidenceFileError(
                f"cannot read collateral {args.collateral}: {exc}", path=str(args.collateral)
            ) from None
    verdict = verify(
        evidence,
        policy,
        now=_at(args.at),
        kind=args.kind,
        certificates=[read_evidence(c) for c in args.cert],
        collateral=collateral,
    )
    if args.json:
        print_json(verdict.to_dict())
    else:
        _print_verdict(verdict)
    return 0 if verdict.ok else 1


def _print_verdict(verdict: Verdict) -> None:
    head = "[green]VERIFIED[/]" if verdict.ok else "[red]REFUSED[/]"
    console.print(f"{head} {verdict.kind} evidence, root: {verdict.root or 'none'}")
    for reason in verdict.reasons:
        console.print(
            f"  [red]x[/] {reason.code} {escape(f'[{reason.field}]')}: {escape(reason.message)}",
            highlight=False,
            soft_wrap=True,
        )
    for note in verdict.notes:
        console.print(f"  note: {escape(note)}", highlight=False, soft_wrap=True)
    for key in (
        "measurement",
        "mrtd",
        "mrenclave",
        "mrsigner",
        "module_id",
        "report_data",
        "host_data",
        "debug",
        "tcb",
        "nonce",
        "public_key",
    ):
        if key in verdict.claims:
            console.print(f"  {key}: {escape(str(verdict.claims[key]))}", highlight=False, soft_wrap=True)
    if "pcrs" in verdict.claims:
        for index, value in verdict.claims["pcrs"].items():
            console.print(f"  PCR{index}: {value}", highlight=False, soft_wrap=True)


def run_show(args: argparse.Namespace) -> int:
    evidence = read_evidence(args.file)
    kind = args.kind or detect_kind(evidence)
    fields = parse(evidence, kind).to_dict()
    if args.json:
        print_json({"kind": kind, "fields": fields})
        return 0
    console.print(f"{kind} evidence, {len(evidence)} bytes")
    for key, value in fields.items():
        if key in ("certificate", "cabundle", "pck_chain") or key.startswith("reserved"):
            value = _summary(value)
        console.print(f"  {key}: {escape(str(value))}", highlight=False, soft_wrap=True)
    return 0


def _summary(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} certificates]"
    return f"[{len(str(value))} characters]" if len(str(value)) > 96 else str(value)


def run_roots(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": r.name,
            "kind": r.kind,
            "subject": a.cert.subject_text,
            "sha256": a.cert.fingerprint,
            "description": r.description,
        }
        for r, a in zip(VENDOR_ROOTS, vendor_anchors(), strict=True)
    ]
    lab_dir = _lab_dir(args.lab_dir)
    lab = load_lab_certificates(lab_dir)
    lab_anchors = [*lab.anchors()] if lab is not None else []
    tpm = tpm_anchor(lab_dir / TPM_DIR)
    if tpm is not None:
        lab_anchors.append(tpm)
    rows += [
        {
            "name": "lab",
            "kind": a.kind,
            "subject": a.cert.subject_text,
            "sha256": a.cert.fingerprint,
            "description": f"lab CA in {lab_dir} (trusted only when a policy names it)",
        }
        for a in lab_anchors
    ]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:  # two lines a root: nothing wider than 80 columns is cut or wrapped mid-value
        console.print(Text(f"{row['name']} ({row['kind']}): {row['description']}"))
        console.print(Text(f"  sha256 {row['sha256']}"), soft_wrap=True)
    if lab is None:
        console.print("lab (no lab CA yet: `teelab attest lab` creates one)", markup=False)
    return 0


def _refuse_unwritable(path: Path, *, directory: bool = False) -> None:
    """E830 for an output the command could not write, before it makes anything (the lab CA included)."""
    wrong = (
        (path.exists() and not path.is_dir()) if directory else (path.is_dir() or not path.parent.is_dir())
    )
    if wrong:
        what = (
            "is not a directory" if directory else ("is a directory" if path.is_dir() else "has no directory")
        )
        raise EvidenceFileError(
            f"cannot write {path}: it {what}", path=str(path), hint="write to an existing directory"
        )


def run_lab(args: argparse.Namespace) -> int:
    if args.export is not None:
        _refuse_unwritable(args.export, directory=True)
    lab = LabAuthority.load_or_create(_lab_dir(args.lab_dir))
    pems = lab.certificates_pem()
    if args.export is not None:
        try:
            args.export.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvidenceFileError(
                f"cannot make {args.export}: {exc.strerror or exc}", path=str(args.export)
            ) from None
        outputs = {args.export / f"{name}.pem": pem.encode() for name, pem in pems.items()}
        outputs[args.export / "amd-cert-table.bin"] = lab.snp_cert_table()
        write_files(outputs)
    info = {
        "directory": str(lab.directory),
        "chip_id": lab.chip_id.hex(),
        "tcb": lab.tcb.to_dict(),
        "certificates": {name: lab.public.certs[name].fingerprint for name in lab.public.certs},
    }
    if args.json:
        print_json(info)
    else:
        console.print(f"lab CA: {info['directory']}", highlight=False, soft_wrap=True)
        console.print(
            f"  chip_id: {info['chip_id']}\n  tcb: {escape(str(info['tcb']))}",
            highlight=False,
            soft_wrap=True,
        )
        for name, fp in info["certificates"].items():
            console.print(f"  {name:<13} {fp}", highlight=False, soft_wrap=True)
        if args.export is not None:
            console.print(f"certificates written to {args.export}", highlight=False)
    return 0


def run_issue(args: argparse.Namespace) -> int:
    measurement = _hex_arg(args.measurement, "measurement", 32 if args.kind == "sgx" else 48)
    report_data = _hex_arg(args.report_data, "report-data", 64)
    nonce = None if args.nonce is None else _hex_arg(args.nonce, "nonce")
    _refuse_unwritable(args.out)
    lab = LabAuthority.load_or_create(_lab_dir(args.lab_dir))
    if args.kind == "snp":
        policy = 0x30000 | (1 << 19 if args.debug else 0)
        evidence = lab.snp_report(report_data, measurement=measurement, policy=policy)
    elif args.kind == "tdx":
        evidence = lab.tdx_quote(report_data, mrtd=measurement, td_attributes=1 if args.debug else 0)
    elif args.kind == "sgx":
        evidence = lab.sgx_quote(report_data, mrenclave=measurement, debug=args.debug)
    else:
        pcr0 = bytes(48) if args.debug else measurement
        evidence = lab.attestation_document(
            pcrs={0: pcr0, 1: bytes(48) if args.debug else measurement, 2: bytes(48)},
            public_key=None,
            user_data=None,
            nonce=nonce,
            module_id="teelab-lab-enclave",
        )
    outputs = {args.out: evidence}
    if args.kind == "snp":
        outputs[args.out.with_name(args.out.name + ".certs")] = lab.snp_cert_table()
    write_files(outputs)
    console.print(f"wrote {len(evidence)} bytes of lab {args.kind} evidence to {args.out}", highlight=False)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from harness.bench.attest import bench_attest

    kinds = KINDS if args.kind == "all" else (args.kind,)
    results = [bench_attest(kind, count=args.count, rounds=args.rounds) for kind in kinds]
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        for result in results:
            print_bench(result)
    return 0 if all(r.ok for r in results) else 1
