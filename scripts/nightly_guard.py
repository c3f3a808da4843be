"""The nightly's guard for one capability job: it fails when the runner lacks the capability its label
promises (doctor's reason) or when no test of the capability's marker ran (none collected, or every one
skipped), so a hardware job can never pass green on tests that did not run.

    python scripts/nightly_guard.py --marker snp --junit results/snp.xml [--root /] [--json]

Exit status: 0 when the capability is there and at least one marked test ran, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.cli.doctor import require
from harness.errors import LabError
from harness.host import capability
from harness.host.probe import probe

MARKERS = {group.replace("-", "_"): group for group in capability.GROUPS if group != "tcg"}


@dataclass
class MarkerRun:
    """What one pytest run of a marker did, from its JUnit XML."""

    collected: int = 0
    ran: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Verdict:
    marker: str
    ok: bool
    reasons: list[str]
    run: MarkerRun | None


def read_junit(path: Path) -> MarkerRun:
    """Count the test cases of a pytest ``--junitxml`` file; ValueError when it is not one."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise ValueError(f"{path}: not a readable JUnit XML file ({exc})") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"{path}: the root element is <{root.tag}>, not <testsuites> or <testsuite>")
    run, reasons = MarkerRun(), Counter[str]()
    for case in root.iter("testcase"):
        run.collected += 1
        skipped = case.find("skipped")
        if skipped is not None:
            run.skipped += 1
            reasons[skipped.get("message", "").strip() or "no reason given"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            run.failed += 1
        else:
            run.passed += 1
    run.ran = run.collected - run.skipped
    run.skip_reasons = dict(reasons.most_common())
    return run


def judge(marker: str, junit: Path, root: Path = Path("/")) -> Verdict:
    """The guard's verdict for the job of ``marker``: doctor's reasons, then whether any marked test ran."""
    reasons = []
    try:
        require(MARKERS[marker], probe(root))
    except LabError as err:
        reasons.append(f"doctor: [ {err.code} ] {err.message}")
    try:
        run: MarkerRun | None = read_junit(junit)
    except ValueError as exc:
        run = None
        reasons.append(f"no results: {exc}")
    if run is not None and run.ran == 0:
        why = "; ".join(f"{count} x {text}" for text, count in run.skip_reasons.items())
        reasons.append(
            f"zero tests marked {marker} ran ({run.collected} collected, {run.skipped} skipped"
            + (f": {why})" if why else ")")
        )
    return Verdict(marker, not reasons, reasons, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--marker", required=True, choices=sorted(MARKERS), help="the job's pytest marker")
    parser.add_argument(
        "--junit", required=True, type=Path, help="pytest --junitxml output of the marker's run"
    )
    parser.add_argument(
        "--root", type=Path, default=Path("/"), help="probe a fixture tree instead of this host"
    )
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = parser.parse_args(argv)
    verdict = judge(args.marker, args.junit, args.root)
    if args.json:
        print(json.dumps(asdict(verdict), indent=2))
    elif verdict.ok:
        assert verdict.run is not None
        print(f"{args.marker}: {verdict.run.ran} marked tests ran ({verdict.run.failed} failed)")
    else:
        print(f"{args.marker}: the job proves nothing:", *verdict.reasons, sep="\n  ", file=sys.stderr)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
