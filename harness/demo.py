"""The main job, as far as it goes today: build the guest images, boot each one to guest-init's readiness
line, report what the guests said, and tear everything down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness import images
from harness.lab import Lab


@dataclass
class Phase:
    name: str
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    phases: list[Phase] = field(default_factory=list)
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(sum(p.seconds for p in self.phases), 2),
            "phases": [{"name": p.name, "seconds": round(p.seconds, 2), **p.detail} for p in self.phases],
        }


def run_demo(on_phase: Callable[[Phase], None] | None = None) -> DemoResult:
    """Boot the parent and the enclave image once each; ``ok`` when both reported ready and stopped."""
    result = DemoResult()

    def phase(name: str, work: Callable[[], dict[str, Any]]) -> None:
        start = time.monotonic()
        detail = work()
        done = Phase(name, time.monotonic() - start, detail)
        result.phases.append(done)
        if on_phase:
            on_phase(done)

    with Lab() as lab:
        phase(
            "probe host",
            lambda: {"accel": lab.host.accel, "qemu": ".".join(map(str, lab.host.qemu.version or ()))},
        )
        for name in ("parent", "enclave"):
            image: list[images.BuiltImage] = []
            phase(f"image {name}", lambda name=name, image=image: _build(name, image))

            def boot(image: list[images.BuiltImage] = image, name: str = name) -> dict[str, Any]:
                booted = lab.boot(lab.spec_for_image(image[0], name=f"demo-{name}"))
                exit_info = booted.machine.shutdown()
                return {
                    "role": booted.role,
                    "guest_uptime": booted.guest_uptime,
                    "ready_after": round(booted.seconds, 2),
                    "stopped_by": exit_info.stage,
                    "artifacts": str(booted.machine.artifacts),
                }

            phase(f"boot {name}", boot)
    boots = [p for p in result.phases if p.name.startswith("boot ")]
    result.ok = len(boots) == 2 and all(p.detail["stopped_by"] == "powerdown" for p in boots)
    return result


def _build(name: str, out: list[images.BuiltImage]) -> dict[str, Any]:
    image = images.build(name)
    out.append(image)
    return {
        "cached": not image.built,
        "initrd_mib": round(image.initrd_bytes / 2**20, 1),
        "key": image.key[:12],
    }
