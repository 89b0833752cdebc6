"""Child processes that die with the server: `run_in_child` and `die_with_parent`.

Every piece of work the server hands to another process goes through here:
ProfileModel measures each variant and CompareBackbones probes its backbones in a
function run by `run_in_child` (a fresh spawned interpreter, so the measurement
starts clean and a crash or the out-of-memory killer takes only the child), and
the job runner starts each training worker, or torchrun, through
`python -m tlserve.service.jobs.launch`, which calls `die_with_parent` before it execs.
Either way Linux's parent-death signal (SIGKILL) is set in the child, so a server
killed with -9 leaves no work running unsupervised.

    result = run_in_child(probe_all, task, what="comparing backbones", cancelled=event,
                          memory_hint="compare fewer or smaller backbones")

`fn(arg)` runs in the child and its return value comes back through a pipe; a
domain error (`TLServeError`) it raises is raised here as it was; anything else
it raises becomes RuntimeError with the child's traceback logged; a child killed
by SIGKILL (what the out-of-memory killer sends) becomes ResourceExhausted; and
`cancelled` set while it runs stops the child at once and raises Cancelled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from tlserve.service.errors import Cancelled, ResourceExhausted, TLServeError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often a waiting caller looks at `cancelled`
_PR_SET_PDEATHSIG = 1

Arg = TypeVar("Arg")
Result = TypeVar("Result")


def die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (no orphans). It
    survives exec; elsewhere than Linux it does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_in_child(
    fn: Callable[[Arg], Result], arg: Arg, *, what: str, cancelled: threading.Event | None = None,
    memory_hint: str = "",
) -> Result:
    """`fn(arg)` in a fresh spawned process that dies with this one; blocks until it
    answers (call it off the event loop). `fn` and `arg` must pickle; `what` names
    the work in errors ("the process {what} was killed ...")."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(fn, arg, sender), name=f"tlserve {what}")
    process.start()
    sender.close()  # the child holds the only writer: EOF when it dies
    answered = False
    try:
        while not receiver.poll(POLL_SECONDS):  # readable on a message, or on EOF when the child died
            if cancelled is not None and cancelled.is_set():
                log.info("%s cancelled by its caller: stopping its process %d", what, process.pid)
                raise Cancelled(f"{what} was cancelled; its process was stopped")
        try:
            kind, payload = receiver.recv()
        except EOFError:  # it died without answering
            raise _death(process, what, memory_hint) from None
        answered = True
    finally:
        receiver.close()
        if answered:
            process.join(5)  # it exits right after sending
        elif process.is_alive():
            process.terminate()  # cancelled, or the waiting thread failed: stop the work now
            process.join(2)
        if process.is_alive():
            process.kill()
        process.join()
        process.close()
    if kind == "error":
        raise payload
    if kind == "crash":
        log.error("%s failed in its process:\n%s", what, payload)
        raise RuntimeError(f"{what} failed in its process: {payload.strip().splitlines()[-1]}")
    return payload


def _death(process, what: str, memory_hint: str) -> Exception:
    """The error for a child that ended without answering."""
    process.join(5)
    code = process.exitcode
    if code == -signal.SIGKILL:  # what the out-of-memory killer sends
        hint = f": {memory_hint}" if memory_hint else ""
        return ResourceExhausted(
            f"the process {what} was killed (SIGKILL: out of memory?); nothing was measured{hint}"
        )
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
    return RuntimeError(f"the process {what} {how} without answering")


def _child_main(fn: Callable[[Any], Any], arg: Any, sender) -> None:
    die_with_parent()  # a server killed with -9 takes this work with it
    try:
        message = ("ok", fn(arg))
    except TLServeError as error:
        message = ("error", error)
    except BaseException:
        message = ("crash", traceback.format_exc())
    try:
        sender.send(message)
    except Exception:  # a result or an error that does not pickle
        sender.send(("crash", traceback.format_exc()))
    sender.close()
