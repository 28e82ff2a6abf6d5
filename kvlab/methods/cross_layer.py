"""Learned cross-layer prediction (layer axis): layer l+1's K/V predicted from layer l's, only a low-rank residual stored.

Layers come in groups of ``group`` adjacent layers: the first of each group (the *anchor*, l % group == 0) stays a
plain full :class:`~kvlab.cache.FullLayer`; every other layer l of the group is *predicted* from the layer below:

    k_pre(l)  ~  [k_pre_hat(l-1), 1] A_K(l)        (B, T, H_kv*D) @ (H_kv*D + 1, H_kv*D)
    v(l)      ~  [v_hat(l-1), 1] A_V(l)

and stores only the code of the residual on a per-(layer, kv head) orthonormal basis of rank ``key_rank`` /
``value_rank`` (0 = store nothing but the positions): c = B^T (k_pre(l) - prediction), read back as
k_pre_hat(l) = prediction + B c, then rotated by the rotary of each cached position (pre-RoPE keys, ``keys="pre_rope"``,
the default on RoPE models; ``keys="post_rope"`` predicts the cached post-RoPE keys directly, the only choice for a
model without RoPE). The prediction reads the layer below *as the cache holds it* (its decoded entries), so coding is
closed-loop: the error of a predicted layer is its residual's truncation, it does not add up along a chain.

``map``: ``"head"`` (the paper-style per-head map: kv head h of l+1 from kv head h of l, plus a bias), ``"layer"``
(each head of l+1 from all kv heads of l) or ``"none"`` (no prediction: the residual is the entry itself, i.e.
per-layer PCA with uncentred moments; the ablation that shows what prediction adds).

Fitting (:meth:`CrossLayer.fit`, closed form, seconds): on calibration chunks, the joint second moments of
[x_l, 1] and x_{l+1} per adjacent pair (positions < ``sinks`` left out) give the ridge least-squares map A and the
residual covariance S_yy - A^T S_xy - S_xy^T A + A^T S_xx A without a second pass; the residual basis of each kv head
is that covariance's eigenvectors (largest first). The maps are fitted on the true entries of the layer below
(open loop) and used on its decoded ones. Every adjacent pair is fitted, so one fit serves every ``group`` and rank
(``dataclasses.replace(method, group=4)`` keeps the tensors; copy ``provenance`` along).

Bytes (one predicted layer, per token): H_kv (key_rank + value_rank) codes + one int32 position (pre-RoPE keys need
it to rotate on read) + the first ``sinks`` positions at full size, as in PCA; anchors hold everything. Maps and
bases are model parameters (reported by :meth:`CrossLayer.parameter_bytes`), not cache bytes. With budget b and no
explicit ranks, key_rank = value_rank = floor(D (b L - n_anchor) / n_predicted); ``key_rank`` alone given: the value
rank takes the rest of the budget (cheap pre-RoPE keys give their bytes to values).

    press = CrossLayer(budget=0.5, group=3).prepare(model, tok)
    with press.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .. import attention
from ..cache.base import FullLayer, KVLabCache
from ..models import ModelSpec
from .base import Method
from ..cache.coded import CodedLayer

MAPS = ("head", "layer", "none")
KEY_MODES = ("pre_rope", "post_rope")


def predict(entries: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[x, 1] A for entries (B, H, T, D) and A (H*D + 1, H*D): the prediction (B, H, T, D)."""
    batch, heads, tokens, dim = entries.shape
    flat = entries.transpose(1, 2).reshape(batch, tokens, heads * dim)  # (B, T, H*D)
    out = flat @ weight[:-1].to(entries.dtype) + weight[-1].to(entries.dtype)  # (B, T, H*D)
    return out.view(batch, tokens, heads, dim).transpose(1, 2)  # (B, H, T, D)


