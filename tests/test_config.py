"""Settings: flags beat the environment, which beats defaults; bad values are one clear line."""

from __future__ import annotations

import pathlib

import pytest

from tlserve.service.config import Settings, split_address
from tlserve.service.errors import ConfigError


def test_defaults_put_everything_under_home(tmp_path):
    settings = Settings.load(["--home", str(tmp_path / "h")], environ={})
    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.database_path == tmp_path / "h" / "tlserve.db"
    assert settings.resolved_data_root == tmp_path / "h" / "data"
    for d in (settings.artifacts_dir, settings.weights_dir, settings.datasets_dir):
        assert d.is_dir() and d.parent == tmp_path / "h"


def test_parse_reads_flags_and_environment_without_writing_the_home(tmp_path):
    settings = Settings.parse(["--cpu-lanes", "3"], environ={"TLSERVE_HOME": str(tmp_path / "h")})
    assert (settings.cpu_lanes, settings.home) == (3, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def test_flag_beats_environment_which_beats_default(tmp_path):
    env = {"TLSERVE_HOME": str(tmp_path), "TLSERVE_GRPC_ADDRESS": "0.0.0.0:7000", "TLSERVE_JOB_WORKERS": "3"}
    settings = Settings.load(["--grpc-address", "127.0.0.1:0"], environ=env)
    assert settings.grpc_address == "127.0.0.1:0"
    assert settings.job_workers == 3
    assert settings.home == tmp_path


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--grpc-address", "no-port"], "--grpc-address: expected HOST:PORT"),
        (["--metrics-address", "host:65536"], "--metrics-address: expected HOST:PORT"),
        (["--job-workers", "0"], "--job-workers: must be a positive integer"),
        (["--max-receive-message-bytes", "lots"], "--max-receive-message-bytes: invalid literal"),
        (["--grace-seconds", "-1"], "--grace-seconds: must be >= 0"),
        (["--cpu-lanes", "-2"], "--cpu-lanes: must be"),
        (["--log-format", "xml"], "--log-format: must be one of json, text"),
    ],
)
def test_bad_flags_name_the_flag(tmp_path, argv, fragment):
    with pytest.raises(ConfigError) as e:
        Settings.load(["--home", str(tmp_path), *argv], environ={})
    assert fragment in str(e.value)


def test_bad_environment_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="TLSERVE_EXECUTOR_THREADS"):
        Settings.load(["--home", str(tmp_path)], environ={"TLSERVE_EXECUTOR_THREADS": "-2"})


def test_home_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="home directory .* is not usable"):
        Settings.load(["--home", str(blocker)], environ={})


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:50051", ("[::1]", 50051)), ("localhost:80", ("localhost", 80))],
)
def test_split_address(address, expected):
    assert split_address(address) == expected


def test_every_setting_has_a_flag_and_an_environment_variable():
    import argparse

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    help_text = parser.format_help()
    for name in Settings.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text
        assert "TLSERVE_" + name.upper() in help_text


def test_paths_expand_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings.load(["--home", "~/tl"], environ={})
    assert settings.home == pathlib.Path(tmp_path / "tl")


def test_readme_documents_every_setting():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in Settings.__dataclass_fields__:
        assert f"`--{name.replace('_', '-')}`" in readme and f"`TLSERVE_{name.upper()}`" in readme, name
