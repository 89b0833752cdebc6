"""The metadata store (schema versions, migrations, transactions) and the artifact store (atomic publish)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from tlserve.service.errors import FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.store import MIGRATIONS, ArtifactStore, MetadataStore
from tlserve.service.store.artifacts import TEMP_PREFIX


def test_new_database_is_migrated_to_the_latest_version_in_wal_mode(tmp_path):
    store = MetadataStore(tmp_path / "db")
    assert store.schema_version == len(MIGRATIONS)
    assert store.journal_mode == "wal"
    tables = {r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"datasets", "jobs", "job_events", "models", "artifacts", "schema_migrations"} <= tables
    assert [r["version"] for r in store.query("SELECT version FROM schema_migrations")] == list(
        range(1, len(MIGRATIONS) + 1)
    )


def test_reopening_keeps_data_and_applies_nothing_twice(tmp_path):
    store = MetadataStore(tmp_path / "db")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO datasets (id, name, create_time, path, proto) VALUES ('ds-1', 'cats', 0, 'p', x'')"
        )
    store.close()
    again = MetadataStore(tmp_path / "db")
    assert [r["name"] for r in again.query("SELECT name FROM datasets")] == ["cats"]
    assert len(again.query("SELECT * FROM schema_migrations")) == len(MIGRATIONS)


def test_database_from_a_newer_tlserve_is_refused_untouched(tmp_path):
    path = tmp_path / "db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(FailedPrecondition, match="newer than this tlserve knows"):
        MetadataStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_failed_transaction_leaves_nothing(tmp_path):
    store = MetadataStore(tmp_path / "db")
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute("INSERT INTO datasets (id, name, create_time, path, proto) VALUES ('a', 'a', 0, 'p', x'')")
        raise RuntimeError("boom")
    assert store.query("SELECT * FROM datasets") == []


def test_deleting_a_model_removes_its_artifacts(tmp_path):
    store = MetadataStore(tmp_path / "db")
    with store.transaction() as conn:
        conn.execute("INSERT INTO models (name, version, create_time, proto) VALUES ('m', 1, 0, x'')")
        conn.execute(
            "INSERT INTO artifacts VALUES ('m', 1, 'onnx-fp32', 'models/m/1/model.onnx', 10, 'ab', 0, x'')"
        )
    with store.transaction() as conn:
        conn.execute("DELETE FROM models WHERE name = 'm'")
    assert store.query("SELECT * FROM artifacts") == []


def test_publish_bytes_records_size_and_sha256(tmp_path):
    store = ArtifactStore(tmp_path)
    info = store.publish_bytes(b"hello", "models/m/1/model.onnx")
    assert info.path.read_bytes() == b"hello"
    assert (info.size_bytes, info.sha256) == (5, hashlib.sha256(b"hello").hexdigest())
    assert store.info("models/m/1/model.onnx") == info


def test_a_writer_that_fails_leaves_neither_file_nor_temp(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError), store.writer("m/model.onnx") as f:
        f.write(b"half a file")
        raise ValueError("exporter crashed")
    assert list((tmp_path / "m").iterdir()) == []


def test_readers_see_the_old_file_until_the_new_one_is_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    store.publish_bytes(b"old", "a.bin")
    with store.writer("a.bin") as f:
        f.write(b"new-")
        assert store.path("a.bin").read_bytes() == b"old"
        f.write(b"content")
    assert store.path("a.bin").read_bytes() == b"new-content"


def test_publish_file_copies_into_the_store(tmp_path):
    source = tmp_path / "exported.onnx"
    source.write_bytes(b"x" * 3_000_000)
    info = ArtifactStore(tmp_path / "store").publish_file(source, "m/1/model.onnx")
    assert info.size_bytes == 3_000_000 and info.path.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_paths_outside_the_store_are_refused(tmp_path, bad):
    with pytest.raises(InvalidArgument):
        ArtifactStore(tmp_path).path(bad)


def test_missing_artifact_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        ArtifactStore(tmp_path).info("nope")


def test_stale_temps_from_a_crash_are_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    store.publish_bytes(b"keep", "m/keep.onnx")
    (tmp_path / "m" / f"{TEMP_PREFIX}abc-model.onnx").write_bytes(b"partial")
    assert store.remove_stale_temps() == 1
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["keep.onnx"]


def test_delete_removes_a_directory_of_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    store.publish_bytes(b"1", "m/1/a")
    store.publish_bytes(b"2", "m/1/b")
    store.delete("m/1")
    assert not (tmp_path / "m" / "1").exists()
    store.delete("m/1")  # absent is fine
