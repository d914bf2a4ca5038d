"""Entry point of the IceCache plugin (group ``kvpolicy``). Registers nothing yet."""

from __future__ import annotations