class PredictedLayer(CodedLayer):
    """A layer whose K (pre-RoPE) and V are predicted from the layer below (``source``, set by :meth:`link`) and
    corrected by stored residual codes (B, H_kv, T, r). ``key_basis`` / ``value_basis``: (H_kv, D, r) orthonormal
    columns; ``key_map`` / ``value_map``: (H_kv*D + 1, H_kv*D); ``rotary`` / ``source_rotary``: this layer's and the
    source's :class:`~kvlab.rope.Rotary` (None: keys are predicted and stored post-RoPE, no positions kept)."""

    def __init__(self, layer_idx: int, key_map, value_map, key_basis, value_basis, *, rotary=None, source_rotary=None,
                 sinks: int = 0):
        super().__init__(layer_idx, sinks)
        self.key_map, self.value_map = key_map, value_map
        self.key_basis, self.value_basis = key_basis, value_basis
        self.rotary, self.source_rotary = rotary, source_rotary
        self.source = None  # the layer below: a FullLayer anchor or another PredictedLayer
        self.feeds_next = False  # True when the layer above is predicted from this one
        self.export = None  # (K pre-RoPE, V) (B, H_kv, T, D) as read this pass, for the layer above; then dropped
        self.key_codes = self.value_codes = None  # (B, H_kv, T, r)
        self.positions = None  # (B, T) int32, only with pre-RoPE keys
        self._source_entries = None

    def reset(self) -> None:
        source, feeds_next = self.source, self.feeds_next
        self.__init__(self.layer_idx, self.key_map, self.value_map, self.key_basis, self.value_basis,
                      rotary=self.rotary, source_rotary=self.source_rotary, sinks=self.sinks)
        self.source, self.feeds_next = source, feeds_next

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        heads, dim = key_states.shape[1], key_states.shape[-1]
        if tuple(self.key_basis.shape[:2]) != (heads, dim) or self.key_map.shape[-1] != heads * dim:
            raise ValueError(f"layer {self.layer_idx}: fitted for (kv heads, head_dim) = "
                             f"{tuple(self.key_basis.shape[:2])}, the model gives {(heads, dim)}")
        if self.source is None:
            raise RuntimeError(f"layer {self.layer_idx} is predicted but not linked to the layer below: build the cache "
                               "with CrossLayer.new_cache(model)")

    # ---- the layer below, as the cache holds it
    def source_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K (pre-RoPE unless keys are post-RoPE), V (B, H_kv, T, D) of the layer below, decoded, for every position."""
        if self._source_entries is not None:
            return self._source_entries
        src = self.source
        if src.length != self.length + (self._pending_new or 0):
            raise RuntimeError(f"layer {self.layer_idx} is at {self.length} tokens but layer {src.layer_idx}, which "
                               f"predicts it, holds {src.length}")
        if isinstance(src, PredictedLayer):
            if src.export is None:
                raise RuntimeError(f"layer {src.layer_idx} has not been read in this pass before layer "
                                   f"{self.layer_idx}, which is predicted from it")
            keys, values = src.export
        else:
            keys, values = src.keys[:, :, : src.length], src.values[:, :, : src.length]
            if self.source_rotary is not None:
                keys = self.source_rotary.unrotate(keys, self.positions.long())
        self._source_entries = (keys, values)
        return keys, values

    # ---- CodedLayer hooks
    _pending_new = 0

    def _append_codes(self, keys, values) -> None:
        new = keys.shape[-2]
        src_k, src_v = self.source_entries()
        src_k, src_v = src_k[:, :, self.length :], src_v[:, :, self.length :]  # (B, H_kv, T_new, D)
        if self.rotary is not None:
            keys = self.rotary.unrotate(keys, self.positions[:, self.length :].long())
        res_k = keys - predict(src_k, self.key_map)
        res_v = values - predict(src_v, self.value_map)
        k_codes = torch.einsum("bhtd,hdr->bhtr", res_k, self.key_basis.to(keys.dtype))  # (B, H_kv, T_new, r_k)
        v_codes = torch.einsum("bhtd,hdr->bhtr", res_v, self.value_basis.to(values.dtype))
        cat = lambda old, add: add.contiguous() if old is None else torch.cat([old, add], dim=-2)
        self.key_codes, self.value_codes = cat(self.key_codes, k_codes), cat(self.value_codes, v_codes)
        assert self.key_codes.shape[-2] == self.length + new

    def _decode_all(self):
        """K_hat post-RoPE, V_hat (B, H_kv, T, D): prediction from the layer below + lifted residual codes."""
        src_k, src_v = self.source_entries()
        keys = predict(src_k, self.key_map) + self.key_codes @ self.key_basis.to(src_k.dtype).transpose(1, 2)
        values = predict(src_v, self.value_map) + self.value_codes @ self.value_basis.to(src_v.dtype).transpose(1, 2)
        if self.rotary is not None:
            keys = self.rotary.rotate(keys, self.positions.long())
        return keys, values

    def attend(self, query, key, value, mask, *, scaling, position_ids=None, **kwargs):
        if self._pending is not None:
            batch, _, new, _ = self._pending[0].shape
            if self.rotary is not None:
                if position_ids is None:
                    position_ids = torch.arange(self.length, self.length + new, device=query.device)[None]
                pos = position_ids.expand(batch, new).to(torch.int32)
                self.positions = pos.contiguous() if self.positions is None else torch.cat([self.positions, pos], -1)
            self._pending_new = new
            try:
                self._commit(position_ids, mask)
            finally:
                self._pending_new = 0
        try:
            keys, values = self.reconstruct()  # sinks restored at full size
            if self.feeds_next:
                pre = keys if self.rotary is None else self.rotary.unrotate(keys, self.positions.long())
                self.export = (pre, values)
        finally:
            self._source_entries = None
            if isinstance(self.source, PredictedLayer):
                self.source.export = None  # read: the layer below's decoded entries are working memory only
        return attention.sdpa(query, keys, values, mask, scaling)

    # ---- bytes and batch
    def code_tensors(self):
        extra = [self.positions] if self.positions is not None else []
        return [t for t in (self.key_codes, self.value_codes) if t is not None] + extra

    def dims_kept(self, part: str, head: int) -> int:
        return (self.key_basis if part == "K" else self.value_basis).shape[-1]

    def accounting(self):
        rows = super().accounting()
        if self.positions is not None:  # int32 positions, spread over the key rows (integers: no dtype view)
            share = self.positions.numel() * self.positions.element_size() / self.n_heads
            for row in rows:
                if row["part"] == "K":
                    row["theoretical"] += share
                    row["fixed"] = row.get("fixed", 0) + share
        for row in rows:
            row["predicted_from"] = self.source.layer_idx if self.source is not None else -1
        return rows

    def _select_codes(self, indices) -> None:
        self.key_codes, self.value_codes = self.key_codes[indices], self.value_codes[indices]
        if self.positions is not None:
            self.positions = self.positions[indices]


@dataclass
class CrossLayer(Method):
    """Learned cross-layer prediction with low-rank residuals (see the module docstring).

    Fitted tensors: ``key_maps`` / ``value_maps`` (L, H_kv*D + 1, H_kv*D) (zeros for anchors), ``key_bases`` /
    ``value_bases`` (L, H_kv, D, D) residual eigenvectors, largest first (layer 0: zero map, identity basis).
    """

    name: ClassVar[str] = "cross_layer"
    axes: ClassVar[tuple[str, ...]] = ("layer",)

    budget: float = 0.5
    group: int = 3  # anchor + (group - 1) predicted layers; 1 = no prediction (the full cache)
    key_rank: int | None = None  # residual rank per kv head; None: from the budget
    value_rank: int | None = None
    map: str = "head"  # "head", "layer" or "none"
    keys: str | None = None  # "pre_rope" / "post_rope"; None: pre_rope on RoPE models, post_rope otherwise
    sinks: int = 4
    ridge: float = 1e-3  # relative to the mean diagonal of the source's second moment
    corpus: str = "wiki"
    calib_chunks: int = 16
    chunk_len: int = 512
    key_maps: torch.Tensor | None = field(default=None, repr=False)
    value_maps: torch.Tensor | None = field(default=None, repr=False)
    key_bases: torch.Tensor | None = field(default=None, repr=False)
    value_bases: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if int(self.group) != self.group or self.group < 1:
            raise ValueError(f"group must be an integer >= 1 (anchor + predicted layers), got {self.group}")
        if self.map not in MAPS:
            raise ValueError(f"map must be one of {', '.join(MAPS)}, got {self.map!r}")
        if self.keys is not None and self.keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {', '.join(KEY_MODES)} (or None: pre_rope on RoPE models), got "
                             f"{self.keys!r}")
        for what in ("key_rank", "value_rank"):
            r = getattr(self, what)
            if r is not None and (int(r) != r or r < 0):
                raise ValueError(f"{what} must be an integer >= 0 (residual dims per kv head), got {r}")
        if self.sinks < 0 or self.ridge < 0:
            raise ValueError(f"sinks and ridge must be >= 0, got sinks={self.sinks}, ridge={self.ridge}")
        self.metrics: dict = getattr(self, "metrics", None) or {}
        self.provenance: dict = getattr(self, "provenance", None) or {}

    # ---- plan
    def key_mode(self, spec: ModelSpec) -> str:
        mode = self.keys or ("pre_rope" if spec.rope else "post_rope")
        if mode == "pre_rope" and not spec.rope:
            raise ValueError(f"keys='pre_rope' needs a model with rotary position embedding; {spec.arch} has none: "
                             "use keys='post_rope'")
        return mode

    def anchors(self, spec: ModelSpec) -> list[int]:
        if self.group > spec.n_layers:
            raise ValueError(f"group {self.group} is larger than the model's {spec.n_layers} layers; allowed: "
                             f"1..{spec.n_layers}")
        return [l for l in range(spec.n_layers) if l % self.group == 0]

    def predicted(self, spec: ModelSpec) -> list[int]:
        anchors = set(self.anchors(spec))
        return [l for l in range(spec.n_layers) if l not in anchors]

    def ranks(self, spec: ModelSpec) -> tuple[int, int]:
        """Residual (key rank, value rank) per kv head of every predicted layer."""
        dim, n_pred = spec.head_dim, len(self.predicted(spec))
        n_anchor = spec.n_layers - n_pred
        if n_pred == 0:
            return dim, dim
        pool = 2 * dim * (self.budget * spec.n_layers - n_anchor) / n_pred  # K + V dims per predicted head
        lowest = n_anchor / spec.n_layers
        if self.key_rank is None and self.value_rank is None:
            if pool < -1e-9:
                raise ValueError(f"budget {self.budget} is below what group {self.group} keeps in its anchors alone "
                                 f"({lowest:.4f}); use a larger group or a budget in [{lowest:.4f}, 1]")
            key = value = min(dim, int(math.floor(pool / 2 + 1e-9)))
        else:
            key = self.key_rank if self.key_rank is not None else int(math.floor(pool - self.value_rank + 1e-9))
            value = self.value_rank if self.value_rank is not None else int(math.floor(pool - self.key_rank + 1e-9))
            value = min(value, dim)
        for what, r in (("key_rank", key), ("value_rank", value)):
            if not 0 <= r <= dim:
                raise ValueError(f"{what} {r} is out of range: residual ranks must be in 0..{dim} (head_dim) "
                                 f"(budget {self.budget}, group {self.group})")
        return int(key), int(value)

    def kept_fraction(self, spec: ModelSpec) -> float:
        """Codes' share of the full cache's bytes (sink copies and positions come on top)."""
        key, value = self.ranks(spec)
        n_pred = len(self.predicted(spec))
        return ((spec.n_layers - n_pred) * 2 * spec.head_dim + n_pred * (key + value)) / (2 * spec.n_layers *
                                                                                         spec.head_dim)

    def check(self, spec: ModelSpec) -> None:
        """ValueError if the options cannot work on the model (key mode, group size, ranks, a fit of another mode)."""
        mode = self.key_mode(spec)
        self.ranks(spec)
        fitted_mode = self.provenance.get("keys")
        if self.fitted and fitted_mode is not None and fitted_mode != mode:
            raise ValueError(f"the maps were fitted on {fitted_mode} keys, the method is set to keys={mode!r}: refit "
                             f"or set keys={fitted_mode!r}")

    @property
    def fitted(self) -> bool:
        return self.key_maps is not None

    # ---- fit
    @torch.no_grad()
    def fit(self, model, calib: torch.Tensor, batch: int = 4) -> "CrossLayer":
        """Fit maps and residual bases on calibration token ids ``calib`` (N, T) (closed form)."""
        from ..capturing import capture

        spec = ModelSpec.from_model(model)
        mode = self.key_mode(spec)
        self.anchors(spec)
        if calib.shape[1] <= self.sinks:
            raise ValueError(f"calibration chunks of {calib.shape[1]} tokens leave nothing after {self.sinks} sinks")
        L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
        width = H * D + 1
        moments = torch.zeros(L, 2, width, width, dtype=torch.float64)  # sum of z z^T, z = [x (H*D), 1]
        cross = torch.zeros(max(L - 1, 0), 2, width, width, dtype=torch.float64)  # sum of z_l z_{l+1}^T
        tic = time.perf_counter()
        key_name = "keys_pre" if mode == "pre_rope" else "keys"
        for start in range(0, len(calib), batch):
            cap = capture(model, calib[start : start + batch], what=(key_name, "values"))
            prev = None
            for l in range(L):
                parts = []
                for p, x in enumerate((getattr(cap, key_name)[l], cap.values[l])):
                    x = x[:, :, self.sinks :].transpose(1, 2).reshape(-1, H * D).double()  # (N, H*D)
                    parts.append(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1))
                    moments[l, p] += parts[p].T @ parts[p]
                    if prev is not None:
                        cross[l - 1, p] += prev[p].T @ parts[p]
                prev = parts
        key_maps = torch.zeros(L, width, H * D)  # layer 0 has no layer below: zero map, identity basis
        value_maps = torch.zeros(L, width, H * D)
        key_bases = torch.eye(D).expand(L, H, D, D).clone()
        value_bases = key_bases.clone()
        gain = torch.full((L, 2), float("nan"))
        for l in range(1, L):  # every adjacent pair: one fit serves every group size (anchors ignore theirs)
            for p, (maps, bases) in enumerate(((key_maps, key_bases), (value_maps, value_bases))):
                sxx, sxy, syy = moments[l - 1, p], cross[l - 1, p][:, :-1], moments[l, p][:-1, :-1]
                a = self._solve(sxx, sxy, H, D)  # (H*D + 1, H*D)
                residual = syy - a.T @ sxy - sxy.T @ a + a.T @ sxx @ a
                gain[l, p] = 1 - residual.trace() / syy.trace()
                maps[l] = a.float()
                for h in range(H):
                    block = residual[h * D : (h + 1) * D, h * D : (h + 1) * D]
                    block = (block + block.T) / 2
                    _, vectors = torch.linalg.eigh(block)
                    bases[l, h] = vectors.flip(-1).float()  # (D, D), largest residual energy first
        self.key_maps, self.value_maps, self.key_bases, self.value_bases = key_maps, value_maps, key_bases, value_bases
        self.metrics["explained"] = {"K": gain[:, 0].tolist(), "V": gain[:, 1].tolist()}
        self.provenance = {"calib_shape": list(calib.shape), "tokens": int(calib.numel()), "keys": mode,
                           "map": self.map, "sinks_skipped": self.sinks, "ridge": self.ridge,
                           "seconds": round(time.perf_counter() - tic, 1)}
        return self

    def _solve(self, sxx: torch.Tensor, sxy: torch.Tensor, H: int, D: int) -> torch.Tensor:
        """Ridge least squares [x, 1] A ~ y from moments; ``map`` restricts which source features each head reads."""
        width = H * D + 1
        a = torch.zeros(width, H * D, dtype=torch.float64)
        if self.map == "none":
            return a
        lam = self.ridge * sxx.diagonal()[:-1].mean()
        reg = torch.eye(width, dtype=torch.float64) * lam
        reg[-1, -1] = 0  # the bias is not shrunk
        if self.map == "layer":
            return torch.linalg.solve(sxx + reg, sxy)
        for h in range(H):
            rows = torch.cat([torch.arange(h * D, (h + 1) * D), torch.tensor([H * D])])
            cols = slice(h * D, (h + 1) * D)
            sub = (sxx + reg)[rows][:, rows]
            a[rows, cols] = torch.linalg.solve(sub, sxy[rows, cols])
        return a

    def prepare(self, model, tokenizer) -> "CrossLayer":
        if not self.fitted:
            from ..data import text_chunks

            self.fit(model, text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks,
                                        split="calib"))
        return self

    # ---- cache
    def new_cache(self, model):
        from ..rope import Rotary

        spec = ModelSpec.from_model(model)
        if not self.fitted:
            raise RuntimeError("CrossLayer has no maps yet: call .fit(model, calib_ids) or .prepare(model, tokenizer)")
        if tuple(self.key_bases.shape) != (spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim):
            raise ValueError(f"fitted for (layers, kv heads, head_dim) = {tuple(self.key_bases.shape[:3])}, the model "
                             f"has {(spec.n_layers, spec.n_kv_heads, spec.head_dim)}")
        self.check(ModelSpec.from_model(model))
        mode = self.key_mode(spec)
        key_rank, value_rank = self.ranks(spec)
        predicted = set(self.predicted(spec))
        rotary = (lambda l: Rotary.from_model(model, l)) if mode == "pre_rope" else (lambda l: None)
        layers = []
        for l in range(spec.n_layers):
            if l not in predicted:
                layers.append(FullLayer(l))
                continue
            layer = PredictedLayer(l, self.key_maps[l], self.value_maps[l], self.key_bases[l, :, :, :key_rank],
                                   self.value_bases[l, :, :, :value_rank], rotary=rotary(l),
                                   source_rotary=rotary(l - 1), sinks=self.sinks)
            layer.source = layers[l - 1]
            if isinstance(layers[l - 1], PredictedLayer):
                layers[l - 1].feeds_next = True
            layers.append(layer)
        return KVLabCache(layers)

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        raise RuntimeError("CrossLayer layers are linked to the layers below: build caches with new_cache(model)")

    def parameter_bytes(self, spec: ModelSpec) -> int:
        """Bytes of the maps and the used residual bases (fp32), held once per model, not per token."""
        key_rank, value_rank = self.ranks(spec)
        n_pred, width = len(self.predicted(spec)), spec.n_kv_heads * spec.head_dim
        per_map = (width + 1) * width if self.map == "layer" else spec.n_kv_heads * (spec.head_dim + 1) * spec.head_dim
        per_map = 0 if self.map == "none" else per_map
        return 4 * n_pred * (2 * per_map + spec.n_kv_heads * spec.head_dim * (key_rank + value_rank))

    # ---- persistence
    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        from . import artefacts

        if not self.fitted:
            raise RuntimeError("nothing to save: cross_layer has no maps yet (fit or prepare first)")
        if metrics:
            self.metrics.update(metrics)
        record = {"options": artefacts.jsonable_options(self.options()), "metrics": self.metrics,
                  "provenance": self.provenance}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        tensors = {"key_maps": self.key_maps, "value_maps": self.value_maps, "key_bases": self.key_bases,
                   "value_bases": self.value_bases}
        return artefacts.write(path, self.name, tensors, record)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "CrossLayer":
        import dataclasses

        from . import artefacts

        tensors, record = artefacts.read(path, cls.name)
        allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.repr}
        options = {k: v for k, v in record.get("options", {}).items() if k in allowed}
        method = cls(**{**options, **overrides, **tensors})
        method.metrics, method.provenance = record.get("metrics", {}), record.get("provenance", {})
        return method
