"""Composition across axes: projected features (PCA / MatryoshkaKV) x token eviction (StreamingLLM / H2O / SnapKV),
in one cache.

Each kept token is stored as its codes on the feature method's per-(layer, kv head) orthonormal bases, truncated at
rank r = round(feature_budget x D) for every head (the composition uses uniform ranks); the token method decides
which tokens each (row, kv head) keeps, exactly as it does alone, but from the attention the *compressed* model
computes (scores are read from the decoded entries). The first ``sinks`` real positions of each row keep a full-size
copy besides their code (as in the feature methods alone), restored on read while their token is kept.

Storage per layer (:class:`ProjectedEvictionLayer`, an :class:`~kvlab.cache.eviction.EvictionLayer` that stores
codes):

    keys   (B, H_kv, C, r)     values (B, H_kv, C, r)     codes of the kept tokens
    index  (B, H_kv, C)                                    mask column of each slot (-1 = empty)
    sink_keys / sink_values (B, H_kv, S, D), sink_columns (B, S)

Pre-RoPE feature bases (the feature method's ``keys="pre_rope"``): the layer also keeps each slot's position
(``positions`` (B, H_kv, C) int32, gathered with the slots on eviction, in measured bytes like ``index``); new keys
are un-rotated and coded when attention sees their positions, and every read rebuilds and rotates them back.

Bytes kept ~ token_budget x feature_budget of the context (plus sink copies, the index and the token method's
statistics, all in measured bytes). One overall ``budget`` is split between the axes by ``feature_budget`` (the rank
fraction; the token method keeps ``budget / feature_budget`` of the tokens); :func:`search_split` picks the split on
calibration text. Protocol: "compress the context, then continue", as the token methods.

    both = Composed(budget=1/8, feature="pca", token="h2o", feature_budget=0.5).prepare(model, tok)
    with both.apply(model) as cache:
        model(**prompt, past_key_values=cache)
        both.compress(cache, attention_mask=prompt["attention_mask"])
    cache.kv_bytes().budget

Registry name: ``"composed"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models import ModelSpec
from ..cache.quantize import check_options
from .base import Method
from ..rope import Rotary
from .quant import nominal_budget
from ..cache.eviction import EvictionLayer, _slotted
from .token import H2O, SnapKV, Streaming, TokenEviction

FEATURE_METHODS = ("pca", "matryoshka")
TOKEN_METHODS: dict[str, type[TokenEviction]] = {cls.name: cls for cls in (Streaming, H2O, SnapKV)}


class ProjectedEvictionLayer(EvictionLayer):
    """An eviction layer whose slots hold codes ``k @ U`` (B, H_kv, C, r); attention and the token method's scores
    read the decoded entries ``codes @ U^T``, sinks restored at full size. See the module docstring."""

    positions = _slotted("positions")

    def __init__(self, layer_idx: int, policy, key_basis: torch.Tensor, value_basis: torch.Tensor, sinks: int = 0,
                 rotary: Rotary | None = None, value_decoder: torch.Tensor | None = None):
        """``key_basis`` (H_kv, D, r), ``value_basis`` (H_kv, Dv, r_v): orthonormal columns per head; ``rotary``: the
        layer's rotary embedding when the key basis was fitted on pre-RoPE keys."""
        super().__init__(layer_idx, policy)
        self.key_basis, self.value_basis, self.sinks, self.rotary = key_basis, value_basis, int(sinks), rotary
        self.value_decoder = value_decoder  # (H_kv, Dv, r_v) oblique read of output-aware values; None: value_basis
        self.extras = ("positions",) if rotary is not None else ()
        self.positions = None  # (B, H_kv, C) int32 position of each slot (pre-RoPE only)
        self.sink_keys = self.sink_values = None  # (B, H_kv, S, D) full-size copies of the first S real positions
        self.sink_columns = None  # (B, S) long: mask column of each sink, -1 until seen
        self._new = None  # the raw entries of the current forward, until attention has seen which are sinks

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.policy, self.key_basis, self.value_basis, self.sinks, self.rotary,
                      self.value_decoder)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.key_basis.shape[0] != self.n_heads or self.key_basis.shape[1] != self.head_dim:
            raise ValueError(f"layer {self.layer_idx}: key bases {tuple(self.key_basis.shape)} do not fit "
                             f"{self.n_heads} kv heads of dim {self.head_dim}")

    def _new_extras(self, batch, heads, new, device):
        if self.rotary is None:
            return {}
        return {"positions": torch.full((batch, heads, new), -1, dtype=torch.int32, device=device)}

    def _encode(self, key_states, value_states):
        self._new = (key_states, value_states)
        values = value_states @ self.value_basis.to(value_states.dtype)  # (B, H_kv, T_new, r_v)
        if self.rotary is not None:  # coded in attend, once the positions are known
            return key_states.new_zeros(*key_states.shape[:3], self.key_basis.shape[-1]), values
        return key_states @ self.key_basis.to(key_states.dtype), values  # (B, H_kv, T_new, r)

    def _code_pre_rope(self, position_ids: torch.Tensor | None) -> None:
        """Un-rotate the new keys by their positions, store their codes and positions in the last slots."""
        keys = self._new[0]  # (B, H_kv, T_new, D) post-RoPE
        batch, heads, new, _ = keys.shape
        if position_ids is None:
            position_ids = torch.arange(self.seen - new, self.seen, device=keys.device)[None]
        positions = position_ids.expand(batch, new)  # (B, T_new)
        self.keys[:, :, -new:] = self.rotary.unrotate(keys, positions) @ self.key_basis.to(keys.dtype)
        self.positions[:, :, -new:] = positions[:, None, :].to(torch.int32)

    def read(self):
        codes_k, codes_v = self.stored()  # (B, H_kv, C, r): what is stored, or its dequantized form
        keys = codes_k @ self.key_basis.to(codes_k.dtype).transpose(1, 2)  # (B, H_kv, C, D)
        if self.rotary is not None:  # rotate each slot by its own position
            batch, heads, slots, dim = keys.shape
            cos, sin = self.rotary.cos_sin(self.positions.reshape(batch, heads * slots).long(), keys.dtype)
            cos, sin = cos.reshape(batch, heads, slots, dim), sin.reshape(batch, heads, slots, dim)
            half = dim // 2
            keys = keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), dim=-1) * sin
        decoder = self.value_decoder if self.value_decoder is not None else self.value_basis
        values = codes_v @ decoder.to(codes_v.dtype).transpose(1, 2)
        if self.sink_columns is None:
            return keys, values
        match = (self.index.long()[..., None] == self.sink_columns[:, None, None, :]) & (self.index >= 0)[..., None]
        is_sink = match.any(-1, keepdim=True)  # (B, H_kv, C, 1)
        if not bool(is_sink.any()):
            return keys, values
        which = match.long().argmax(-1)  # (B, H_kv, C): which sink copy a slot holds
        take = lambda copies: copies.gather(2, which[..., None].expand(-1, -1, -1, copies.shape[-1]))
        return torch.where(is_sink, take(self.sink_keys), keys), torch.where(is_sink, take(self.sink_values), values)

    def attend(self, query, key, value, mask, *, scaling, **kwargs):
        if self.rotary is not None and self._new is not None:
            self._code_pre_rope(kwargs.get("position_ids"))
        if self.sinks and self._new is not None:
            self._keep_sinks(mask, query.shape[2])
        self._new = None
        return super().attend(query, key, value, mask, scaling=scaling, **kwargs)

    def _keep_sinks(self, mask: torch.Tensor | None, n_query: int) -> None:
        """Full-size copies of the new entries whose position among their row's real tokens is < sinks."""
        keys, values = self._new  # (B, H_kv, T_new, D)
        batch, heads, new, dim = keys.shape
        start = self.seen - n_query
        full = self._full_mask(mask, batch, n_query)  # (B, 1, Q, seen)
        steps = torch.arange(n_query, device=keys.device)
        real = full[:, 0, steps, start + steps]  # (B, T_new)
        before = self.real_seen if self.real_seen is not None else torch.zeros(batch, dtype=torch.long)
        positions = before[:, None] + real.long().cumsum(-1) - 1  # (B, T_new) among real tokens
        is_sink = real & (positions < self.sinks)
        if self.sink_columns is None:
            self.sink_keys = keys.new_zeros(batch, heads, self.sinks, dim)
            self.sink_values = values.new_zeros(batch, heads, self.sinks, values.shape[-1])
            self.sink_columns = torch.full((batch, self.sinks), -1, dtype=torch.long, device=keys.device)
        if not bool(is_sink.any()):
            return
        rows, cols = is_sink.nonzero(as_tuple=True)
        where = positions[rows, cols]
        self.sink_keys[rows, :, where] = keys[rows, :, cols]
        self.sink_values[rows, :, where] = values[rows, :, cols]
        self.sink_columns[rows, where] = start + cols

    def tensors(self):
        extra = [t for t in (self.sink_keys, self.sink_values, self.sink_columns) if t is not None]
        return super().tensors() + extra

    def accounting(self):
        rows = super().accounting()  # checks compress was called; counts kept slots at full dim
        n_sinks = int((self.sink_columns >= 0).sum()) if self.sink_columns is not None else 0  # over the batch
        for row in rows:
            r = (self.key_basis if row["part"] == "K" else self.value_basis).shape[-1]
            kept = row["theoretical"] // (row["dims_full"] * self.element_size)
            row["theoretical"] = (kept * r + n_sinks * row["dims_full"]) * self.element_size
            row["dims_kept"] = r
        return rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.sink_columns is not None:
            indices = indices.to(self.sink_columns.device)
            self.sink_keys, self.sink_values = self.sink_keys[indices], self.sink_values[indices]
            self.sink_columns = self.sink_columns[indices]


