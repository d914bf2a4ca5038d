"""Entry point of the kernels plugin (group ``kvpolicy``). It registers one part, the ``uva`` transfer
(``kvpolicy_kernels.uva_transfer``, built on ``kvpolicy_kernels.page_load``). The other kernels are plain functions, imported
where they are used (each module imports triton), not parts looked up by name.

Kernels (each module: Triton kernel, launcher, torch reference):

* ``kvpolicy_kernels.paged_attention.paged_decode_attention_triton``: split-K sparse paged decode attention over
  [sink | selected pages | window]; the reference is ``kvpolicy.attention.paged_decode_attention``, and
  ``kvpolicy.attention.decode_attention`` picks between the two (``KVPOLICY_ATTENTION=torch|triton``).
* ``kvpolicy_kernels.page_copy.gather_pages`` / ``scatter_pages``: page gather / scatter between GPU pools.
* ``kvpolicy_kernels.page_scores.exact_page_scores`` / ``quest_page_scores`` (+ ``topk_pages``): fused page scoring
  for exact and Quest-style selection.
* ``kvpolicy_kernels.page_load.load_pages``: selected pages from a pinned host (or device) pool into device slots.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl


@hookimpl
def kvpolicy_register_transfers():
    from kvpolicy_kernels.uva_transfer import UVATransfer

    return [UVATransfer]
