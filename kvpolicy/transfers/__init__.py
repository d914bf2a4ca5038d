"""Transfers: move pages between pools (``Transfer`` in ``kvpolicy.interfaces``), registered by the core plugin.

* ``sync`` (``sync_transfer``): the reference, a blocking gather, copy and scatter on the current stream;
* ``bulk_load`` (``bulk_load_transfer``): IceCache's page loading, one host-to-device copy on a side stream;
* ``uva`` (``uva_transfer``): the GPU reads the pages out of the pinned CPU pool itself (the Triton kernel
  ``kvpolicy_kernels.page_load``), with no host synchronisation.
"""
