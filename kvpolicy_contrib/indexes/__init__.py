"""Index back-ends over faiss and hnswlib (one class per module, named after its registry name).

``faiss_flat``, ``faiss_pq``, ``faiss_hnsw`` and ``hnswlib`` keep positional pages; ``faiss_ivf`` and
``faiss_ivfpq`` make semantic pages out of k-means lists. See ``docs/indexes.md``. The modules import faiss and
hnswlib only when an index is constructed (``pip install 'kvpolicy[faiss]'`` / ``'kvpolicy[hnsw]'``).
"""

from __future__ import annotations


def index_classes() -> list[type]:
    """The contrib ``Index`` classes (imported lazily; faiss/hnswlib load only when an index is constructed)."""
    from kvpolicy_contrib.indexes.faiss_flat_index import FaissFlatIndex
    from kvpolicy_contrib.indexes.faiss_hnsw_index import FaissHNSWIndex
    from kvpolicy_contrib.indexes.faiss_ivf_index import FaissIVFIndex
    from kvpolicy_contrib.indexes.faiss_ivfpq_index import FaissIVFPQIndex
    from kvpolicy_contrib.indexes.faiss_pq_index import FaissPQIndex
    from kvpolicy_contrib.indexes.hnswlib_index import HnswlibIndex

    return [FaissFlatIndex, FaissIVFIndex, FaissPQIndex, FaissIVFPQIndex, FaissHNSWIndex, HnswlibIndex]
