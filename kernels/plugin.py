"""Entry point of the kernels plugin (group ``kvpolicy``). Registers nothing yet (GPU transfers and
attention kernels arrive with issue [5/5])."""

from __future__ import annotations
