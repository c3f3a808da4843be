"""``teelab bench tpm``: its side-by-side figures, and bad counts refused before anything boots."""

from __future__ import annotations

from collections.abc import Callable

from harness.bench.tpm import _side_by_side


def test_side_by_side_reports_both_medians_and_the_difference() -> None:
    figures = _side_by_side({"without_vtpm": [3.0, 1.0, 2.0], "with_vtpm": [2.5, 4.5, 3.5]})
    assert (figures["median_without_vtpm"], figures["median_with_vtpm"], figures["vtpm_cost"]) == (
        2.0,
        3.5,
        1.5,
    )
    assert figures["samples"]["with_vtpm"] == [2.5, 4.5, 3.5]


def test_bad_counts_are_refused_before_any_boot(run: Callable[..., tuple[int, str, str]]) -> None:
    for flag in ("--boots", "--rounds"):
        status, _, err = run("bench", "tpm", flag, "0")
        assert status == 2 and flag in err
