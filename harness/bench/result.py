"""The one shape every benchmark reports: samples, summary figures and the bars they are held to."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bar:
    """A figure a benchmark must meet: ``figure`` compared to ``limit`` with ``op`` ("<=" or ">=")."""

    figure: str
    op: str
    limit: float

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass
class BenchResult:
    name: str
    unit: str
    params: dict[str, Any]
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    bars: list[Bar] = field(default_factory=list)

    @property
    def figures(self) -> dict[str, float]:
        if not self.samples:
            return {}
        ordered = sorted(self.samples)
        return {
            "median": round(statistics.median(ordered), 3),
            "max": round(ordered[-1], 3),
            "min": round(ordered[0], 3),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
        }

    def bar_results(self) -> list[dict[str, Any]]:
        figures = self.figures
        return [
            {
                "figure": b.figure,
                "op": b.op,
                "limit": b.limit,
                "value": figures.get(b.figure),
                "holds": figures.get(b.figure) is not None and b.holds(figures[b.figure]),
            }
            for b in self.bars
        ]

    @property
    def ok(self) -> bool:
        return all(r["holds"] for r in self.bar_results())

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "unit": self.unit,
            "params": self.params,
            "samples": [round(s, 3) for s in self.samples],
            **self.figures,
            "bars": self.bar_results(),
            "ok": self.ok,
            **self.extra,
        }