@dataclass(eq=False)
class Composed(Method):
    """Two or three axes in one cache: projected features x token eviction x precision; ``budget`` = feature fraction
    x token fraction x precision fraction.

    ``feature``: "pca" or "matryoshka" (its fitted bases; ``feature_options`` pick/fit them as the method alone
    would, e.g. the shipped artefact) or None; ``token``: "streaming", "h2o" or "snapkv" with ``token_options``, or
    None; ``bits``: None (entries in the cache's dtype) or 2 / 4 / 8 (quantized, :mod:`kvlab.methods.quant_composed`:
    at most ``group_size`` channels per value group (the largest divisor of the stored size); ``residual`` recent codes at full precision
    when there is no token method). At least two axes. The precision fraction p is the nominal bytes of a quantized
    number over bf16's (:func:`kvlab.methods.quant.nominal_budget`: bits / 16 + 2 / group_size), 1 without ``bits``.
    ``feature_budget``: the rank fraction r / D, in [budget / p, 1]; None = sqrt(budget / p), the even split in log
    bytes (= budget / p without a token method, which is then the only choice). The token method keeps
    budget / (feature_budget x p) of the tokens.
    ``sinks``: full-size positions per row (None = the feature method's ``sinks``; none at full rank without
    quantization, where the codes are exact and the composition is the token method alone).
    """

    name: ClassVar[str] = "composed"
    axes: ClassVar[tuple[str, ...]] = ("feature", "token", "precision")
    protocols: ClassVar[tuple[str, ...]] = ("context",)

    budget: float = 0.125
    feature: str | None = "pca"
    token: str | None = "h2o"
    feature_budget: float | None = None
    sinks: int | None = None
    bits: int | None = None
    group_size: int = 32
    residual: int = 32
    feature_options: dict = field(default_factory=dict)
    token_options: dict = field(default_factory=dict)
    feature_method: Method | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.feature is not None and self.feature not in FEATURE_METHODS:
            raise ValueError(f"feature must be one of {', '.join(FEATURE_METHODS)} or None, got {self.feature!r}")
        if self.token is not None and self.token not in TOKEN_METHODS:
            raise ValueError(f"token must be one of {', '.join(TOKEN_METHODS)} or None (methods on the EvictionLayer; "
                             f"attention_gate and kvcompress keep their own storage), got {self.token!r}")
        if self.bits is not None:
            check_options(self.bits, self.group_size, self.residual)
        if sum(x is not None for x in (self.feature, self.token, self.bits)) < 2:
            raise ValueError(f"composed needs two axes or three: feature (pca, matryoshka), token (streaming, h2o, "
                             f"snapkv), bits (2, 4, 8); got feature={self.feature!r}, token={self.token!r}, "
                             f"bits={self.bits!r} (one axis alone is its own method)")
        if self.token is None and self.feature_budget is not None:
            raise ValueError("without a token method the rank fraction follows from the budget (budget / precision "
                             f"fraction); leave feature_budget unset, got {self.feature_budget!r}")
        f, low = self.split, float(self.budget) / self.precision
        if not low - 1e-9 <= f <= 1.0 + 1e-12:
            raise ValueError(f"feature_budget must be in [budget / precision fraction, 1] = [{low:.4g}, 1] (the token "
                             f"method keeps budget / (feature_budget x precision) of the tokens), got "
                             f"{self.feature_budget!r} (rank fraction {f:.4g})")
        if self.sinks is not None and (isinstance(self.sinks, bool) or not isinstance(self.sinks, int)
                                       or self.sinks < 0):
            raise ValueError(f"sinks must be an int >= 0 or None, got {self.sinks!r}")
        self.policy = None
        if self.token is not None:
            self.policy = TOKEN_METHODS[self.token](budget=min(1.0, low / f), **self.token_options)

    @property
    def precision(self) -> float:
        """The precision fraction: nominal bytes of a stored number over bf16's (1 without quantization)."""
        return 1.0 if self.bits is None else nominal_budget(self.bits, self.group_size)

    @property
    def split(self) -> float:
        """The feature (rank) fraction used."""
        if self.feature is None:
            return 1.0
        low = float(self.budget) / self.precision
        if self.token is None:
            return low
        return float(self.feature_budget) if self.feature_budget is not None else math.sqrt(low)

    @property
    def token_budget(self) -> float:
        return self.policy.budget if self.policy is not None else 1.0

    # the token method's interface, as the eval harness reads it
    @property
    def decode(self) -> bool:
        return bool(getattr(self.policy, "decode", False))

    def feature_part(self) -> Method | None:
        if self.feature is None:
            return None
        if self.feature_method is None:
            from . import get

            self.feature_method = get(self.feature, **self.feature_options)
        return self.feature_method

    @property
    def provenance(self) -> dict:
        return getattr(self.feature_method, "provenance", {}) if self.feature_method is not None else {}

    def prepare(self, model, tokenizer) -> "Composed":
        if self.feature is not None:
            self.feature_part().prepare(model, tokenizer)
        return self

    def fit(self, model, calib=None) -> "Composed":
        if self.feature is not None:
            self.feature_part().fit(model, calib)
        return self

    def rank(self, spec: ModelSpec) -> int:
        """r = round(split x D), at least 1; with quantization a multiple of the codes per byte (8 / bits)."""
        per = 1 if self.bits is None else 8 // self.bits
        return min(spec.head_dim, max(per, per * round(self.split * spec.head_dim / per)))

    def check(self, spec: ModelSpec) -> None:
        if self.bits is not None and self.feature is None:
            check_options(self.bits, self.group_size, self.residual, spec.head_dim)

    def make_layer(self, layer_idx: int, spec: ModelSpec, rotary: Rotary | None = None):
        from .quant_composed import QuantEvictionLayer, QuantProjectedEvictionLayer, QuantProjectedLayer

        if self.feature is None:  # tokens x precision
            self.check(spec)
            return QuantEvictionLayer(layer_idx, self.policy, self.bits, self.group_size)
        feature = self.feature_part()
        if getattr(feature, "key_bases", None) is None:
            raise RuntimeError(f"{self.feature} has no bases yet: call .prepare(model, tokenizer) or .fit(model, ids)")
        r = self.rank(spec)
        sinks = self.sinks if self.sinks is not None else int(getattr(feature, "sinks", 0))
        sinks = 0 if r == spec.head_dim and self.bits is None else sinks  # exact codes: the token method alone
        if getattr(feature, "keys", "post_rope") == "pre_rope":
            if rotary is None:
                raise ValueError("a composition with pre-RoPE feature bases rotates the rebuilt keys with the model's "
                                 "rotary: build caches with new_cache(model)")
            if self.bits is not None:
                raise ValueError("quantized codes of pre-RoPE feature bases are not supported: use keys=post_rope "
                                 "with bits, or no bits with keys=pre_rope")
        key_basis, value_basis = feature.key_bases[layer_idx, :, :, :r], feature.value_bases[layer_idx, :, :, :r]
        if self.token is None:  # features x precision
            return QuantProjectedLayer(layer_idx, key_basis, value_basis, self.bits, self.group_size, self.residual,
                                       sinks)
        if self.bits is None:  # features x tokens
            decoders = getattr(feature, "value_decoders", None)
            return ProjectedEvictionLayer(layer_idx, self.policy, key_basis, value_basis, sinks, rotary,
                                          None if decoders is None else decoders[layer_idx, :, :, :r])
        return QuantProjectedEvictionLayer(layer_idx, self.policy, key_basis, value_basis, self.bits, self.group_size,
                                           sinks)

    def new_cache(self, model):
        from ..cache.base import KVLabCache

        spec = ModelSpec.from_model(model)
        feature = self.feature_part() if self.feature is not None else None
        rotaries = feature.rotaries(model) if hasattr(feature, "rotaries") else [None] * spec.n_layers
        return KVLabCache([self.make_layer(i, spec, rotaries[i]) for i in range(spec.n_layers)])

    def compress(self, cache, **context) -> None:
        if self.policy is not None:
            self.policy.compress(cache, **context)


