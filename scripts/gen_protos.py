"""Regenerates the Python modules for protos/ into client/.

The generated modules live in the client package (the light install a backend
service uses) and are checked in; tests/test_protos.py regenerates them into a
temporary directory and fails if they differ from what is checked in.

    python scripts/gen_protos.py            # write into client/
    python scripts/gen_protos.py --out DIR  # write somewhere else

`protos/` is mapped onto the virtual root `client/` so that the generated
imports read `from client.tlserve.v1 import tlserve_pb2`: importable as a
package, with no sys.path changes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "client"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = [f"{PACKAGE}/{name}" for name in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every directory on the way to a generated module is a package.
    for name in proto_files():
        d = out / PACKAGE / pathlib.Path(name).parent
        while d != out / PACKAGE:
            (d / "__init__.py").touch()
            d = d.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    sys.exit(main())
