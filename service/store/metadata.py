"""The metadata store: datasets, jobs, job events, models and artifacts in SQLite.

One database file under TLSERVE_HOME in WAL mode, so readers (the gRPC server)
never block on the writer (a job worker in another process reporting progress).
The schema is versioned with SQLite's `user_version`: `MIGRATIONS[i]` takes a
database from version i to i+1, each in its own transaction, and a database
written by a newer tlserve is refused rather than misread. Append migrations;
never edit one that has shipped.

Rows keep the fields that are queried as columns and the full record as a
serialised protobuf message (`proto`), so the API types and the stored types
cannot drift apart.
"""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator

from tlserve.service.errors import FailedPrecondition

MIGRATIONS: tuple[str, ...] = (
    # 0 → 1: the v1 API's resources.
    """
    CREATE TABLE schema_migrations (
        version     INTEGER PRIMARY KEY,
        applied_at  REAL NOT NULL          -- unix seconds
    );
    CREATE TABLE datasets (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        create_time REAL NOT NULL,
        path        TEXT NOT NULL,         -- relative to TLSERVE_HOME, or under the data root
        proto       BLOB NOT NULL          -- tlserve.v1.Dataset
    );
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        state           INTEGER NOT NULL,  -- tlserve.v1.JobState
        create_time     REAL NOT NULL,
        update_time     REAL NOT NULL,
        idempotency_key TEXT UNIQUE,
        dataset_id      TEXT NOT NULL,
        model_name      TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        worker_pid      INTEGER,
        proto           BLOB NOT NULL      -- tlserve.v1.Job
    );
    CREATE INDEX jobs_by_state ON jobs (state, create_time);
    CREATE INDEX jobs_by_dataset ON jobs (dataset_id);
    CREATE TABLE job_events (
        job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sequence    INTEGER NOT NULL,
        time        REAL NOT NULL,
        proto       BLOB NOT NULL,         -- tlserve.v1.JobEvent
        PRIMARY KEY (job_id, sequence)
    );
    CREATE TABLE models (
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        create_time REAL NOT NULL,
        job_id      TEXT,
        proto       BLOB NOT NULL,         -- tlserve.v1.Model, without artifacts
        PRIMARY KEY (name, version)
    );
    CREATE TABLE artifacts (
        model_name    TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        variant       TEXT NOT NULL,       -- e.g. "onnx-fp32-float_nchw", "pytorch"
        path          TEXT NOT NULL,       -- relative to the artifact root
        size_bytes    INTEGER NOT NULL,
        sha256        TEXT NOT NULL,
        create_time   REAL NOT NULL,
        proto         BLOB NOT NULL,       -- tlserve.v1.ModelArtifact
        PRIMARY KEY (model_name, model_version, variant),
        FOREIGN KEY (model_name, model_version) REFERENCES models (name, version) ON DELETE CASCADE
    );
    """,
    # 1 → 2: ProfileModel's measurements, the latest per model variant.
    """
    CREATE TABLE profiles (
        model_name    TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        variant       TEXT NOT NULL,       -- the artifact variant measured, e.g. "onnx-int8-float_nchw"
        time          REAL NOT NULL,       -- unix seconds
        proto         BLOB NOT NULL,       -- tlserve.v1.VariantProfile
        PRIMARY KEY (model_name, model_version, variant),
        FOREIGN KEY (model_name, model_version) REFERENCES models (name, version) ON DELETE CASCADE
    );
    """,
)


class MetadataStore:
    """A connection to the metadata database, safe to share between threads."""

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = pathlib.Path(path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below),
        # so a migration or a multi-row update is all or nothing.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable in WAL mode across application crashes; only a power
        # loss can drop the last transactions.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @property
    def journal_mode(self) -> str:
        return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    def migrate(self) -> None:
        """Applies pending migrations; refuses a database from a newer tlserve."""
        with self._lock:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise FailedPrecondition(
                    f"database {self.path} has schema version {current}, newer than this tlserve knows "
                    f"({len(MIGRATIONS)}); upgrade tlserve or point TLSERVE_HOME elsewhere"
                )
            for version in range(current, len(MIGRATIONS)):
                with self.transaction() as conn:
                    for statement in _statements(MIGRATIONS[version]):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version + 1, time.time())
                    )
                    # PRAGMA takes no parameters; the value is an int we computed.
                    conn.execute(f"PRAGMA user_version = {version + 1:d}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _statements(script: str) -> list[str]:
    """Splits a migration into statements, so they run inside our transaction
    (sqlite3's executescript() would commit first)."""
    statements, current = [], ""
    for line in script.splitlines():
        current += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in migration: {current.strip()[:80]}")
    return statements
