"""What every benchmark prints the same way: markdown tables, the machine it ran
on, and the closing `name: value` lines (the required figures last)."""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Iterable
from pathlib import Path


def table(headers: list[str], rows: list[list], *, digits: int = 3) -> str:
    """A markdown table; floats with `digits` decimals, columns padded to align."""
    cells = [[str(h) for h in headers]] + [[f"{c:.{digits}f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def final_lines(figures: dict[str, float], required: Iterable[str]) -> list[str]:
    """`name: value` with two decimals: any other figures in the order they were
    added, then the `required` ones in their order, so that the output ends with
    the lines a reader (or a script taking the last lines) looks for."""
    required = list(required)
    names = [n for n in figures if n not in required] + [n for n in required if n in figures]
    return [f"{name}: {figures[name]:.2f}" for name in names]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(len(sorted_values) * q / 100)))
    return sorted_values[rank - 1]


def start_server(home: Path, data_root: Path, *flags: str, env: dict[str, str] | None = None):
    """A real tlserve server in a child process (tests/serverproc.py), quiet, reading
    datasets from `data_root`; `flags` and `env` are the benchmark's own settings."""
    from tests.serverproc import ServerProcess

    return ServerProcess(home, "--data-root", str(data_root), "--log-level", "warning", *flags, env=env).start()


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def wait_for_model(tl, job, what: str, timeout: float = 3600):
    """Polls a FineTune job until it ends: its published ModelRef, or RuntimeError
    naming `what` and the job's error."""
    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

    deadline = time.monotonic() + timeout
    while job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        if time.monotonic() > deadline:
            raise RuntimeError(f"fine-tune of {what} did not finish: {job}")
        time.sleep(0.2)
        job = tl.get_job(job.id)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"fine-tune of {what} failed: {job.error}")
    return job.model
