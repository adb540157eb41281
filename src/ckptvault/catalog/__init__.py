"""L2: the catalog of checkpoints under a root (SQLite, derived from manifests) and the registry."""

from .store import Catalog, CatalogError, CatalogRow

__all__ = ["Catalog", "CatalogError", "CatalogRow"]
