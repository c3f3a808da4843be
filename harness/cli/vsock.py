"""``teelab vsock ...``: run the built-in switch as its own process, a host-side vsock-proxy, and show which
backend the probe picks.

``teelab vsock serve`` takes rust-vmm vhost-device-vsock's ``--vm`` syntax, so either can stand in for the
other: ``--vm guest-cid=4,socket=/run/vm4.vhost,uds-path=/run/vm4.vsock[,groups=g1][,name=vm4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from harness.vsock import backend_choice
from harness.vsock.errors import VsockConfigError
from harness.vsock.server import SwitchServer, VmEndpoint

VM_KEYS = {"guest-cid", "guest_cid", "socket", "uds-path", "uds_path", "groups", "name"}


def register(sub: argparse._SubParsersAction) -> None:
    vsock = sub.add_parser("vsock", help="vsock: the user-space switch, vsock-proxy, backend choice")
    kinds = vsock.add_subparsers(dest="vsock", metavar="COMMAND", required=True)

    serve = kinds.add_parser("serve", help="run the built-in vhost-user-vsock switch until SIGTERM")
    serve.add_argument(
        "--vm",
        action="append",
        required=True,
        metavar="SPEC",
        help="guest-cid=N,socket=PATH,uds-path=PATH[,groups=NAME][,name=NAME] (repeatable)",
    )
    serve.add_argument("--no-event-idx", action="store_true", help="do not offer VIRTIO_RING_F_EVENT_IDX")
    serve.add_argument("--stats", type=Path, help="write the switch's counters here (JSON) when it stops")
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=run_serve)

    proxy = kinds.add_parser("proxy", help="forward guest vsock connections to a TCP address on an allowlist")
    proxy.add_argument("--config", type=Path, required=True, help="allowlist file (YAML subset or JSON)")
    proxy.add_argument(
        "--uds",
        type=Path,
        action="append",
        default=[],
        help="a VM's hybrid socket (user-space switch); repeatable. Default: kernel AF_VSOCK",
    )
    proxy.add_argument("local_port", type=int)
    proxy.add_argument("remote_addr")
    proxy.add_argument("remote_port", type=int)
    proxy.set_defaults(func=run_proxy)

    backend = kinds.add_parser("backend", help="the vsock backend this host would use")
    backend.add_argument("--json", action="store_true")
    backend.set_defaults(func=run_backend)


def parse_vm(spec: str) -> VmEndpoint:
    """One ``--vm`` value; the routing group defaults to 'default', as in vhost-device-vsock."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in VM_KEYS:
            raise VsockConfigError(
                f"--vm {spec!r}: cannot read {part!r}",
                hint="use guest-cid=N,socket=PATH,uds-path=PATH[,groups=NAME][,name=NAME]",
            )
        fields[key.replace("_", "-")] = value
    missing = [k for k in ("guest-cid", "socket", "uds-path") if k not in fields]
    if missing or not fields["guest-cid"].isdigit():
        raise VsockConfigError(
            f"--vm {spec!r}: needs guest-cid (a number), socket and uds-path",
            hint="e.g. --vm guest-cid=4,socket=/run/vm4.vhost,uds-path=/run/vm4.vsock",
        )
    group = fields.get("groups", "default")
    if "+" in group:
        raise VsockConfigError(
            f"--vm {spec!r}: a VM belongs to one routing group here, not {group!r}",
            hint="give one group name",
        )
    cid = int(fields["guest-cid"])
    return VmEndpoint(
        name=fields.get("name", f"cid{cid}"),
        cid=cid,
        group=group,
        vhost_socket=Path(fields["socket"]),
        uds=Path(fields["uds-path"]),
    )


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    endpoints = [parse_vm(spec) for spec in args.vm]
    loop = asyncio.new_event_loop()
    server = SwitchServer(loop, event_idx=not args.no_event_idx)
    try:
        for endpoint in endpoints:
            server.add_vm(endpoint)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(json.dumps({"serving": [e.name for e in endpoints]}), flush=True)
        loop.run_until_complete(stop.wait())
    finally:
        stats = server.stats()
        server.close()
        loop.close()
        if args.stats:
            args.stats.write_text(json.dumps(stats, indent=1) + "\n")
    return 0


def run_proxy(args: argparse.Namespace) -> int:
    import threading

    from harness.vsock.proxy import VsockProxy, load_allowlist, open_listener

    allowlist = load_allowlist(args.config)
    remote = (args.remote_addr, args.remote_port)
    stop = threading.Event()  # set by SIGTERM/SIGINT from before the listener exists: its socket always goes
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with VsockProxy(open_listener(args.local_port, args.uds), remote, allowlist):
        print(json.dumps({"proxy": args.local_port, "to": f"{remote[0]}:{remote[1]}"}), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def run_backend(args: argparse.Namespace) -> int:
    from harness.host.probe import probe

    host = probe()
    chosen = backend_choice.configured_backend()
    plain = backend_choice.resolve(host, chosen, grouped=False)
    grouped = backend_choice.resolve(host, chosen, grouped=True) if chosen != backend_choice.KERNEL else None
    data = {
        "configured": chosen,
        "vm_without_group": plain,
        "vm_in_group": grouped,
        "vhost_vsock_device": host.vhost_vsock,
        "vhost_device_vsock_binary": backend_choice.external_binary(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key:28} {value}")
    return 0


def register_bench(kinds: argparse._SubParsersAction) -> None:
    """``teelab bench vsock``."""
    bench = kinds.add_parser("vsock", help="vsock throughput and round trips, with a virtio-serial baseline")
    bench.add_argument("--image", default="enclave", help="image recipe to boot (default: enclave)")
    bench.add_argument("--size", type=int, default=64, help="MiB per transfer (default: 64)")
    bench.add_argument("--rtt-count", type=int, default=500, help="round trips to time (default: 500)")
    bench.add_argument("--backend", default="builtin", choices=["builtin", "vhost-device-vsock"])
    bench.add_argument("--vcpus", type=int, default=2)
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from harness.bench.vsock import bench_vsock
    from harness.cli.render import console, print_bench, print_json
    from harness.lab import Lab

    def progress(name: str, value: str) -> None:
        if not args.json:
            console.print(f"{name:<22} {value}")

    with Lab() as lab:
        result = bench_vsock(
            lab,
            image_name=args.image,
            size_mib=args.size,
            rtt_count=args.rtt_count,
            backend=args.backend,
            vcpus=args.vcpus,
            on_step=progress,
        )
    if args.json:
        print_json(result.to_dict())
    else:
        print_bench(result)
    return 0 if result.ok else 1
