"""The tlserve demo, end to end on this machine: `make demo`.

Starts a real server (`tlserve serve`) on free ports with its home in ./var,
talks to it through the `tlserve` command line as a user would, then stops it
with SIGTERM and checks that it drained and exited cleanly. Each step prints
the command it runs.

Today the steps are: health, server info, the backbone catalogue, and the
Prometheus metrics the calls produced. Fine-tuning, export, prediction and the
trade-off report join as those parts of tlserve are built.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = pathlib.Path(os.environ.get("TLSERVE_HOME", ROOT / "var"))
TLSERVE = str(pathlib.Path(sys.executable).with_name("tlserve"))


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def start_server() -> tuple[subprocess.Popen, dict]:
    ready_file = HOME / "demo.ready.json"
    ready_file.unlink(missing_ok=True)
    command = [
        TLSERVE, "serve", "--home", str(HOME),
        "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        "--ready-file", str(ready_file), "--log-format", "text",
    ]
    print("$", shlex.join(command), flush=True)
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while not ready_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            sys.exit(f"demo: the server did not start (exit code {server.poll()})")
        time.sleep(0.1)
    return server, json.loads(ready_file.read_text())


def cli(address: str, *args: str) -> None:
    command = [TLSERVE, "--address", address, *args]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def show_metrics(metrics_address: str) -> None:
    url = f"http://{metrics_address}/metrics"
    print("$ curl", url, "| grep tlserve_grpc_requests_total", flush=True)
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("tlserve_grpc_requests_total"):
                print(line)


def stop_server(server: subprocess.Popen) -> None:
    print(f"$ kill -TERM {server.pid}", flush=True)
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    if code != 0:
        sys.exit(f"demo: the server exited with {code}")
    print("server drained and exited with code 0")


def main() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    banner("start the server")
    server, ready = start_server()
    try:
        address = ready["grpc_address"]
        banner("is it serving? (grpc.health.v1)")
        cli(address, "health")
        banner("what does it run on?")
        cli(address, "info")
        banner("which backbones can it fine-tune? (torchvision metadata)")
        cli(address, "backbones")
        banner("what did those calls cost? (Prometheus)")
        show_metrics(ready["metrics_address"])
    finally:
        banner("stop the server (SIGTERM: drain, then exit)")
        stop_server(server)


if __name__ == "__main__":
    main()
