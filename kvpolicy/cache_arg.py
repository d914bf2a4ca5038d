"""The keyword under which the installed transformers takes a cache object.

transformers 5.24 renamed the cache argument of ``generate`` and of every model's ``forward`` from
``past_key_values`` to ``cache``. The old name still works there, with a FutureWarning, until it is removed (5.40
for ``forward``, 6.0 for ``generate``); 5.17 to 5.23 know only the old name. kvpolicy passes its cache through
``cache_kwargs``::

    model.generate(ids, **cache_kwargs(cache), max_new_tokens=32)
    model(ids, **cache_kwargs(dense), use_cache=True)

The keyword is found once per process, from the signature of ``GenerationMixin.prepare_inputs_for_generation``,
which took the new name in the same release as ``generate`` and the models.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["cache_keyword", "cache_kwargs"]


@functools.cache
def cache_keyword() -> str:
    """``"cache"`` where the installed transformers takes it, else ``"past_key_values"``."""
    import transformers
    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ImportError(
        f"transformers {transformers.__version__} takes neither 'cache' nor 'past_key_values' in "
        "GenerationMixin.prepare_inputs_for_generation; kvpolicy supports transformers >= 5.17"
    )


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{cache_keyword(): cache}``, to unpack into ``model(...)`` or ``model.generate(...)``."""
    return {cache_keyword(): cache}
