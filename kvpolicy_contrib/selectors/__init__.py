"""Baseline selectors from the IceCache paper's tables, plus Quest and H2O (one class per module).

Each is registered by the contrib plugin and has a preset of the same name with the paper's granularity:
page-level methods (Quest, ArkVale) use pages of 16 tokens; token-level methods (PQCache, MagicPIG, OmniKV,
SnapKV, H2O, StreamingLLM) use single-token pages. Every preset uses the positional ``exact`` index.
"""

from __future__ import annotations


def selector_classes() -> list[type]:
    """The contrib ``Selector`` classes."""
    from kvpolicy_contrib.selectors.arkvale_selector import ArkValeSelector
    from kvpolicy_contrib.selectors.h2o_selector import H2OSelector
    from kvpolicy_contrib.selectors.magicpig_selector import MagicPIGSelector
    from kvpolicy_contrib.selectors.omnikv_selector import OmniKVSelector
    from kvpolicy_contrib.selectors.pqcache_selector import PQCacheSelector
    from kvpolicy_contrib.selectors.quest_selector import QuestSelector
    from kvpolicy_contrib.selectors.snapkv_selector import SnapKVSelector
    from kvpolicy_contrib.selectors.streaming_llm_selector import StreamingLLMSelector

    return [
        QuestSelector, ArkValeSelector, PQCacheSelector, MagicPIGSelector, OmniKVSelector, SnapKVSelector,
        H2OSelector, StreamingLLMSelector,
    ]


def presets() -> dict[str, dict]:
    """Named policies for the baselines (``Policy.preset(name, budget=...)``)."""
    token = {"index": "exact", "page_size": 1}
    return {
        "quest": {"selector": "quest", "index": "exact", "page_size": 16, "dense_layers": [0, 1]},
        "arkvale": {"selector": "arkvale", "index": "exact", "page_size": 16},
        "pqcache": {"selector": "pqcache", **token},
        "magicpig": {"selector": "magicpig", **token},
        "omnikv": {"selector": "omnikv", **token},
        "snapkv": {"selector": "snapkv", **token},
        "h2o": {"selector": "h2o", **token},
        "streaming_llm": {"selector": "streaming_llm", **token, "sink_pages": 4},
    }
