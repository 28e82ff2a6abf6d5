"""Cross-layer similarity of the KV cache: per kv head, how alike the keys (post-RoPE, what the cache stores) and the
values of every pair of layers are over calibration text. The measurement behind KV-CAR's cross-layer reuse
(:class:`kvlab.methods.reuse.Reuse`).

    from kvlab.analysis.similarity import layer_similarity
    sim = layer_similarity(model, ids, batch_size=8, skip_first=4)   # ids: (N, T) calibration token ids
    sim.cka["keys"]                  # (H_kv, L, L) linear CKA between layers, per kv head
    sim.cosine["values"]             # (H_kv, L, L) mean cosine of aligned tokens
    sim.adjacent("keys", "cka")      # (L - 1, H_kv): row i is layer i + 1 against layer i
    sim.reuse_candidates(0.9)        # (L, H_kv) bool: heads whose K and V are both that close to the layer below

Two metrics, for every part, kv head h and pair of layers (l, m), over the same tokens t (same position, same row):

* ``cosine``: mean over tokens of cos(x_l,h,t, x_m,h,t). Sensitive to rotations of the feature space: it says
  whether layer m's *entry itself* could stand in for layer l's, which is what reuse does.
* ``cka``: linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019)
  between the (tokens x D) matrices X = x_l,h and Y = x_m,h with centred columns,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` in [0, 1]; invariant to orthogonal transforms and isotropic
  scaling of either side, so it says whether the two layers carry the same *information* (up to a rotation).

Streaming (nothing per token is kept across batches): per part and kv head the cross-covariance of all layers'
features at once, ``Z^T Z`` with Z = [x_0 | x_1 | ... | x_{L-1}] (tokens x L*D), whose D x D blocks are the X^T Y
of every pair; plus the column sums and the summed cosines. Features are shifted by the first batch's mean before
the float32 per-batch matmul (a covariance is shift-invariant; the shift avoids cancellation where means are large,
as for keys) and accumulated in float64. Cost per token: L^2 D^2 H multiply-adds, e.g. ~1.1 M for SmolLM2 (30
layers, 3 kv heads, D = 64), well below the forward pass. Memory: H (L D)^2 float64 per part (88 MB for SmolLM2).
Tokens at positions ``< skip_first`` of each sequence (attention sinks) and padding are left out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import padded_positions
from ..capturing import capture
from ..models import ModelSpec

PARTS: tuple[str, ...] = ("keys", "values")
METRICS: tuple[str, ...] = ("cka", "cosine")
RANGES: dict[str, tuple[float, float]] = {"cka": (0.0, 1.0), "cosine": (-1.0, 1.0)}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return metric


# --------------------------------------------------------------------------------------------------------------
# Plain functions on matrices (the truth the streaming statistics are tested against)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between the rows of ``x`` (..., N, D) and ``y`` (..., N, D'): (...,) in [0, 1], in float64.

    Columns are centred; ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` (Kornblith et al. 2019, eq. for linear CKA in
    feature space). NaN when either side has no variance.
    """
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same rows (..., N, D)")
    x = x.double() - x.double().mean(-2, keepdim=True)
    y = y.double() - y.double().mean(-2, keepdim=True)
    cross = (y.transpose(-1, -2) @ x).pow(2).sum((-1, -2))
    xx = torch.linalg.matrix_norm(x.transpose(-1, -2) @ x)
    yy = torch.linalg.matrix_norm(y.transpose(-1, -2) @ y)
    return cross / (xx * yy)


