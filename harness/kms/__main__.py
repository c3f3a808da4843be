"""``python -m harness.kms``: serve the lab KMS in this process until SIGTERM (used by KmsProcess)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.errors import LabError
from harness.kms.admission import Limits
from harness.kms.runner import Listen, serve_forever


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.kms")
    parser.add_argument("--kms-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", type=Path)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--max-body", type=int, default=65536)
    parser.add_argument("--max-connections", type=int, default=Limits.max_connections)
    parser.add_argument("--request-timeout", type=float, default=Limits.request_timeout)
    parser.add_argument("--lab-ca", type=Path, help="lab CA directory whose root key policies may name")
    parser.add_argument("--profile", type=Path, help="write a cProfile of request serving to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        limits = Limits(args.max_connections, args.request_timeout)
        listen = Listen(args.host, args.port, args.unix, args.tls, args.max_body, limits)
        serve_forever(args.kms_dir, listen, lab_dir=args.lab_ca, profile=args.profile)
    except LabError as err:
        print(str(err), file=sys.stderr)
        return err.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
