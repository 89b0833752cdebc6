"""The stores: metadata (SQLite) and artifacts (files under TLSERVE_HOME)."""

from service.store.artifacts import ArtifactInfo, ArtifactStore
from service.store.metadata import MIGRATIONS, MetadataStore

__all__ = ["ArtifactInfo", "ArtifactStore", "MIGRATIONS", "MetadataStore"]
