"""Regenerates the Python modules for protos/ into client/.

The generated modules live in the client package (the light install a backend
service uses) and are checked in; tests/test_protos.py regenerates them into a
temporary directory and fails if they differ from what is checked in.

    python scripts/gen_protos.py            # write into client/
    python scripts/gen_protos.py --out DIR  # write somewhere else

`protos/` is mapped onto the virtual root `tlserve/client/` so that the generated
imports read `from tlserve.client.tlserve.v1 import tlserve_pb2`, the package's
installed name (the source folder `client/` is installed as `tlserve.client`):
protoc writes under `tlserve/client/` in a scratch directory, and the files are
moved into `client/`.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
PACKAGE = "tlserve/client"  # the import path the generated modules use
FOLDER = "client"  # where they live in the tree


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = [f"{PACKAGE}/{name}" for name in proto_files()]
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE}={PROTOS}",
            f"-I{include}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = pathlib.Path(scratch) / PACKAGE
        for path in sorted(p for p in generated.rglob("*") if p.is_file()):
            target = out / FOLDER / path.relative_to(generated)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    # Every directory on the way to a generated module is a package.
    for name in proto_files():
        d = out / FOLDER / pathlib.Path(name).parent
        while d != out / FOLDER:
            (d / "__init__.py").touch()
            d = d.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    sys.exit(main())
