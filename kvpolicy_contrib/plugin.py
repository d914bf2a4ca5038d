"""Entry point of the contrib plugin (group ``kvpolicy``). Registers nothing yet."""

from __future__ import annotations
