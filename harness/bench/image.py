"""``teelab bench image``: seconds to get a guest image, warm (``teelab image build`` on a cached image, the
whole command) and cold (into an empty cache: kernel download, mmdebstrap, trim, compile, pack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from harness import images
from harness.bench.result import Bar, BenchResult
from harness.host import runtime

WARM_BAR = 1.0  # seconds, the foundation bar
COLD_BAR = 90.0


def bench_image(
    name: str, warm_runs: int, *, cold: bool = True, on_sample: Callable[[str, float], None] | None = None
) -> BenchResult:
    """Build ``name`` once cold (unless ``cold`` is False), then ``warm_runs`` times warm through the CLI."""
    result = BenchResult(name="image", unit="s", params={"image": name, "warm_runs": warm_runs, "cold": cold})
    result.bars.append(Bar("max", "<=", WARM_BAR))
    if cold:
        seconds = cold_build(name)
        result.extra["cold_seconds"] = round(seconds, 2)
        result.extra["cold_bar"] = f"<= {COLD_BAR:g} s: {'holds' if seconds <= COLD_BAR else 'MISSED'}"
        if on_sample:
            on_sample("cold", seconds)
    image = images.build(name)  # the warm runs must hit the real cache
    result.extra["initrd_bytes"] = image.initrd_bytes
    for _ in range(warm_runs):
        seconds, report = warm_cli_build(name)
        if report["built"]:
            raise AssertionError(f"a warm build of {name} rebuilt the image")
        result.samples.append(seconds)
        if on_sample:
            on_sample("warm", seconds)
    return result


def warm_cli_build(name: str) -> tuple[float, dict[str, object]]:
    """Wall-clock seconds of ``teelab image build NAME --json``, process start included, and its report."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness.cli", "image", "build", name, "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return time.monotonic() - started, json.loads(done.stdout)


def cold_build(name: str) -> float:
    """Seconds to build ``name`` into an empty, temporary cache dir (removed afterwards)."""
    previous = os.environ.get("TEELAB_CACHE_DIR")
    with runtime.scratch_dir("cold-cache") as scratch:
        os.environ["TEELAB_CACHE_DIR"] = str(scratch)
        try:
            return images.build(name).seconds
        finally:
            if previous is None:
                del os.environ["TEELAB_CACHE_DIR"]
            else:
                os.environ["TEELAB_CACHE_DIR"] = previous
