"""``teelab image build NAME`` and ``teelab image ls``."""

from __future__ import annotations

import argparse
import contextlib

from rich.table import Table

from harness import images
from harness.cli.render import console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="build and list guest images")
    actions = image.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build an image (or take it from the cache)")
    build.add_argument("name", help="recipe name: images/<name>.toml")
    build.add_argument("--json", action="store_true", help="print JSON")
    build.set_defaults(func=run_build)
    listing = actions.add_parser("ls", help="list the recipes and whether their current build is cached")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_ls)


def run_build(args: argparse.Namespace) -> int:
    status = (
        console.status(f"image {args.name}", spinner="dots") if not args.json else contextlib.nullcontext()
    )
    with status as spinner:

        def step(name: str) -> None:
            if spinner is not None:
                spinner.update(f"image {args.name}: {name}")

        image = images.build(args.name, on_step=step)
    summary = {
        "name": image.name,
        "key": image.key,
        "built": image.built,
        "seconds": round(image.seconds, 2),
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "initrd_bytes": image.initrd_bytes,
        "cmdline": image.cmdline,
    }
    if args.json:
        print_json(summary)
    else:
        how = "built" if image.built else "cached"
        console.print(
            f"image [bold]{image.name}[/] {image.key[:16]}: {how} in {image.seconds:.2f} s, "
            f"initrd {image.initrd_bytes / 2**20:.1f} MiB\n  {image.directory}"
        )
    return 0


def run_ls(args: argparse.Namespace) -> int:
    rows = images.list_images()
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="teelab images")
    for column in ("name", "role", "key", "cached", "initrd", "description"):
        table.add_column(column)
    for row in rows:
        size = f"{row['initrd_bytes'] / 2**20:.1f} MiB" if row["initrd_bytes"] else "-"  # type: ignore[operator]
        table.add_row(str(row["name"]), str(row["role"]), str(row["key"]), "yes" if row["cached"] else "no",
                      size, str(row["description"]))  # fmt: skip
    console.print(table)
    console.print("kernel command lines (before what a lab adds):")
    for row in rows:
        console.print(f"  {row['name']}: {row['cmdline']}", highlight=False, markup=False)
    return 0