def aligned_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over rows of the cosine between row t of ``x`` and row t of ``y`` (both (..., N, D)): (...,) float64."""
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape (..., N, D)")
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1, eps=eps).mean(-1)


# --------------------------------------------------------------------------------------------------------------
# Streaming statistics


@dataclass
class SimilarityStats:
    """Sums over tokens for one part, all layer pairs and kv heads at once; add batches with :meth:`add`.

    cross: (H, L*D, L*D) float64, sum of (z - shift)(z - shift)^T with z = the L layers' features side by side.
    sums: (H, L*D) float64, sum of (z - shift). shift: (H, L*D) float32, the first batch's mean.
    cos: (H, L, L) float64, summed cosines of aligned tokens. count: tokens added.
    """

    n_layers: int
    n_heads: int
    dim: int
    cross: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate ``x`` (N, L, H, D): N tokens, each with its features in every layer and kv head."""
        n, layers, heads, dim = x.shape
        if (layers, heads, dim) != (self.n_layers, self.n_heads, self.dim):
            raise ValueError(f"x has (layers, heads, D) = {(layers, heads, dim)}, the statistics were made for "
                             f"{(self.n_layers, self.n_heads, self.dim)}")
        if n == 0:
            return
        x = x.float()
        z = x.permute(2, 0, 1, 3).reshape(heads, n, layers * dim)  # (H, N, L*D)
        if self.shift is None:
            self.shift = z.mean(1)  # (H, L*D)
            size = layers * dim
            self.cross = torch.zeros(heads, size, size, dtype=torch.float64)
            self.sums = torch.zeros(heads, size, dtype=torch.float64)
            self.cos = torch.zeros(heads, layers, layers, dtype=torch.float64)
        z = z - self.shift[:, None]
        self.cross += torch.bmm(z.transpose(1, 2), z).double()  # (H, L*D, L*D)
        self.sums += z.sum(1).double()
        unit = x.double() / x.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, L, H, D); float64: cheap
        self.cos += torch.einsum("nlhd,nmhd->hlm", unit, unit)
        self.count += n

    def _check(self) -> None:
        if self.count < 2:
            raise ValueError(f"similarity needs at least 2 tokens, got {self.count}")

    def covariance_blocks(self) -> torch.Tensor:
        """(H, L, D, L, D) float64: the centred cross-covariance (per token) of every pair of layers."""
        self._check()
        mean = self.sums / self.count  # (H, L*D), of the shifted features
        cov = self.cross / self.count - mean[:, :, None] * mean[:, None, :]
        h, l, d = self.n_heads, self.n_layers, self.dim
        return cov.view(h, l, d, l, d)

    def cka(self) -> torch.Tensor:
        """(H, L, L) linear CKA of every pair of layers; NaN where a layer's head has no variance."""
        frob2 = self.covariance_blocks().pow(2).sum((2, 4))  # (H, L, L): ||X_l^T X_m||_F^2
        diag = frob2.diagonal(dim1=1, dim2=2).sqrt()  # (H, L): ||X_l^T X_l||_F
        return (frob2 / (diag[:, :, None] * diag[:, None, :])).clamp(max=1.0)

    def cosine(self) -> torch.Tensor:
        """(H, L, L) mean cosine of aligned tokens."""
        self._check()
        return (self.cos / self.count).clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Result