def search_split(model, tokenizer, budget: float, *, feature: str | None = "pca", token: str | None = "h2o",
                 splits=None, bits=(None,), n_chunks: int = 4, chunk_len: int = 512, context_frac: float = 0.75,
                 prepared: Method | None = None, progress: bool = False, **options):
    """Pick the split of ``budget`` between the axes on calibration text: for each precision in ``bits`` (None = the
    cache's dtype, or 2 / 4 / 8) and each rank fraction in ``splits`` (default: the fractions 1/8 .. 1 on a grid of
    eighths that are >= budget / precision fraction; one, budget / precision, without a token method; 1 without a
    feature method) build the composition, compress the first ``context_frac`` of each calibration chunk and score
    the rest (perplexity, "context" protocol); returns the best :class:`Composed` and the table (pandas) of every
    combination tried with its measured budget (bf16 view)."""
    import pandas as pd

    from ..data import text_chunks
    from ..eval.perplexity import perplexity

    chunks = text_chunks("wiki", tokenizer, chunk_len=chunk_len, n_chunks=n_chunks, split="calib", seed=2)
    spec = ModelSpec.from_model(model)
    feature_method, rows, methods = prepared, [], []
    for b in bits:
        p = 1.0 if b is None else nominal_budget(b, options.get("group_size", 32))
        if feature is None or token is None:
            grid = [None]
        elif splits is None:
            grid = [f / 8 for f in range(1, 9) if f / 8 >= budget / p - 1e-12]
        else:
            grid = [f for f in splits if f >= budget / p - 1e-12]
        for f in grid:
            if (feature is None or token is None) and budget / p > 1.0 + 1e-12:
                continue
            method = Composed(budget=budget, feature=feature, token=token, feature_budget=f, bits=b,
                              feature_method=feature_method, **options)
            if feature is not None and feature_method is None:
                feature_method = method.prepare(model, tokenizer).feature_method
            result = perplexity(model, tokenizer, method, chunks, protocol="context", context_frac=context_frac,
                                progress=progress)
            rows.append(dict(bits=b, feature_budget=method.split, token_budget=method.token_budget,
                             rank=method.rank(spec) if feature is not None else spec.head_dim, ppl=result["ppl"],
                             measured_budget=result["kv_bytes"]["budget"]))
            methods.append(method)
    if not rows:
        raise ValueError(f"no split to try: every rank fraction must be in [budget / precision fraction, 1] for "
                         f"budget {budget} and bits {list(bits)}")
    table = pd.DataFrame(rows)
    return methods[int(table["ppl"].idxmin())], table
