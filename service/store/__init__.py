"""The stores: metadata (SQLite) and artifacts (files under TLSERVE_HOME)."""

from tlserve.service.store.artifacts import ArtifactInfo, ArtifactStore
from tlserve.service.store.metadata import MIGRATIONS, MetadataStore

__all__ = ["ArtifactInfo", "ArtifactStore", "MIGRATIONS", "MetadataStore"]
