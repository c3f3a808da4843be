"""``teelab-enclave`` in a parent: nitro-cli's verbs and JSON, asking the host over vsock (CID 2, port 9102).

    teelab-enclave run-enclave --eif-path app.eif --cpu-count 2 --memory 256 [--enclave-cid N]
                               [--enclave-name NAME] [--debug-mode [--attach-console]]
    teelab-enclave describe-enclaves
    teelab-enclave terminate-enclave (--enclave-id ID | --enclave-name NAME | --all)
    teelab-enclave console (--enclave-id ID | --enclave-name NAME)
    teelab-enclave describe-eif --eif-path app.eif

The image is read here, in the parent, and sent with the request. A refusal prints ``[ E9xx ] message`` and
its hint on stderr and exits 2 (1 when the host could not be reached).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from teelab_guest import pool_wire

CHUNK = 1 << 20


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="teelab-enclave", description="Enclaves carved from this parent.")
    verbs = top.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run-enclave", help="carve an enclave and boot an image in it")
    run.add_argument("--eif-path", required=True)
    cpus = run.add_mutually_exclusive_group()
    cpus.add_argument("--cpu-count", type=int)
    cpus.add_argument("--cpu-ids", type=int, nargs="+")
    run.add_argument("--memory", type=int, required=True, help="MiB")
    run.add_argument("--enclave-cid", type=int)
    run.add_argument("--enclave-name")
    run.add_argument("--debug-mode", action="store_true")
    run.add_argument("--attach-console", action="store_true")
    verbs.add_parser("describe-enclaves", help="the running enclaves")
    for verb in ("terminate-enclave", "console"):
        which = verbs.add_parser(verb).add_mutually_exclusive_group(required=True)
        which.add_argument("--enclave-id")
        which.add_argument("--enclave-name")
        if verb == "terminate-enclave":
            which.add_argument("--all", action="store_true")
    verbs.add_parser("describe-eif").add_argument("--eif-path", required=True)
    return top


def request_of(args: argparse.Namespace) -> dict[str, object]:
    """The request line: the verb and its options, without the ones that stay here."""
    fields = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("eif_path", "attach_console")
    }
    if "eif_path" in vars(args):
        fields["eif_size"] = os.path.getsize(args.eif_path)
    return fields


def ask(request: dict[str, object], eif_path: str | None = None) -> tuple[dict[str, object], socket.socket]:
    """Send the request (and the image) to the host; return its answer and the still-open connection."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((pool_wire.HOST_CID, pool_wire.ENCLAVE_API_PORT))
    sock.sendall(pool_wire.encode(request))
    if eif_path is not None:
        with open(eif_path, "rb") as image:
            while chunk := image.read(CHUNK):
                sock.sendall(chunk)
    return pool_wire.read_frame(sock), sock


def stream(sock: socket.socket) -> None:
    while chunk := sock.recv(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        answer, sock = ask(request_of(args), getattr(args, "eif_path", None))
    except OSError as exc:
        print(f"teelab-enclave: cannot reach the host: {exc}", file=sys.stderr)
        return 1
    with sock:
        if not answer.get("ok"):
            print(f"[ {answer.get('code')} ] {answer.get('error')}", file=sys.stderr)
            if answer.get("hint"):
                print(f"  hint: {answer['hint']}", file=sys.stderr)
            return 2
        if args.verb != "console":
            print(json.dumps(answer.get("result"), indent=2))
        if args.verb == "console":
            stream(sock)
    if args.verb == "run-enclave" and args.attach_console:
        result = answer["result"]
        return main(["console", "--enclave-id", str(result["EnclaveID"])])  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
