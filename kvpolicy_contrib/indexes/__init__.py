"""Index back-ends over faiss and hnswlib (one class per module, named after its registry name)."""

from __future__ import annotations


def index_classes() -> list[type]:
    """The contrib ``Index`` classes (imported lazily; faiss/hnswlib load only when an index is built)."""
    return []
