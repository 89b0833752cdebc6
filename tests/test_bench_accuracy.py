"""bench/accuracy.py's arithmetic: which reference each strategy is compared with, the
closing figures, and the table, on made-up cells (no training)."""

from __future__ import annotations

import pytest

from bench import accuracy


def cell(set_name: str, size: int, ours: dict[str, list[float]], refs: dict[str, list[float]]) -> accuracy.Cell:
    c = accuracy.Cell(set_name, size)
    c.ours, c.refs = ours, refs
    c.auto_choices = ["prototype"]
    return c


def filled(set_name: str, size: int, **overrides: list[float]) -> accuracy.Cell:
    ours = {label: [80.0, 82.0] for label in [*accuracy.STRATEGIES, accuracy.SCRATCH]}
    refs = {"frozen": [70.0, 72.0], "full": [81.0, 81.0], "scratch": [60.0, 64.0]}
    for name, values in overrides.items():
        (refs if name.startswith("plain_") else ours)[name.removeprefix("plain_")] = values
    return cell(set_name, size, ours, refs)


def test_each_strategy_is_compared_with_the_reference_of_its_kind():
    pairs = {(label, mode) for label, mode, _, _ in accuracy.comparisons(filled("digits", 3))}
    assert pairs == {
        ("feature_extraction", "frozen"), ("prototype", "frozen"), ("partial", "full"), ("full", "full"),
        ("progressive_unfreezing", "full"), ("scratch", "scratch"),
    }


def test_figures_take_the_worst_case_over_sets_and_sizes():
    cells = [
        filled("digits", 3, partial=[70.0, 72.0], scratch=[61.0, 63.0]),  # partial 71 against plain full 81: -10
        filled("faces", 3, auto=[75.0, 75.0], full=[90.0, 90.0], scratch=[70.0, 70.0]),  # AUTO 15 below the best
        filled("faces", 10),
    ]
    figures = accuracy.figures(cells, {"digits": -0.4, "faces": 0.2})
    assert figures["min_strategy_minus_reference_points"] == pytest.approx(-10.0)
    assert figures["auto_gap_to_best_points"] == pytest.approx(15.0)
    # 3 per class: digits AUTO 81 - scratch 62 = 19; faces 75 - 70 = 5; the mean 12.
    assert figures["transfer_minus_scratch_points_3shot_digits"] == pytest.approx(19.0)
    assert figures["transfer_minus_scratch_points_3shot"] == pytest.approx(12.0)
    assert figures["int8_minus_fp32_points"] == pytest.approx(-0.4)


def test_auto_gap_never_counts_scratch_as_a_strategy_auto_could_pick():
    gap, best = accuracy.auto_gap(filled("digits", 10, scratch=[99.0, 99.0]))
    assert gap == pytest.approx(0.0) and best != accuracy.SCRATCH


def test_the_report_shows_means_with_their_spread_and_every_comparison():
    text = accuracy.report([filled("digits", 3)], accuracy.SETTINGS["quick"], {"digits": -0.5}, [])
    assert "81.0 [80.0–82.0]" in text and "plain frozen" in text and "-0.50 points" in text
    assert text.count("| digits | 3") >= len(accuracy.STRATEGIES)
