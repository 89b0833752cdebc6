"""Starts a real tlserve server in a child process, as an operator would.

The server binds port 0 for gRPC and metrics and writes the addresses it bound
to a ready file; `ServerProcess.start()` waits for that file; `serving()` holds
one for a block and checks that it then stops cleanly. Used by the integration
tests' fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, OSError):
        return False
    return state != "Z"


class ServerProcess:
    def __init__(self, home: pathlib.Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.home = pathlib.Path(home)
        self.ready_file = self.home.parent / f"{self.home.name}.ready.json"
        self.log_path = self.home.parent / f"{self.home.name}.log"
        self.args = [
            sys.executable, "-m", "tlserve.service",
            "--home", str(self.home),
            "--grpc-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
            "--ready-file", str(self.ready_file),
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.metrics_address = ""

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.ready_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        ready = json.loads(self.ready_file.read_text())
        self.address, self.metrics_address = ready["grpc_address"], ready["metrics_address"]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def serving(home: pathlib.Path, *extra_args: str, **kwargs) -> Iterator[ServerProcess]:
    """A started server for the block; afterwards SIGTERM must stop it with exit
    code 0 (a graceful drain), else the block's user sees the server's log."""
    server = ServerProcess(home, *extra_args, **kwargs).start()
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    code = server.terminate()
    assert code == 0, f"server exited with {code}:\n{server.log()}"
