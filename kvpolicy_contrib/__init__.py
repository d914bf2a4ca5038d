"""Baseline selectors (Quest, PQCache, MagicPIG, ArkVale, OmniKV, SnapKV, H2O) and index back-ends
(faiss, hnswlib) as kvpolicy plugins. Parts arrive with issue [3/5]."""
