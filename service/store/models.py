"""Model versions and their artifacts in the metadata store.

A model is named by its user and versioned here: `publish_next_version`
allocates the next version of a name in the same transaction that inserts it
and moves its file into that version's folder, so two jobs finishing at once
never get the same version, nor write each other's file. Artifacts (the PyTorch state
dict a job publishes; ONNX exports later) are rows keyed by variant, with the
file in the artifact store; `Model.artifacts` is filled from those rows.
"""

from __future__ import annotations

import os
import time
import uuid

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import InvalidArgument, NotFound
from tlserve.service.store import paging
from tlserve.service.store.artifacts import TEMP_PREFIX, ArtifactStore
from tlserve.service.store.metadata import MetadataStore
from tlserve.service.variant import Variant

# The highest version of a name (NULL for a new name): the next one is one more.
_MAX_VERSION = "SELECT max(version) AS v FROM models WHERE name = ?"


def model_dir(name: str, version: int) -> str:
    """Artifact-store directory of one model version."""
    return f"models/{name}/{version}"


class ModelStore:
    def __init__(self, store: MetadataStore, artifacts: ArtifactStore) -> None:
        self._store = store
        self._artifacts = artifacts

    def next_version(self, name: str) -> int:
        return (self._store.query(_MAX_VERSION, (name,))[0]["v"] or 0) + 1

    def publish_next_version(self, model: pb.Model, artifact: pb.ModelArtifact, data: bytes,
                             variant: Variant) -> pb.Model:
        """Publishes `model` (its version unset) as the next version of its name, with
        one artifact: `data`, stored as `variant`'s file.

        The file is written first under a temporary name beside the name's versions
        (a crash leaves it to `remove_stale_temps`); the version is then taken, the
        rows inserted and the file moved into the version's folder in one write
        transaction, which other publishers wait for."""
        name = model.name
        staged = f"models/{name}/{TEMP_PREFIX}{uuid.uuid4().hex}-{variant.file_name}"
        info = self._artifacts.publish_bytes(data, staged)
        try:
            with self._store.transaction() as conn:
                version = (conn.execute(_MAX_VERSION, (name,)).fetchone()["v"] or 0) + 1
                ref = pb.ModelRef(name=name, version=version)
                versioned = pb.Model()
                versioned.CopyFrom(model)
                versioned.version = version
                described = pb.ModelArtifact()
                described.CopyFrom(artifact)
                described.model.CopyFrom(ref)
                described.size_bytes, described.sha256 = info.size_bytes, info.sha256
                path = f"{model_dir(name, version)}/{variant.file_name}"
                self._insert(conn, versioned, [(described, path)])
                final = self._artifacts.path(path)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._artifacts.path(staged), final)  # last: a failed insert leaves no file behind
        except BaseException:
            self._artifacts.delete(staged)
            raise
        return self.get(name, version)

    def publish(self, model: pb.Model, artifacts: list[tuple[pb.ModelArtifact, str]]) -> pb.Model:
        """Inserts `model` as version `model.version` with its (artifact, relative path) rows.

        The files must already be published in the artifact store. Fails with
        InvalidArgument if that version exists (callers take `next_version`)."""
        with self._store.transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM models WHERE name = ? AND version = ?", (model.name, model.version)
            ).fetchone():
                raise InvalidArgument(f"model {model.name} version {model.version} exists already")
            self._insert(conn, model, artifacts)
        return self.get(model.name, model.version)

    def _insert(self, conn, model: pb.Model, artifacts: list[tuple[pb.ModelArtifact, str]]) -> None:
        """The model's row (its artifacts are rows of their own) and its artifacts' rows."""
        stored = pb.Model()
        stored.CopyFrom(model)
        del stored.artifacts[:]
        conn.execute(
            "INSERT INTO models (name, version, create_time, job_id, proto) VALUES (?, ?, ?, ?, ?)",
            (model.name, model.version, time.time(), model.job_id or None, stored.SerializeToString()),
        )
        for artifact, path in artifacts:
            self._insert_artifact(conn, artifact, path)

    def add_artifact(self, artifact: pb.ModelArtifact, path: str) -> None:
        """Adds or replaces one artifact of an existing model version."""
        with self._store.transaction() as conn:
            self._insert_artifact(conn, artifact, path, replace=True)

    def _insert_artifact(self, conn, artifact: pb.ModelArtifact, path: str, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        conn.execute(
            f"{verb} INTO artifacts (model_name, model_version, variant, path, size_bytes, sha256, create_time, proto)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                artifact.model.name, artifact.model.version, Variant.of_artifact(artifact).key, path,
                artifact.size_bytes, artifact.sha256, time.time(), artifact.SerializeToString(),
            ),
        )

    def resolve(self, ref: pb.ModelRef) -> tuple[str, int]:
        """(name, version) with version 0 read as the latest; NotFound if absent."""
        if not ref.name:
            raise InvalidArgument("model.name is required")
        if ref.version < 0:
            raise InvalidArgument(f"model.version must be >= 0 (0 = latest), got {ref.version}")
        if ref.version:
            rows = self._store.query("SELECT version FROM models WHERE name = ? AND version = ?", (ref.name, ref.version))
        else:
            rows = self._store.query("SELECT max(version) AS version FROM models WHERE name = ?", (ref.name,))
        if not rows or rows[0]["version"] is None:
            what = f"model {ref.name!r}" + (f" version {ref.version}" if ref.version else "")
            raise NotFound(f"{what} does not exist (list models with ListModels)")
        return ref.name, rows[0]["version"]

    def get(self, name: str, version: int = 0) -> pb.Model:
        name, version = self.resolve(pb.ModelRef(name=name, version=version))
        row = self._store.query("SELECT proto FROM models WHERE name = ? AND version = ?", (name, version))[0]
        model = pb.Model.FromString(row["proto"])
        model.artifacts.extend(a for a, _ in self.artifacts(name, version))
        # One row per (runtime, precision), the latest: a variant profiled through its uint8
        # graph before a float graph existed is not shown twice (VariantProfile has no layout).
        latest: dict[tuple[int, int], tuple[Variant, pb.VariantProfile]] = {}
        for variant, profile in self.profiles(name, version):
            key = (profile.variant.runtime, profile.variant.precision)
            if key not in latest or profile.time.ToNanoseconds() > latest[key][1].time.ToNanoseconds():
                latest[key] = (variant, profile)
        profiles = sorted(latest.values(), key=lambda item: item[0].sort_key())
        if profiles:
            model.profile.model.name, model.profile.model.version = name, version
            model.profile.variants.extend(p for _, p in profiles)
            model.profile.time.CopyFrom(max((p.time for _, p in profiles), key=lambda t: (t.seconds, t.nanos)))
        return model

    def put_profile(self, name: str, version: int, variant: Variant, profile: pb.VariantProfile) -> None:
        """Stores the latest measurement of one artifact variant, replacing an earlier one.

        A model version deleted meanwhile is not an error: the measurement is dropped."""
        with self._store.transaction() as conn:
            if conn.execute("SELECT 1 FROM models WHERE name = ? AND version = ?", (name, version)).fetchone():
                conn.execute(
                    "INSERT OR REPLACE INTO profiles (model_name, model_version, variant, time, proto)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, version, variant.key, time.time(), profile.SerializeToString()),
                )

    def profiles(self, name: str, version: int) -> list[tuple[Variant, pb.VariantProfile]]:
        """(artifact variant, latest measurement) of one model version, by variant."""
        rows = self._store.query(
            "SELECT variant, proto FROM profiles WHERE model_name = ? AND model_version = ? ORDER BY variant",
            (name, version),
        )
        return sorted(((Variant.parse(r["variant"]), pb.VariantProfile.FromString(r["proto"])) for r in rows),
                      key=lambda item: item[0].sort_key())

    def all_profiles(self) -> list[tuple[str, int, Variant, pb.VariantProfile]]:
        """(name, version, artifact variant, measurement) of every stored profile."""
        rows = self._store.query(
            "SELECT model_name, model_version, variant, proto FROM profiles ORDER BY model_name, model_version, variant"
        )
        return [
            (r["model_name"], r["model_version"], Variant.parse(r["variant"]), pb.VariantProfile.FromString(r["proto"]))
            for r in rows
        ]

    def summaries(self) -> list[tuple[pb.Model, list[tuple[Variant, pb.ModelArtifact]]]]:
        """Every model version with its artifacts by variant, in one read: what the
        metrics collector exports at each scrape."""
        models = {
            (r["name"], r["version"]): (pb.Model.FromString(r["proto"]), [])
            for r in self._store.query("SELECT name, version, proto FROM models ORDER BY name, version")
        }
        for r in self._store.query("SELECT model_name, model_version, variant, proto FROM artifacts ORDER BY variant"):
            entry = models.get((r["model_name"], r["model_version"]))
            if entry is not None:
                entry[1].append((Variant.parse(r["variant"]), pb.ModelArtifact.FromString(r["proto"])))
        return list(models.values())

    def artifacts(self, name: str, version: int) -> list[tuple[pb.ModelArtifact, str]]:
        rows = self._store.query(
            "SELECT proto, path FROM artifacts WHERE model_name = ? AND model_version = ? ORDER BY variant",
            (name, version),
        )
        return [(pb.ModelArtifact.FromString(r["proto"]), r["path"]) for r in rows]

    def artifact_path(self, name: str, version: int, variant: Variant) -> str:
        rows = self._store.query(
            "SELECT path FROM artifacts WHERE model_name = ? AND model_version = ? AND variant = ?",
            (name, version, variant.key),
        )
        if not rows:
            raise NotFound(f"model {name} version {version} has no {variant} artifact")
        return rows[0]["path"]

    def list(self, name: str, latest_only: bool, page_size: int, page_token: str) -> tuple[list[pb.Model], str]:
        where, params = ("WHERE name = ?", (name,)) if name else ("", ())
        rows = self._store.query(f"SELECT name, version FROM models {where} ORDER BY name, version DESC", params)
        if latest_only:
            seen: set[str] = set()
            rows = [r for r in rows if not (r["name"] in seen or seen.add(r["name"]))]
        loaded: dict[tuple[str, int], pb.Model] = {}

        def model(row) -> pb.Model:
            key = (row["name"], row["version"])
            if key not in loaded:
                loaded[key] = self.get(*key)
            return loaded[key]

        chunk, token = paging.page("models", rows, page_size, page_token, size_of=lambda r: model(r).ByteSize())
        return [model(r) for r in chunk], token

    def delete(self, ref: pb.ModelRef, all_versions: bool) -> list[pb.ModelRef]:
        """Deletes one version, or every version with `all_versions`; files go with the rows."""
        if ref.version == 0 and not all_versions:
            raise InvalidArgument(
                "model.version is 0: name a version to delete, or set all_versions to delete every version"
            )
        name, _ = self.resolve(ref)
        if ref.version:
            versions = [ref.version]
        else:
            versions = [r["version"] for r in self._store.query("SELECT version FROM models WHERE name = ?", (name,))]
        with self._store.transaction() as conn:
            for version in versions:
                conn.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
        # Rows first: a crash between the two leaves unreferenced files, never a row without its file.
        for version in versions:
            self._artifacts.delete(model_dir(name, version))
        return [pb.ModelRef(name=name, version=v) for v in versions]