@dataclass(repr=False)
class LayerSimilarity:
    """Similarity of every pair of layers per kv head, for each part ("keys" post-RoPE, "values").

    cosine[part], cka[part]: (H_kv, L, L) float64, symmetric, 1 on the diagonal (up to float error).
    n_tokens: tokens per (layer, kv head) the statistics cover; skip_first: sink positions left out.
    """

    cosine: dict[str, torch.Tensor]
    cka: dict[str, torch.Tensor]
    n_tokens: int
    skip_first: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        layers, heads = self.shape
        return (f"LayerSimilarity(layers={layers}, kv_heads={heads}, parts={self.parts}, n_tokens={self.n_tokens}, "
                f"skip_first={self.skip_first})")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.cka)

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, kv heads)."""
        h, l, _ = next(iter(self.cka.values())).shape
        return l, h

    def metric(self, metric: str, part: str) -> torch.Tensor:
        """(H_kv, L, L) of ``metric`` ("cka", "cosine") for ``part`` ("keys", "values")."""
        table = getattr(self, check_metric(metric))
        if part not in table:
            raise ValueError(f"unknown part {part!r}; allowed: {', '.join(self.parts)}")
        return table[part]

    def adjacent(self, part: str = "both", metric: str = "cka") -> torch.Tensor:
        """(L - 1, H_kv): similarity of layer l to layer l - 1 for l = 1..L-1 (row i is layer i + 1).

        ``part="both"``: the smaller of the keys' and the values' similarity (a head is reused only as a whole)."""
        if part == "both":
            return torch.minimum(*(self.adjacent(p, metric) for p in PARTS))
        m = self.metric(metric, part)
        return m.diagonal(offset=-1, dim1=1, dim2=2).T.contiguous()  # (H, L-1) -> (L-1, H)

    def reuse_candidates(self, threshold: float, metric: str = "cka", part: str = "both") -> torch.Tensor:
        """(L, H_kv) bool: True where layer l >= 1's head is at least ``threshold`` similar to layer l - 1's.
        Layer 0 is never a candidate (nothing below it)."""
        low, high = RANGES[check_metric(metric)]
        if not low <= threshold <= high:
            raise ValueError(f"threshold for metric {metric!r} must be in [{low:g}, {high:g}], got {threshold}")
        scores = self.adjacent(part, metric).nan_to_num(nan=-float("inf"))
        out = torch.zeros(self.shape, dtype=torch.bool)
        out[1:] = scores >= threshold
        return out

    def to_frame(self):
        """Tidy DataFrame: one row per (part, head, layer, other) with columns cosine and cka."""
        import numpy as np
        import pandas as pd

        frames = []
        for part in self.parts:
            h, l, _ = self.cka[part].shape
            head, layer, other = np.meshgrid(np.arange(h), np.arange(l), np.arange(l), indexing="ij")
            frames.append(pd.DataFrame({"part": part, "head": head.ravel(), "layer": layer.ravel(),
                                        "other": other.ravel(), "cosine": self.cosine[part].numpy().ravel(),
                                        "cka": self.cka[part].numpy().ravel()}))
        return pd.concat(frames, ignore_index=True)

    # ---- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map ("cka.keys", "cosine.values", ...) for safetensors."""
        return {f"{m}.{p}": getattr(self, m)[p] for m in METRICS for p in self.parts}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **fields_) -> "LayerSimilarity":
        tables = {m: {k.split(".", 1)[1]: v.double() for k, v in tensors.items() if k.startswith(m + ".")}
                  for m in METRICS}
        if not tables["cka"] or set(tables["cka"]) != set(tables["cosine"]):
            raise ValueError(f"similarity tensors must hold cka.<part> and cosine.<part> for the same parts, got "
                             f"{sorted(tensors)}")
        return cls(tables["cosine"], tables["cka"], **{"n_tokens": 0, **fields_})

    def save(self, path: str | Path) -> Path:
        """Safetensors file with the tables; n_tokens, skip_first and seconds in its metadata."""
        from .spectra import save_tables

        return save_tables(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "LayerSimilarity":
        from .spectra import load_tables

        return load_tables(cls, path)


# --------------------------------------------------------------------------------------------------------------
# Measurement


def _selected_tokens(cap, part: str, n_layers: int, keep: torch.Tensor) -> torch.Tensor:
    """(N, L, H, D) features of the kept tokens (``keep`` (B, T) bool), every layer, popping them from ``cap``."""
    store = getattr(cap, part)
    per_layer = []
    for layer in range(n_layers):
        x = store.pop(layer)  # (B, H, T, D)
        per_layer.append(x.transpose(1, 2)[keep])  # (N, H, D)
    return torch.stack(per_layer, 1)  # (N, L, H, D)


@torch.no_grad()
def layer_similarity(
    model,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    parts: Sequence[str] = PARTS,
    skip_first: int = 0,
    progress: bool = False,
) -> LayerSimilarity:
    """Cosine and linear CKA between every pair of layers, per kv head, over ``tokens`` (N, T).

    parts: "keys" (post-RoPE) and/or "values". ``skip_first``: leave out positions < skip_first of every sequence
    (the attention sinks). Padding (``attention_mask`` 0) is left out. See the module docstring for the maths.
    """
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be distinct names from {', '.join(PARTS)}, got {parts!r}")
    if not isinstance(skip_first, int) or skip_first < 0:
        raise ValueError(f"skip_first must be a non-negative int, got {skip_first!r}")
    from .spectra import one_thread, checked_mask

    attention_mask = checked_mask(tokens, attention_mask, batch_size)

    spec = ModelSpec.from_model(model)
    stats = {p: SimilarityStats(spec.n_layers, spec.n_kv_heads, spec.head_dim) for p in parts}
    base = getattr(model, "base_model", model)  # skip the LM head: only K/V are needed
    seconds = {"forward": 0.0, "accumulate": 0.0}
    tic_total = time.perf_counter()
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="similarity", unit="batch")
    for start in starts:
        ids, mask = tokens[start:start + batch_size], attention_mask[start:start + batch_size]
        keep = mask.bool() & (padded_positions(mask) >= skip_first)  # (B, T)
        tic = time.perf_counter()
        cap = capture(base, ids, mask, what=parts)
        seconds["forward"] += time.perf_counter() - tic
        tic = time.perf_counter()
        with one_thread():
            for part in parts:
                stats[part].add(_selected_tokens(cap, part, spec.n_layers, keep))
        seconds["accumulate"] += time.perf_counter() - tic
        del cap
    n_tokens = stats[parts[0]].count
    if n_tokens < 2:
        raise ValueError(f"only {n_tokens} token(s) left after padding and skip_first={skip_first}: similarity "
                         "needs at least 2; pass longer sequences or a smaller skip_first")
    tic = time.perf_counter()
    cosine = {p: s.cosine() for p, s in stats.items()}
    cka = {p: s.cka() for p, s in stats.items()}
    seconds["finish"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - tic_total
    return LayerSimilarity(cosine, cka, n_tokens, skip_first, seconds)
