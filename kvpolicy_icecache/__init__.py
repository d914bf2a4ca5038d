"""IceCache reference plugin (Mao, Wang, Ester, Li, 2026): DCI-tree semantic pages, head-specific
retrieval, incremental insertion, bulk loading and layer reuse. Parts arrive with issue [2/5]."""
