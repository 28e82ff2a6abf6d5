"""Cross-layer shared bases (layer axis, xKV-style subspace sharing): one basis per group of adjacent layers.

Aligned heads of adjacent layers hardly match (cosine ~0), but their subspaces overlap (linear CKA .3-.65): share the
subspace, not the entries. Layers are cut into consecutive groups of ``group`` layers (the last group may be shorter);
for each group and kv head there is one orthonormal key basis (on pre-RoPE keys, ``keys="pre_rope"``, the default on
RoPE models) and one value basis: the eigenvectors of the group's summed calibration second moments (positions <
``sinks`` left out). Every layer stores its own codes c = B^T k_pre (B, H_kv, T, r) and reads k = R(p) B c (the rotary
of each cached position; with ``keys="post_rope"`` the codes are of the cached keys and no rotation is needed), and
v = B_v c_v. ``group=1`` is per-layer PCA of pre-RoPE keys and values (uncentred, unweighted).

Bytes: codes (``key_rank`` + ``value_rank`` per kv head and token) + one int32 position per token with pre-RoPE keys +
full-size copies of the first ``sinks`` positions. The bases are model parameters, held once per group:
:meth:`SharedBasis.parameter_bytes` (the saving over per-layer bases is what sharing buys). With ``budget`` b and no
ranks, key_rank = value_rank = round(b D); ``key_rank`` alone: value_rank = round(2 b D) - key_rank.

The fitted tensor is the per-(layer, kv head) second moments, so every group size and rank is served by one fit.

    shared = SharedBasis(budget=0.5, group=4).prepare(model, tok)
    with shared.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .. import attention
from ..cache.base import KVLabCache
from ..models import ModelSpec
from .base import Method
from ..cache.coded import CodedLayer

KEY_MODES = ("pre_rope", "post_rope")


class BasisLayer(CodedLayer):
    """Stores key codes (B, H_kv, T, r_k) on ``key_basis`` (H_kv, D, r_k) (of pre-RoPE keys when ``rotary`` is
    given) and value codes on ``value_basis``; reads B c, rotated back to each cached position."""

    def __init__(self, layer_idx: int, key_basis: torch.Tensor, value_basis: torch.Tensor, *, rotary=None,
                 sinks: int = 0):
        super().__init__(layer_idx, sinks)
        self.key_basis, self.value_basis, self.rotary = key_basis, value_basis, rotary
        self.key_codes = self.value_codes = None  # (B, H_kv, T, r)
        self.positions = None  # (B, T) int32, only with pre-RoPE keys

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.key_basis, self.value_basis, rotary=self.rotary, sinks=self.sinks)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if tuple(self.key_basis.shape[:2]) != tuple(key_states.shape[1::2]):
            raise ValueError(f"layer {self.layer_idx}: bases for (kv heads, head_dim) = "
                             f"{tuple(self.key_basis.shape[:2])}, the model gives {tuple(key_states.shape[1::2])}")

    def _append_codes(self, keys, values) -> None:
        if self.rotary is not None:
            keys = self.rotary.unrotate(keys, self.positions[:, self.length :].long())
        k = torch.einsum("bhtd,hdr->bhtr", keys, self.key_basis.to(keys.dtype))  # (B, H_kv, T_new, r_k)
        v = torch.einsum("bhtd,hdr->bhtr", values, self.value_basis.to(values.dtype))
        cat = lambda old, add: add.contiguous() if old is None else torch.cat([old, add], dim=-2)
        self.key_codes, self.value_codes = cat(self.key_codes, k), cat(self.value_codes, v)

    def _decode_all(self):
        keys = self.key_codes @ self.key_basis.to(self.key_codes.dtype).transpose(1, 2)  # (B, H_kv, T, D)
        values = self.value_codes @ self.value_basis.to(self.value_codes.dtype).transpose(1, 2)
        if self.rotary is not None:
            keys = self.rotary.rotate(keys, self.positions.long())
        return keys, values

    def attend(self, query, key, value, mask, *, scaling, position_ids=None, **kwargs):
        if self._pending is not None and self.rotary is not None:
            batch, _, new, _ = self._pending[0].shape
            if position_ids is None:
                position_ids = torch.arange(self.length, self.length + new, device=query.device)[None]
            pos = position_ids.expand(batch, new).to(torch.int32)
            self.positions = pos.contiguous() if self.positions is None else torch.cat([self.positions, pos], -1)
        return super().attend(query, key, value, mask, scaling=scaling, position_ids=position_ids, **kwargs)

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
        return rows

    def _select_codes(self, indices) -> None:
        self.key_codes, self.value_codes = self.key_codes[indices], self.value_codes[indices]
        if self.positions is not None:
            self.positions = self.positions[indices]


@dataclass
class SharedBasis(Method):
    """One key and one value basis per (group of adjacent layers, kv head); per-layer codes (see the module docstring).

    Fitted tensor: ``moments`` (L, H_kv, 2, D, D) float64 second moments of keys (pre- or post-RoPE) and values.
    """

    name: ClassVar[str] = "shared_basis"
    axes: ClassVar[tuple[str, ...]] = ("layer", "feature")

    budget: float = 0.5
    group: int = 2  # adjacent layers per shared basis; 1 = per-layer bases
    key_rank: int | None = None
    value_rank: int | None = None
    keys: str | None = None  # "pre_rope" / "post_rope"; None: pre_rope on RoPE models
    sinks: int = 4
    corpus: str = "wiki"
    calib_chunks: int = 16
    chunk_len: int = 512
    moments: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if int(self.group) != self.group or self.group < 1:
            raise ValueError(f"group must be an integer >= 1 (adjacent layers per basis), got {self.group}")
        if self.keys is not None and self.keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {', '.join(KEY_MODES)} (or None: pre_rope on RoPE models), got "
                             f"{self.keys!r}")
        for what in ("key_rank", "value_rank"):
            r = getattr(self, what)
            if r is not None and (int(r) != r or r < 1):
                raise ValueError(f"{what} must be an integer >= 1 (dims per kv head), got {r}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        self.metrics: dict = getattr(self, "metrics", None) or {}
        self.provenance: dict = getattr(self, "provenance", None) or {}

    def key_mode(self, spec: ModelSpec) -> str:
        mode = self.keys or ("pre_rope" if spec.rope else "post_rope")
        if mode == "pre_rope" and not spec.rope:
            raise ValueError(f"keys='pre_rope' needs a model with rotary position embedding; {spec.arch} has none: "
                             "use keys='post_rope'")
        return mode

    def groups(self, spec: ModelSpec) -> list[list[int]]:
        if self.group > spec.n_layers:
            raise ValueError(f"group {self.group} is larger than the model's {spec.n_layers} layers; allowed: "
                             f"1..{spec.n_layers}")
        return [list(range(s, min(s + self.group, spec.n_layers))) for s in range(0, spec.n_layers, self.group)]

    def ranks(self, spec: ModelSpec) -> tuple[int, int]:
        dim = spec.head_dim
        pool = round(2 * self.budget * dim)
        if self.key_rank is None and self.value_rank is None:
            key = value = max(1, round(self.budget * dim))
        else:
            key = self.key_rank if self.key_rank is not None else pool - self.value_rank
            value = self.value_rank if self.value_rank is not None else pool - self.key_rank
        for what, r in (("key_rank", key), ("value_rank", value)):
            if not 1 <= r <= dim:
                raise ValueError(f"{what} {r} is out of range: ranks must be in 1..{dim} (head_dim) "
                                 f"(budget {self.budget})")
        return int(key), int(value)

    def check(self, spec: ModelSpec) -> None:
        """ValueError if the options cannot work on the model (key mode, group size, ranks, a fit of another mode)."""
        mode = self.key_mode(spec)
        self.groups(spec)
        self.ranks(spec)
        fitted_mode = self.provenance.get("keys")
        if self.fitted and fitted_mode is not None and fitted_mode != mode:
            raise ValueError(f"the bases were fitted on {fitted_mode} keys, the method is set to keys={mode!r}: refit "
                             f"or set keys={fitted_mode!r}")

    @property
    def fitted(self) -> bool:
        return self.moments is not None

    @torch.no_grad()
    def fit(self, model, calib: torch.Tensor, batch: int = 4) -> "SharedBasis":
        """Second moments of keys and values per (layer, kv head) over calibration token ids ``calib`` (N, T)."""
        from ..capturing import capture

        spec = ModelSpec.from_model(model)
        mode = self.key_mode(spec)
        if calib.shape[1] <= self.sinks:
            raise ValueError(f"calibration chunks of {calib.shape[1]} tokens leave nothing after {self.sinks} sinks")
        L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
        moments = torch.zeros(L, H, 2, D, D, dtype=torch.float64)
        key_name = "keys_pre" if mode == "pre_rope" else "keys"
        tic = time.perf_counter()
        for start in range(0, len(calib), batch):
            cap = capture(model, calib[start : start + batch], what=(key_name, "values"))
            for l in range(L):
                for p, x in enumerate((getattr(cap, key_name)[l], cap.values[l])):
                    x = x[:, :, self.sinks :].double()  # (B, H_kv, T, D)
                    moments[l, :, p] += torch.einsum("bhtd,bhte->hde", x, x)
        self.moments = moments
        self.provenance = {"calib_shape": list(calib.shape), "tokens": int(calib.numel()), "keys": mode,
                           "sinks_skipped": self.sinks, "seconds": round(time.perf_counter() - tic, 1)}
        return self

    def prepare(self, model, tokenizer) -> "SharedBasis":
        if not self.fitted:
            from ..data import text_chunks

            self.fit(model, text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks,
                                        split="calib"))
        return self

    def bases(self, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, H_kv, D, D) key and value bases, columns by the group's energy (layers of one group share them)."""
        if not self.fitted:
            raise RuntimeError("SharedBasis has no moments yet: call .fit(model, calib_ids) or .prepare(model, tok)")
        out = torch.empty(2, *self.moments.shape[:2], *self.moments.shape[-2:])  # (2, L, H_kv, D, D)
        for layers in self.groups(spec):
            summed = self.moments[layers].sum(0)  # (H_kv, 2, D, D)
            _, vectors = torch.linalg.eigh(summed)
            out[:, layers] = vectors.flip(-1).float().transpose(0, 1)[:, None]  # (2, 1, H_kv, D, D)
        return out[0], out[1]

    def energy(self, spec: ModelSpec) -> dict:
        """Fraction of each layer's calibration energy its group's top key_rank / value_rank columns keep (mean)."""
        key_rank, value_rank = self.ranks(spec)
        kb, vb = self.bases(spec)
        kept = {}
        for p, (b, r) in enumerate(((kb, key_rank), (vb, value_rank))):
            m = self.moments[:, :, p].float()  # (L, H, D, D)
            top = b[..., :r]
            kept["KV"[p]] = float((torch.einsum("lhdr,lhde,lher->lh", top, m, top) /
                                   m.diagonal(dim1=-2, dim2=-1).sum(-1)).mean())
        return kept

    def new_cache(self, model):
        from ..rope import Rotary

        spec = ModelSpec.from_model(model)
        self.check(ModelSpec.from_model(model))
        if not self.fitted:
            raise RuntimeError("SharedBasis has no moments yet: call .fit(model, calib_ids) or .prepare(model, tok)")
        if tuple(self.moments.shape[:2]) + (self.moments.shape[-1],) != (spec.n_layers, spec.n_kv_heads,
                                                                          spec.head_dim):
            raise ValueError(f"fitted for (layers, kv heads, head_dim) = {tuple(self.moments.shape[:2])}, "
                             f"{self.moments.shape[-1]}; the model has {(spec.n_layers, spec.n_kv_heads, spec.head_dim)}")
        key_rank, value_rank = self.ranks(spec)
        kb, vb = self.bases(spec)
        pre = self.key_mode(spec) == "pre_rope"
        return KVLabCache([BasisLayer(l, kb[l, :, :, :key_rank].contiguous(), vb[l, :, :, :value_rank].contiguous(),
                                      rotary=Rotary.from_model(model, l) if pre else None, sinks=self.sinks)
                           for l in range(spec.n_layers)])

    def make_layer(self, layer_idx: int, spec: ModelSpec):
        raise RuntimeError("SharedBasis layers need the model's rotary: build caches with new_cache(model)")

    def parameter_bytes(self, spec: ModelSpec) -> int:
        """fp32 bytes of the used basis columns, one set per group (the sharing saving is against group=1)."""
        key_rank, value_rank = self.ranks(spec)
        return 4 * len(self.groups(spec)) * spec.n_kv_heads * spec.head_dim * (key_rank + value_rank)

    def save(self, path: str | Path, model=None, metrics: dict | None = None) -> Path:
        from . import artefacts

        if not self.fitted:
            raise RuntimeError("nothing to save: shared_basis has no moments yet (fit or prepare first)")
        if metrics:
            self.metrics.update(metrics)
        record = {"options": artefacts.jsonable_options(self.options()), "metrics": self.metrics,
                  "provenance": self.provenance}
        if model is not None:
            record["model"] = artefacts.model_fingerprint(model)
        return artefacts.write(path, self.name, {"moments": self.moments}, record)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "SharedBasis":
        import dataclasses

        from . import artefacts

        tensors, record = artefacts.read(path, cls.name)
        allowed = {f.name for f in dataclasses.fields(cls) if f.init and f.repr}
        options = {k: v for k, v in record.get("options", {}).items() if k in allowed}
        method = cls(**{**options, **overrides, **tensors})
        method.metrics, method.provenance = record.get("metrics", {}), record.get("provenance", {})
        return method
