"""bench/soak.py: its arithmetic on made-up records, and its short version end to end
(`--test`: a real server, a model made through the API, 8 Predict client processes
with fine-tuning and metadata traffic for 15 s; about 30 s on 2 quiet CPU cores, up to
a minute on a busy machine). No timing or memory threshold is asserted: those are the
benchmark's figures, not the tests'."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import soak

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
FINAL_LINE = re.compile(r"^(\w+): (-?\d+\.\d+|nan|-?inf)$")


def final_figures(stdout: str) -> dict[str, float]:
    """The closing `name: value` lines of a run, in order."""
    figures: dict[str, float] = {}
    for line in reversed(stdout.strip().splitlines()):
        match = FINAL_LINE.match(line)
        if not match:
            break
        figures[match[1]] = float(match[2])
    return dict(reversed(figures.items()))


SETTINGS = dataclasses.replace(soak.SETTINGS["test"], seconds=10.0, warmup_fraction=0.2, segments=2)


def samples(rss_mib, fds) -> list[tuple[float, int, int]]:
    """One sample a second from 0 to 10 s: RSS and fds as functions of the second."""
    return [(float(t), rss_mib(t) * MiB, fds(t)) for t in range(11)]


def test_summarise_counts_calls_after_warmup_and_rejections_apart_from_errors():
    clients = [
        {"ends": [1.0, 3.0, 5.0, 9.5, 10.2], "latencies_ms": [500.0, 10.0, 20.0, 30.0, 40.0],
         "failures": [[1.5, "RESOURCE_EXHAUSTED"], [6.0, "RESOURCE_EXHAUSTED"]], "messages": {}},
        {"ends": [4.0], "latencies_ms": [15.0], "failures": [[7.0, "DEADLINE_EXCEEDED"]], "messages": {}},
    ]
    metadata = [(0.5, "ListModels", "OK"), (5.0, "GetModel", "NOT_FOUND"), (8.0, "ListJobs", "OK")]
    jobs = [{"start": 0.0, "end": 4.0, "state": "SUCCEEDED", "error": ""},
            {"start": 6.0, "end": 11.0, "state": "FAILED", "error": "boom"}]
    figures, rows = soak.summarise(clients, samples(lambda t: 200, lambda t: 30), metadata, jobs, SETTINGS)
    # Warm-up is the first 2 s; calls that end at 3, 4, 5 and 9.5 s are measured (10.2 s: after the stop).
    assert figures["predict_per_second"] == pytest.approx(4 / 8)
    assert figures["predict_p50_ms"] == 15.0 and figures["predict_p99_ms"] == 30.0
    assert figures["predictions_answered"] == 6
    assert figures["resource_exhausted"] == 2 and figures["predict_errors"] == 1
    assert figures["errors"] == 1 + 1 + 1  # the deadline, the NOT_FOUND, the failed job
    assert (figures["jobs_succeeded"], figures["jobs_failed"], figures["metadata_calls"]) == (1, 1, 3)
    assert figures["job_seconds_max"] == 5.0
    # Rows: warm-up, then [2, 6) and [6, 10) with what ended after the stop.
    assert [row[0] for row in rows] == ["0–2 (warm-up)", "2–6", "6–10"]
    assert [row[1] for row in rows] == pytest.approx([1 / 2, 3 / 4, 2 / 4])
    assert [row[4] for row in rows] == [1, 0, 1] and [row[5] for row in rows] == [0, 0, 1]
    assert [row[7] for row in rows] == [0, 1, 1]


def test_flatness_compares_median_rss_and_the_floor_of_fds_after_warmup_with_the_end():
    # Windows of 3 s: [2, 5) against [7, 10]. A running job's fds come and go on even
    # seconds; the floor rises by one at 7 s.
    figures = soak.flatness(
        samples(lambda t: 100 if t < 2 else 200 if t < 7 else 210, lambda t: 30 + (t >= 7) + 2 * (t % 2 == 0)),
        warmup=2.0, end=10.0, interval=1.0,
    )
    assert figures["rss_after_warmup_mb"] == 200 and figures["rss_end_mb"] == 210
    assert figures["rss_growth_after_warmup_percent"] == pytest.approx(5.0)
    assert (figures["fds_after_warmup"], figures["fds_end"], figures["fds_growth_after_warmup"]) == (30, 31, 1)
    assert figures["rss_max_mb"] == 210 and figures["rss_slope_mb_per_minute"] > 0


def test_final_lines_end_with_the_required_figures_in_order():
    figures = {name: 1.0 for name in reversed(soak.FIGURES)} | {"extra": 2.5}
    lines = soak.final_lines(figures)
    assert lines[0] == "extra: 2.50"
    assert [line.split(":")[0] for line in lines[1:]] == list(soak.FIGURES)


def test_short_soak_answers_predictions_without_errors_and_reports_memory_and_files(tmp_path):
    out = subprocess.run([sys.executable, "bench/soak.py", "--test", "--tmp", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=270)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    figures = final_figures(out.stdout)
    assert list(figures)[-len(soak.FIGURES):] == list(soak.FIGURES), out.stdout[-2000:]
    assert figures["errors"] == 0, out.stdout[-3000:]
    assert figures["predict_errors"] == figures["metadata_errors"] == figures["jobs_failed"] == 0
    assert figures["predictions_answered"] > 0 and figures["predict_per_second"] > 0
    assert figures["jobs_succeeded"] >= 1 and figures["metadata_calls"] > 0
    assert figures["server_exit_code"] == 0
    for name in ("rss_growth_after_warmup_percent", "fds_growth_after_warmup", "rss_after_warmup_mb", "rss_end_mb",
                 "fds_after_warmup", "fds_end"):
        assert math.isfinite(figures[name]), name
    assert figures["rss_end_mb"] > 0 and figures["fds_end"] > 0
