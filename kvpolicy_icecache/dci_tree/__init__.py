"""The parts of ``dci_tree`` (:class:`kvpolicy_icecache.dci_tree_index.DCITreeIndex`, the facade): tree build
(``build``), insertion (``insert``), search with its CUDA-graph replay (``search``), the promotion rule
(``promotion``) and row-wise tensor helpers (``tensors``). ``build``, ``insert`` and ``search`` each hold one
mixin of ``DCITreeIndex``; they read and write the tables that ``DCITreeIndex.reset`` declares."""
