"""The distribution installs one top-level name, `tlserve`, whatever the source
folders are called, and nothing in the tree imports the folders by their own names
(a module loaded as both `service.x` and `tlserve.service.x` would run twice)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Statements, and code in strings run by a subprocess ("import sys, service.metrics; ...").
BARE_IMPORT = re.compile(r"(^\s*|[\"'])(from|import)\s+([\w.]+,\s*)*(client|service)(\.|\s|,|;|$)", re.M)


def test_every_package_of_the_tree_is_in_the_distribution():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in config["package-dir"].items()}
    in_tree = {"tlserve"} | {
        mapped[init.parent.relative_to(ROOT).parts[0]] + "".join(f".{p}" for p in init.parent.relative_to(ROOT).parts[1:])
        for folder in mapped for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(config["packages"]) == in_tree


def test_nothing_imports_the_source_folders_by_their_own_names():
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for folder in ("client", "service", "tests", "bench", "scripts", "tlserve")
        for path in (ROOT / folder).rglob("*.py*")
        if path.suffix in (".py", ".pyi") and path != pathlib.Path(__file__).resolve()  # this file names them on purpose
        for text in [path.read_text()]
        for m in BARE_IMPORT.finditer(text)
    ]
    assert not offenders, f"import tlserve.client / tlserve.service instead: {offenders}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    [built] = out.glob("tlserve-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"tlserve", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for expected in ("tlserve/__init__.py", "tlserve/client/__init__.py", "tlserve/client/py.typed",
                     "tlserve/client/tlserve/v1/tlserve_pb2.pyi", "tlserve/service/__main__.py"):
        assert expected in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tlserve = tlserve.client.cli:main" in entry_points


def test_the_installed_wheel_works_beside_an_application_s_own_client_package(wheel, tmp_path):
    """In a clean venv with only the client's dependencies, from a directory holding
    an application's own `client` package: the SDK and the CLI still work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True)
    app = tmp_path / "app"
    (app / "client").mkdir(parents=True)
    (app / "client" / "__init__.py").write_text("NAME = 'the application client'\n")
    code = ("import client, tlserve, tlserve.client as sdk; assert client.NAME; "
            "print(tlserve.Client.__name__, sdk.pb.DESCRIPTOR.package)")
    done = subprocess.run([str(python), "-c", code], cwd=app, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Client", "tlserve.v1"]
    cli = subprocess.run([str(venv / "bin" / "tlserve"), "--help"], cwd=app, capture_output=True, text=True)
    assert cli.returncode == 0 and "usage: tlserve" in cli.stdout
    serve = subprocess.run([str(venv / "bin" / "tlserve"), "serve"], cwd=app, capture_output=True, text=True)
    assert serve.returncode == 2 and "install tlserve[server]" in serve.stderr  # the client install has no server
