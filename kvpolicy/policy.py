"""``Policy``: the four parts plus page size (fixed, or chosen from the budget), token budget, sink/window pages
(fixed, or in tokens by budget), dense layers and how the CPU page pool stores K/V (``cpu_pool_dtype``: ``"auto"``, the model's dtype, or ``"fp8"``; see ``kvpolicy.pool_dtype``).

A policy is a frozen description; ``make_parts()`` builds fresh part instances for one layer. It is built
from keyword arguments, from a dict/YAML file, or from a named preset registered by a plugin::

    Policy.from_config({"preset": "oracle", "budget": 256})
    Policy.from_config({"index": {"name": "exact"}, "selector": "index_topk", "budget": 128})
    Policy.preset("streaming", budget=64)

Everything is validated when the policy is made, before any model state exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpolicy.errors import UnknownNameError, suggest
from kvpolicy.interfaces import Index, PageAllocator, Part, Selector, Transfer
from kvpolicy.pool_dtype import check_pool_dtype
from kvpolicy.registry import Registry, get_registry
from kvpolicy.types import Budget, SearchParams

__all__ = ["PartSpec", "Parts", "Policy", "split_placement"]


@dataclass(frozen=True)
class PartSpec:
    """A registered part name and its keyword hyperparameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Any, what: str) -> PartSpec:
        if isinstance(value, PartSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            if "name" not in value:
                raise ValueError(f"{what} config needs a 'name' key, got {dict(value)!r}")
            params = {k: v for k, v in value.items() if k != "name"}
            return cls(str(value["name"]), params)
        raise TypeError(f"{what} must be a name, a dict with 'name', or a PartSpec; got {type(value).__name__}")

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.params)}


@dataclass(frozen=True)
class Parts:
    """Fresh part instances for one layer."""

    index: Index
    selector: Selector
    allocator: PageAllocator
    transfer: Transfer


_FIELDS = (
    "selector", "index", "allocator", "transfer", "page_size", "budget", "sink_pages", "window_pages",
    "split_tokens", "dense_layers", "search_params", "name", "cpu_pool_dtype",
)

PAGE_SIZE_RULES = ("auto",)  # page sizes chosen from the budget (Policy.resolved_page_size)


def auto_page_size(budget: int | None) -> int:
    """``page_size="auto"``: 4 tokens at a budget of at most 64, 8 at most 128, else (and unlimited) 16. At 64
    tokens the default split (16 + 16 tokens of sink and window) then leaves 8 retrieved pages of 4 instead of 2
    of 16, at 128 (32 + 32) 8 pages of 8 instead of 4 of 16."""
    if budget is not None and budget <= 64:
        return 4
    if budget is not None and budget <= 128:
        return 8
    return 16


