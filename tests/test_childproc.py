"""run_in_child: a function in a spawned child that dies with its parent, with its
result, its errors, its death and its cancellation each turned into what the
caller expects. The functions run here are module-level so that they pickle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tlserve.service.childproc import run_in_child
from tlserve.service.errors import Cancelled, NotFound, ResourceExhausted
from tests.serverproc import alive


def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def refuse(name: str) -> None:
    raise NotFound(f"{name} does not exist")


def crash(_: object) -> None:
    raise ZeroDivisionError("deep inside")


def kill_self(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does


def sleep_and_report(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def test_the_result_comes_back_from_another_process():
    value, pid = run_in_child(square, 7, what="squaring")
    assert value == 49 and pid != os.getpid()


def test_a_domain_error_is_raised_as_it_was():
    with pytest.raises(NotFound, match="thing does not exist"):
        run_in_child(refuse, "thing", what="looking")


def test_any_other_failure_becomes_a_runtime_error_naming_the_work():
    with pytest.raises(RuntimeError, match="dividing failed in its process: ZeroDivisionError: deep inside"):
        run_in_child(crash, None, what="dividing")


def test_a_child_killed_by_sigkill_is_resource_exhausted_with_the_hint():
    with pytest.raises(ResourceExhausted, match=r"the process probing was killed \(SIGKILL: out of memory\?\).*use less"):
        run_in_child(kill_self, None, what="probing", memory_hint="use less")


def test_cancelling_stops_the_child_at_once(tmp_path):
    cancelled = threading.Event()
    pid_file = tmp_path / "pid"
    start = time.monotonic()

    def cancel_when_started():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.02)
        cancelled.set()

    watcher = threading.Thread(target=cancel_when_started, daemon=True)
    watcher.start()
    with pytest.raises(Cancelled, match="sleeping was cancelled"):
        run_in_child(sleep_and_report, str(pid_file), what="sleeping", cancelled=cancelled)
    assert time.monotonic() - start < 30  # not the child's 60 s
    assert not alive(int(pid_file.read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_the_child_dies_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from tlserve.service.childproc import run_in_child
        from tests.test_childproc import sleep_and_report
        run_in_child(sleep_and_report, {str(pid_file)!r}, what="sleeping")
    """)], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()  # kill -9: no cleanup code runs in the parent
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child outlived its killed parent"
    finally:
        parent.kill()