def _split_table(value: Any) -> dict[int, tuple[int, int]] | None:
    """Validate ``split_tokens``: ``{max budget: (sink tokens, window tokens)}`` (keys may be strings of ints, as
    JSON writes them) -> a dict sorted by budget."""
    if value is None:
        return None
    what = "split_tokens must map a budget in tokens to [sink tokens, window tokens], e.g. {64: [8, 8]}"
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{what}; got {value!r}")
    out = {}
    for key, pair in value.items():
        try:
            bound = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{what}; key {key!r} is not a budget") from None
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"{what}; got {key!r}: {pair!r}")
        if bound < 1 or pair[0] < 0 or pair[1] < 1:
            raise ValueError(f"{what}, with budget >= 1, sink >= 0 and window >= 1 (the current token); got "
                             f"{key!r}: {list(pair)!r}")
        out[bound] = (pair[0], pair[1])
    return dict(sorted(out.items()))


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A KV selection policy. ``budget`` is in tokens (sink + window + retrieved pages, times the page size);
    ``None`` means unlimited (every page is attended). ``page_size``: tokens per page, or ``"auto"`` to choose
    it from the budget (``auto_page_size``; ``resolved_page_size`` is the one in use). ``split_tokens``: sink and
    window sizes in tokens by budget (``split()``). ``cpu_pool_dtype``: ``"auto"`` keeps the offloaded pages in
    the model's dtype; ``"fp8"`` stores them as float8_e4m3fn with one scale per (page, head), half the CPU bytes
    and half the bytes per page moved, dequantised on the way to the GPU (``kvpolicy.pool_dtype``)."""

    selector: PartSpec
    index: PartSpec = PartSpec("exact")  # pages the offloaded tokens; positional for non-index selectors
    allocator: PartSpec = PartSpec("lru")
    transfer: PartSpec = PartSpec("sync")
    page_size: int | str = 16  # or "auto": chosen from the budget (auto_page_size)
    budget: int | None = None
    sink_pages: int | None = None  # None: 32 tokens' worth (16 below a 128-token budget), see split()
    window_pages: int | None = None  # None: 32 tokens' worth (16 below a 128-token budget), see split()
    split_tokens: Mapping[int, tuple[int, int]] | None = None  # {max budget: (sink, window) tokens}, see split()
    dense_layers: tuple[int, ...] = ()
    search_params: SearchParams | None = None
    name: str | None = None
    cpu_pool_dtype: str = "auto"
    registry: Registry | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "selector", PartSpec.coerce(self.selector, "selector"))
        set_(self, "index", PartSpec.coerce(self.index if self.index is not None else "exact", "index"))
        set_(self, "allocator", PartSpec.coerce(self.allocator, "allocator"))
        set_(self, "transfer", PartSpec.coerce(self.transfer, "transfer"))
        set_(self, "dense_layers", tuple(sorted({int(x) for x in self.dense_layers})))
        if isinstance(self.search_params, Mapping):
            set_(self, "search_params", SearchParams(**self.search_params))
        if isinstance(self.page_size, str):
            if self.page_size not in PAGE_SIZE_RULES:
                raise ValueError(f"page_size must be an int >= 1 or one of {', '.join(map(repr, PAGE_SIZE_RULES))}, "
                                 f"got {self.page_size!r}")
        elif not isinstance(self.page_size, int) or isinstance(self.page_size, bool):
            raise TypeError(f"page_size must be an int or 'auto', got {type(self.page_size).__name__}")
        elif self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        for f in ("sink_pages", "window_pages"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"{f} must be an int, got {type(v).__name__}")
        set_(self, "split_tokens", _split_table(self.split_tokens))
        if self.sink_pages is not None and self.sink_pages < 0:
            raise ValueError(f"sink_pages must be >= 0, got {self.sink_pages}")
        if self.window_pages is not None and self.window_pages < 1:
            raise ValueError(f"window_pages must be >= 1 (the current token's page), got {self.window_pages}")
        check_pool_dtype(self.cpu_pool_dtype)
        if any(x < 0 for x in self.dense_layers):
            raise ValueError(f"dense_layers must be layer indices >= 0, got {self.dense_layers}")
        if self.budget is not None:
            if not isinstance(self.budget, int) or isinstance(self.budget, bool):
                raise TypeError(f"budget must be an int number of tokens or None, got {type(self.budget).__name__}")
            sink, window = self.split()
            S = self.resolved_page_size
            fixed = (sink + window) * S
            if self.budget % S:
                raise ValueError(
                    f"page size {S} does not divide the budget of {self.budget} tokens; use a multiple of {S}"
                )
            if self.budget < fixed:
                raise ValueError(
                    f"budget of {self.budget} tokens is smaller than sink + window = ({sink} + "
                    f"{window}) pages x {S} = {fixed} tokens"
                )
        self.make_parts()  # validates every part's hyperparameters now, not at the first prefill

    # ------------------------------------------------------------ building
    @property
    def _registry(self) -> Registry:
        return self.registry or get_registry()

    def _cls(self, kind: str, spec: PartSpec) -> type[Part]:
        return self._registry.get(kind, spec.name)

    def _make(self, kind: str, spec: PartSpec) -> Part:
        cls = self._cls(kind, spec)
        try:
            return cls(**dict(spec.params))
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
            raise ValueError(
                f"bad hyperparameters for {kind} {spec.name!r}: {e}. Known: {', '.join(fields) or 'none'}"
            ) from e

    def make_parts(self) -> Parts:
        """New part instances (call once per layer)."""
        return Parts(
            index=self._make("index", self.index),
            selector=self._make("selector", self.selector),
            allocator=self._make("allocator", self.allocator),
            transfer=self._make("transfer", self.transfer),
        )

    @property
    def selector_cls(self) -> type[Selector]:
        return self._cls("selector", self.selector)

    @property
    def resolved_page_size(self) -> int:
        """Tokens per page at this policy's budget: ``page_size``, or ``auto_page_size(budget)`` for ``"auto"``."""
        return auto_page_size(self.budget) if self.page_size == "auto" else self.page_size

    def split_in_tokens(self) -> tuple[int, int]:
        """(sink tokens, window tokens) before rounding to pages. Default, after the IceCache paper: 32 + 32 (2 + 2
        pages of 16 at 256 tokens); a budget below 128 tokens would leave too little to retrieve, so 16 + 16 there
        (64 tokens = 1 sink + 1 window + 2 retrieved pages of 16). ``split_tokens`` overrides this for the budgets
        it covers: the entry with the smallest key >= budget applies (``{64: (8, 8)}``: 8 + 8 tokens at budgets up
        to 64, the default above; an unlimited budget always takes the default)."""
        if self.split_tokens and self.budget is not None:
            for bound, pair in self.split_tokens.items():
                if self.budget <= bound:
                    return pair
        small = self.budget is not None and self.budget < 128
        return (16, 16) if small else (32, 32)

    def split(self) -> tuple[int, int]:
        """(sink pages, window pages): ``split_in_tokens()`` rounded up to whole pages, so every page size keeps
        the same token counts (page size 1: 32 + 32 single-token pages; 4: 8 + 8 pages at 256 tokens). A window
        has at least one page (the current token's). Explicit ``sink_pages``/``window_pages`` always win."""
        S = self.resolved_page_size
        sink_t, window_t = self.split_in_tokens()
        sink = self.sink_pages if self.sink_pages is not None else -(-sink_t // S)
        window = self.window_pages if self.window_pages is not None else max(1, -(-window_t // S))
        return sink, window

    def resolve_budget(self) -> Budget:
        """The budget in pages (unlimited for ``budget=None`` or a selector that reads every page)."""
        sink, window = self.split()
        S = self.resolved_page_size
        if self.budget is None or not self.selector_cls.uses_budget:
            retrieved = None
        else:
            retrieved = self.budget // S - sink - window
        return Budget(S, sink, window, retrieved)

    def with_budget(self, budget: int | None) -> Policy:
        return dataclasses.replace(self, budget=budget)

    def placed(self, index_device: str | None = None, transfer: str | None = None) -> Policy:
        """The same policy with its index searching on ``index_device`` and/or moving pages with the ``transfer``
        plug-in (``None`` keeps the current one). Placement changes where work runs, never what is selected."""
        pol = self
        if transfer:
            pol = dataclasses.replace(pol, transfer=PartSpec(transfer))
        if index_device:
            torch_device(index_device)  # raises on an unknown device string
            pol = dataclasses.replace(pol, index={**pol.index.to_config(), "device": index_device})
        return pol

    @classmethod
    def resolve_placed(cls, spec: str, **overrides: Any) -> Policy:
        """A preset with a placement suffix, ``NAME[@INDEX_DEVICE][:TRANSFER]`` (``icecache@cuda:uva``: the index
        searches on the GPU, pages move through the ``uva`` transfer); see ``split_placement``."""
        name, index_device, transfer = split_placement(spec)
        return cls.resolve(name, **overrides).placed(index_device, transfer)

    def label(self) -> str:
        return self.name or self.selector.name

    # ------------------------------------------------------------ config round trip
    def to_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "selector": self.selector.to_config(),
            "index": self.index.to_config(),
            "allocator": self.allocator.to_config(),
            "transfer": self.transfer.to_config(),
            "page_size": self.page_size,
            "budget": self.budget,
            "sink_pages": self.sink_pages,
            "window_pages": self.window_pages,
            "dense_layers": list(self.dense_layers),
        }
        if self.split_tokens is not None:  # only when set: configs (and result rows) of earlier runs are unchanged
            cfg["split_tokens"] = {b: list(pair) for b, pair in self.split_tokens.items()}
        if self.search_params is not None:
            cfg["search_params"] = dataclasses.asdict(self.search_params)
        if self.name:
            cfg["name"] = self.name
        if self.cpu_pool_dtype != "auto":  # only when set: configs (and result rows) of earlier runs are unchanged
            cfg["cpu_pool_dtype"] = self.cpu_pool_dtype
        return cfg

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path, *, registry: Registry | None = None,
                    **overrides: Any) -> Policy:
        """From a dict or a YAML file. A ``preset`` key starts from that preset; other keys override it."""
        if isinstance(config, (str, Path)):
            import yaml

            path = Path(config)
            if not path.is_file():
                raise FileNotFoundError(f"policy config file {str(path)!r} does not exist")
            config = yaml.safe_load(path.read_text()) or {}
            if not isinstance(config, Mapping):
                raise ValueError(f"policy config file {str(path)!r} must hold a mapping")
        cfg = {**dict(config), **{k: v for k, v in overrides.items() if v is not None}}
        if "budget" in overrides and overrides["budget"] is None:
            cfg["budget"] = None
        reg = registry or get_registry()
        preset = cfg.pop("preset", None)
        if preset is not None:
            base = dict(reg.get("preset", preset))
            base.setdefault("name", preset)
            cfg = {**base, **cfg}
        unknown = set(cfg) - set(_FIELDS)
        if unknown:
            bad = sorted(unknown)[0]
            raise ValueError(f"unknown policy key {bad!r}.{suggest(bad, _FIELDS)} Known keys: {', '.join(_FIELDS)}")
        if "selector" not in cfg:
            raise ValueError("a policy config needs a 'selector' (or a 'preset')")
        return cls(**cfg, registry=registry)

    @classmethod
    def preset(cls, name: str, *, registry: Registry | None = None, **overrides: Any) -> Policy:
        """A registered preset, with keyword overrides (e.g. ``budget=256``)."""
        return cls.from_config({"preset": name}, registry=registry, **overrides)

    @classmethod
    def resolve(cls, policy: Policy | str | Mapping[str, Any] | Path, **overrides: Any) -> Policy:
        """Coerce a Policy, a preset name, a YAML path or a config dict; apply overrides such as ``budget``."""
        if isinstance(policy, Policy):
            return dataclasses.replace(policy, **overrides) if overrides else policy
        if isinstance(policy, Path) or (isinstance(policy, str) and policy.endswith((".yaml", ".yml"))):
            return cls.from_config(policy, **overrides)
        if isinstance(policy, str):
            reg = get_registry()
            if ("preset", policy) not in reg:
                known = reg.names("preset")
                raise UnknownNameError(
                    f"unknown policy preset {policy!r}.{suggest(policy, known)} Presets: {', '.join(known)}"
                )
            return cls.preset(policy, **overrides)
        if isinstance(policy, Mapping):
            return cls.from_config(policy, **overrides)
        raise TypeError(f"policy must be a Policy, preset name, YAML path or dict; got {type(policy).__name__}")


def split_placement(spec: str) -> tuple[str, str | None, str | None]:
    """``"icecache@cuda:uva"`` -> ``("icecache", "cuda", "uva")``; absent parts are ``None``."""
    base, _, transfer = spec.partition(":")
    name, _, index_device = base.partition("@")
    if not name:
        raise ValueError(f"policy spec {spec!r} has no preset name (form: NAME[@INDEX_DEVICE][:TRANSFER])")
    return name, index_device or None, transfer or None


def torch_device(name: str):
    import torch

    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from e
