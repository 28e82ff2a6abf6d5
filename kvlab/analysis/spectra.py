"""Head-wise spectra of the KV cache: per (layer, kv head), the eigen-decomposition of the second moment of keys
(post-RoPE, what the cache stores), keys before RoPE and values over calibration text.

    from kvlab.analysis.spectra import head_spectra
    spec = head_spectra(model, ids, batch_size=8, skip_first=4)      # ids: (N, T) calibration token ids
    spec.eigenvalues["keys"]            # (L, H_kv, D) descending
    spec.eigenvectors["keys"]           # (L, H_kv, D, D) float32, columns = principal directions, descending
    spec.rank_for_energy("keys", 0.9)   # (L, H_kv) smallest r capturing 90 % of the energy
    U = spec.basis("keys", layer=3, head=1, rank=16)    # (D, 16): the PCA cache stores k @ U, reads (k @ U) @ U.T

What is accumulated (streaming, one batch at a time, nothing per token is kept), for every part, layer and kv head:

    S2 = sum_t w_t x_t x_t^T  (D, D)      S1 = sum_t w_t x_t  (D,)      W = sum_t w_t      n = #tokens

where ``w_t`` is 1 for every real token (padding excluded through the attention mask) or, with
``weighting="attention"``, the total attention token t receives (summed over all queries and over the query heads
of its GQA group; see :func:`received_attention`). Tokens at positions ``< skip_first`` of each sequence (the
attention sinks, whose keys and values have far larger norms than the rest and dominate uncentred moments) can be
left out. The matrix decomposed is the uncentred second moment ``S2 / W`` (``centered=False``, the default:
what a projection of the stored vectors has to preserve, since the cache stores x, not x - mean) or the
covariance ``S2 / W - m m^T`` with ``m = S1 / W`` (``centered=True``, what ``sklearn.decomposition.PCA`` uses).

Eigenvalues are therefore *per token* (mean squared projection, not summed over tokens); with ``centered=True``
they are the population variances (sklearn's ``explained_variance_`` is these times n / (n - 1)).
Eigenvectors are stored float32 with columns sorted by descending eigenvalue and a fixed sign (the
largest-magnitude entry of each column is positive), so ``U[:, :r]`` is the best rank-r projection in the mean
squared sense: the PCA method caches ``k @ U[:, :r]`` and reconstructs ``(k @ U[:, :r]) @ U[:, :r].T``.

Speed: one batched matmul per (layer, part) covers all kv heads of a batch (``(H, D, B*T) @ (H, B*T, D)``), in
float32 per batch, accumulated in float64 across batches. The forward passes of the model dominate the time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import padded_positions
from ..capturing import capture
from ..models import ModelSpec

PARTS: tuple[str, ...] = ("keys", "keys_pre", "values")
WEIGHTINGS: tuple[str | None, ...] = (None, "attention")
DEFAULT_PROBS_BYTES = 1 << 30  # attention probabilities held at once with weighting="attention"


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"unknown part(s) {bad or parts!r}; allowed: {', '.join(PARTS)}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"parts listed twice: {parts}")
    return parts


# --------------------------------------------------------------------------------------------------------------
# Streaming moments


@dataclass
class Moments:
    """Sums over tokens for one part, per (layer, kv head); float64. Add two with ``+`` (disjoint token sets).

    s2: (L, H, D, D) sum w x x^T · s1: (L, H, D) sum w x · weight: (L, H) sum w · count: (L, H) number of tokens
    with w > 0 counted (for unweighted moments weight == count).
    """

    s2: torch.Tensor
    s1: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, n_layers: int, n_heads: int, dim: int) -> "Moments":
        f64 = torch.float64
        return cls(torch.zeros(n_layers, n_heads, dim, dim, dtype=f64), torch.zeros(n_layers, n_heads, dim, dtype=f64),
                   torch.zeros(n_layers, n_heads, dtype=f64), torch.zeros(n_layers, n_heads, dtype=torch.long))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.s2 + other.s2, self.s1 + other.s1, self.weight + other.weight, self.count + other.count)

    def add(self, layer: int, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate ``x`` (B, H, T, D) with per-token ``weights`` (B, 1 or H, T) (0 = excluded) into ``layer``."""
        s2, s1, w, n = moment_update(x, weights)
        self.s2[layer] += s2
        self.s1[layer] += s1
        self.weight[layer] += w
        self.count[layer] += n

    def matrix(self, centered: bool = False) -> torch.Tensor:
        """The per-token second moment S2 / W, or the covariance S2 / W - m m^T when ``centered``: (L, H, D, D)."""
        empty = (self.weight <= 0).nonzero().tolist()
        if empty:
            raise ValueError(f"no tokens accumulated for (layer, head) {empty[:5]}{'...' if len(empty) > 5 else ''}")
        w = self.weight[..., None, None]
        m = self.s2 / w
        if centered:
            mean = self.s1 / self.weight[..., None]  # (L, H, D)
            m = m - mean[..., :, None] * mean[..., None, :]
        return 0.5 * (m + m.transpose(-1, -2))

    def mean(self) -> torch.Tensor:
        return self.s1 / self.weight[..., None]


def moment_update(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One batch's weighted sums for all heads at once.

    x: (B, H, T, D); weights: (B, 1 or H, T), float or bool (0 = token excluded).
    Returns s2 (H, D, D) float64, s1 (H, D) float64, weight (H,) float64, count (H,) long.

    One batched matmul over the (batch, head) pairs, ``(B*H, D, T) @ (B*H, T, D)``, straight on the captured
    tensor's memory (no gather of tokens); tokens are scaled by sqrt(w) first unless every weight is 1.
    """
    b, h, t, d = x.shape
    w = weights.to(torch.float32).expand(b, h, t)  # (B, H, T)
    xf = x.to(torch.float32)
    flat = xf.reshape(b * h, t, d)  # (B*H, T, D)
    scaled = flat if bool((w == 1).all()) else (xf * w.clamp(min=0).sqrt().unsqueeze(-1)).reshape(b * h, t, d)
    s2 = torch.bmm(scaled.transpose(1, 2), scaled).view(b, h, d, d).sum(0)  # (H, D, D)
    s1 = torch.bmm(w.reshape(b * h, 1, t), flat).view(b, h, d).sum(0)  # (H, D)
    return s2.double(), s1.double(), w.sum((0, 2)).double(), (w > 0).sum((0, 2))


def received_attention(probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Total attention each key receives, per kv head: probs (B, H, Q, K) -> (B, H_kv, K).

    Summed over every query and over the query heads of the key's GQA group (query head j reads kv head
    j // group, as ``repeat_interleave`` in transformers). Padding keys receive 0. A key is seen by the queries at
    or after it, so early tokens collect more (the accumulated-score bias); the first token, the sink, collects most.
    """
    b, h, q, k = probs.shape
    per_head = probs.sum(2)  # (B, H, K)
    return per_head.view(b, n_kv_heads, h // n_kv_heads, k).sum(2)  # (B, H_kv, K)


def _segments(skips: Sequence[int]) -> list[tuple[int, int | None]]:
    """Position ranges [lo, hi) between sorted skip values; the last one is open-ended."""
    edges = sorted(set(skips))
    return [(lo, hi) for lo, hi in zip(edges, edges[1:])] + [(edges[-1], None)]


def _accumulate_batch(moments: dict, part: str, layer: int, x: torch.Tensor, mask: torch.Tensor,
                      positions: torch.Tensor, first: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Add one layer's tensor ``x`` (B, H, T, D) to every position segment's moments.

    mask (B, T) real tokens; positions (B, T) = cumsum(mask) - 1; first (B,) column of each row's first real token;
    weights (B, H, T) or None. Bounded segments (the few sink positions) are gathered, not masked, so each costs
    a matmul over a handful of tokens rather than over the whole batch.
    """
    b, h, t, d = x.shape
    n_real = mask.sum(-1)  # (B,)
    for (lo, hi), per_part in moments.items():
        if hi is None:
            w = (mask.bool() & (positions >= lo)).unsqueeze(1).float()  # (B, 1, T)
            if weights is not None:
                w = w * weights
            per_part[part].add(layer, x, w)
            continue
        offs = torch.arange(lo, hi)  # positions wanted
        idx = (first[:, None] + offs[None]).clamp(max=t - 1)  # (B, n) columns
        valid = (offs[None] < n_real[:, None]).unsqueeze(1).float()  # (B, 1, n)
        xg = x.gather(2, idx[:, None, :, None].expand(b, h, len(offs), d))  # (B, H, n, D)
        if weights is not None:
            valid = valid * weights.gather(2, idx[:, None, :].expand(b, weights.shape[1], len(offs)))
        per_part[part].add(layer, xg, valid)


def checked_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """The (N, T) attention mask of (N, T) ``tokens`` (all ones if None), after checking shapes and batch size."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, T) token ids, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if attention_mask is None:
        return torch.ones_like(tokens)
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match tokens {tuple(tokens.shape)}")
    return attention_mask


def accumulate_moments(
    model,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    parts: Sequence[str] = PARTS,
    skip_first: int | Sequence[int] = 0,
    weighting: str | None = None,
    max_probs_bytes: int = DEFAULT_PROBS_BYTES,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[dict[tuple[int, int | None], dict[str, Moments]], dict[str, float]]:
    """Stream ``tokens`` (N, T) through ``model`` and accumulate the moments of ``parts``; see the module docstring.

    ``skip_first`` may list several values (e.g. ``(0, 4)``): the moments are then kept per position segment
    ``[s_i, s_{i+1})`` (last one open-ended), from one pass over the data, so spectra with and without the sinks
    cost one forward pass. Returns ({(lo, hi): {part: Moments}}, seconds by phase).

    With ``weighting="attention"`` the attention probabilities (B, H, T, T) of every layer are needed: rows are
    processed in micro-batches (and the layers in groups, for long sequences) so that at most ``max_probs_bytes``
    of probabilities exist at once; each extra group costs one more forward pass.

    ``dtype`` (e.g. ``torch.bfloat16``): run the forward passes on a copy of the model in that dtype (moments are
    still accumulated in float32/float64). The forward passes are nearly all of the time; bf16 made them 1.7x
    faster on this CPU (AVX512-BF16) at the cost of bf16 rounding in every layer, so it is opt-in.
    """
    parts = _check_parts(parts)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {WEIGHTINGS}")
    skips = (skip_first,) if isinstance(skip_first, int) else tuple(skip_first)
    if not skips or any(not isinstance(s, int) or s < 0 for s in skips):
        raise ValueError(f"skip_first must be a non-negative int or a sequence of them, got {skip_first!r}")
    attention_mask = checked_mask(tokens, attention_mask, batch_size)

    spec = ModelSpec.from_model(model)
    layers = list(range(spec.n_layers))
    segments = _segments(skips)
    moments = {seg: {p: Moments.zeros(spec.n_layers, spec.n_kv_heads, spec.head_dim) for p in parts}
               for seg in segments}
    base = getattr(model, "base_model", model)  # skip the LM head: only K/V are needed
    if dtype is not None and dtype != next(base.parameters()).dtype:
        import copy

        base = copy.deepcopy(base).to(dtype)
    what = tuple(parts) + (("probs",) if weighting == "attention" else ())

    n, t = tokens.shape
    layer_groups, rows = [layers], batch_size
    if weighting == "attention":
        per_layer = spec.n_heads * t * t * 4  # bytes of probabilities per sequence and layer
        per_group = max(1, max_probs_bytes // per_layer)
        layer_groups = [layers[i:i + per_group] for i in range(0, len(layers), per_group)]
        rows = max(1, min(batch_size, max_probs_bytes // (per_layer * len(layer_groups[0]))))

    seconds = {"forward": 0.0, "accumulate": 0.0}
    starts = range(0, n, rows)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="spectra", unit="batch")
    for start in starts:
        ids, mask = tokens[start:start + rows], attention_mask[start:start + rows]
        positions = padded_positions(mask)  # as capture() numbers them
        first = mask.long().argmax(-1)  # (B,) first real column (contiguous real tokens: left or right padding)
        for group in layer_groups:
            tic = time.perf_counter()
            cap = capture(base, ids, mask, what=what, layers=group)
            seconds["forward"] += time.perf_counter() - tic
            tic = time.perf_counter()
            with one_thread():
                _accumulate_capture(cap, group, parts, moments, mask, positions, first, weighting, spec.n_kv_heads)
            seconds["accumulate"] += time.perf_counter() - tic
            del cap
    return moments, seconds


def _accumulate_capture(cap, group, parts, moments, mask, positions, first, weighting, n_kv_heads) -> None:
    """Move one capture's tensors (layer by layer, freeing each) into the segment moments."""
    for layer in group:
        weights = None
        if weighting == "attention":
            weights = received_attention(cap.probs.pop(layer), n_kv_heads)  # (B, H_kv, T)
        for part in parts:
            x = getattr(cap, part).pop(layer)  # (B, H_kv, T, D)
            _accumulate_batch(moments, part, layer, x, mask, positions, first, weights)


# --------------------------------------------------------------------------------------------------------------
# Spectra


@contextmanager
def one_thread():
    """Run small ops (D x D eigh, per-batch X^T X with D = 64) on one intra-op thread. Measured on the 2-core CPU
    while other jobs ran: 20x (accumulation) to 100x (eigh) faster than two OpenMP threads, whose barriers stall
    when the cores are oversubscribed; without contention the loss is at most 2x on a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D, D) symmetric float64 -> eigenvalues (..., D) descending (clamped at 0), eigenvectors (..., D, D)
    with columns in the same order and the largest-|entry| of each column positive."""
    with one_thread():
        values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(-1).clamp(min=0), vectors.flip(-1)
    pivot = vectors.abs().argmax(-2, keepdim=True)  # (..., 1, D)
    sign = torch.sign(vectors.gather(-2, pivot))
    sign[sign == 0] = 1
    return values, vectors * sign


def save_tables(obj, path: str | Path) -> Path:
    """Write a dataclass whose tensor fields are {part: tensor} dicts as safetensors ("field.part" keys), its other
    fields as JSON in the file's metadata."""
    import json

    from safetensors.torch import save_file

    from ..atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    tensors = {f"{k}.{part}": t.contiguous() for k, v in values.items() if _is_table(v) for part, t in v.items()}
    rest = {k: v for k, v in values.items() if not _is_table(v)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"class": type(obj).__name__, "fields": json.dumps(rest)})
    return path


def load_tables(cls, path: str | Path):
    """The ``cls`` instance :func:`save_tables` wrote to ``path``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("class") != cls.__name__:
        raise ValueError(f"{path} holds a {meta.get('class')!r}, not a {cls.__name__}")
    fields_ = json.loads(meta["fields"])
    for key, tensor in load_file(str(path)).items():
        name, part = key.split(".", 1)
        fields_.setdefault(name, {})[part] = tensor
    return cls(**fields_)


def _is_table(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(t, torch.Tensor) for t in value.values())


@dataclass
class Spectra:
    """Per-part eigen-decompositions of the per-(layer, kv head) moments (see the module docstring).

    eigenvalues[part]: (L, H_kv, D) float64, descending; per token (mean squared projection on each direction).
    eigenvectors[part]: (L, H_kv, D, D) float32; ``eigenvectors[part][l, h][:, i]`` is the i-th principal direction.
    means[part]: (L, H_kv, D) weighted mean vectors (subtracted only when ``centered``).
    n_tokens: tokens accumulated per (layer, kv head), the same for every part.
    """

    eigenvalues: dict[str, torch.Tensor]
    eigenvectors: dict[str, torch.Tensor]
    means: dict[str, torch.Tensor]
    n_tokens: int
    centered: bool = False
    skip_first: int = 0
    weighting: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_moments(cls, moments: dict[str, Moments], *, centered: bool = False, skip_first: int = 0,
                     weighting: str | None = None, seconds: dict[str, float] | None = None) -> "Spectra":
        tic = time.perf_counter()
        values, vectors, means, counts = {}, {}, {}, set()
        for part, m in moments.items():
            values[part], vec = _eigh_descending(m.matrix(centered))
            vectors[part] = vec.float()
            means[part] = m.mean().float()
            counts.update(m.count.unique().tolist())
        seconds = dict(seconds or {})
        seconds["eigh"] = seconds.get("eigh", 0.0) + time.perf_counter() - tic
        n = max(counts) if counts else 0
        return cls(values, vectors, means, int(n), centered, skip_first, weighting, seconds)

    # ---- shapes and parts
    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.eigenvalues)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head_dim)."""
        return tuple(next(iter(self.eigenvalues.values())).shape)

    def _part(self, part: str) -> torch.Tensor:
        if part not in self.eigenvalues:
            allowed = self.parts if part in PARTS else PARTS
            raise ValueError(f"unknown part {part!r}; allowed: {', '.join(allowed)}"
                             + ("" if part not in PARTS else " (the others were not computed)"))
        return self.eigenvalues[part]

    # ---- summaries
    def energy(self, part: str) -> torch.Tensor:
        """(L, H_kv, D): fraction of the total energy (trace) captured by the top r directions, r = 1..D.

        Non-decreasing in r and exactly 1 at r = D (index -1). For ``centered=False`` energy is the mean squared
        norm, so 1 - energy[r-1] is the relative squared error of reconstructing the vectors from r dims."""
        values = self._part(part)
        total = values.sum(-1, keepdim=True).clamp(min=torch.finfo(values.dtype).tiny)
        energy = (values.cumsum(-1) / total).clamp(max=1.0)
        energy[..., -1] = 1.0
        return energy

    def effective_rank(self, part: str) -> torch.Tensor:
        """(L, H_kv): exp of the Shannon entropy of the normalised eigenvalues p_i = λ_i / Σ λ (Roy & Vetterli,
        2007). 1 when all energy is in one direction, D when it is spread evenly."""
        values = self._part(part)
        p = values / values.sum(-1, keepdim=True).clamp(min=torch.finfo(values.dtype).tiny)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
        return torch.exp(entropy).clamp(1.0, values.shape[-1])

    def rank_for_energy(self, part: str, fraction: float = 0.9) -> torch.Tensor:
        """(L, H_kv) long: the smallest r in 1..D whose top-r directions capture at least ``fraction`` of the energy."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        energy = self.energy(part)
        reached = energy >= fraction - 1e-12
        return reached.float().argmax(-1) + 1  # first index where reached; energy[..., -1] == 1 always reaches

    # ---- projections for compression methods
    def basis(self, part: str, layer: int, head: int, rank: int) -> torch.Tensor:
        """(D, rank) float32 orthonormal columns: the top-``rank`` principal directions of one head. The cache stores
        ``x @ U`` and reconstructs ``(x @ U) @ U.T``."""
        self._part(part)
        d = self.shape[-1]
        if not 1 <= rank <= d:
            raise ValueError(f"rank must be in 1..{d}, got {rank}")
        return self.eigenvectors[part][layer, head, :, :rank].contiguous()

    def projection(self, part: str, rank: int) -> torch.Tensor:
        """(L, H_kv, D, rank) float32: the same top-``rank`` bases for every head."""
        self._part(part)
        d = self.shape[-1]
        if not 1 <= rank <= d:
            raise ValueError(f"rank must be in 1..{d}, got {rank}")
        return self.eigenvectors[part][..., :rank].contiguous()

    def to_frame(self):
        """Tidy DataFrame: one row per (layer, head, part, rank) with the eigenvalue of that rank (1-based) and the
        energy fraction captured by the top ``rank`` directions."""
        import numpy as np
        import pandas as pd

        frames = []
        for part in self.parts:
            values, energy = self.eigenvalues[part].numpy(), self.energy(part).numpy()
            l, h, d = values.shape
            layer, head, rank = np.meshgrid(np.arange(l), np.arange(h), np.arange(1, d + 1), indexing="ij")
            frames.append(pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "part": part,
                                        "rank": rank.ravel(), "eigenvalue": values.ravel(),
                                        "energy": energy.ravel()}))
        return pd.concat(frames, ignore_index=True)

    def summary(self, fractions: Sequence[float] = (0.9,)) -> "object":
        """DataFrame, one row per part: mean/min/max over heads of the rank for each energy fraction, and of the
        effective rank."""
        import pandas as pd

        rows = []
        for part in self.parts:
            row = {"part": part}
            for f in fractions:
                r = self.rank_for_energy(part, f).double()
                row[f"rank@{f:g} mean"], row[f"rank@{f:g} min"], row[f"rank@{f:g} max"] = (
                    r.mean().item(), r.min().item(), r.max().item())
            e = self.effective_rank(part)
            row["effective rank mean"], row["effective rank min"], row["effective rank max"] = (
                e.mean().item(), e.min().item(), e.max().item())
            rows.append(row)
        return pd.DataFrame(rows).set_index("part")

    # ---- persistence
    def save(self, path: str | Path) -> Path:
        """Safetensors file with the tables; options and seconds in its metadata."""
        return save_tables(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "Spectra":
        return load_tables(cls, path)


def head_spectra(
    model,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    parts: Sequence[str] = PARTS,
    centered: bool = False,
    skip_first: int = 0,
    weighting: str | None = None,
    attention_mask: torch.Tensor | None = None,
    max_probs_bytes: int = DEFAULT_PROBS_BYTES,
    progress: bool = False,
) -> Spectra:
    """Spectra of ``parts`` per (layer, kv head) over ``tokens`` (N, T); see the module docstring for the maths.

    parts: any of "keys" (post-RoPE, what the cache stores), "keys_pre" (before RoPE; after the key norm for
    models that have one), "values". ``skip_first``: leave out positions < skip_first of every sequence (the
    sinks). ``weighting="attention"``: weight tokens by the attention they receive (needs the attention
    probabilities; memory bounded by ``max_probs_bytes``). To get several ``skip_first`` values or both centred and
    uncentred spectra from one pass, use :func:`accumulate_moments` and :meth:`Spectra.from_moments`.
    """
    if not isinstance(skip_first, int):
        raise ValueError(f"skip_first must be an int here (use accumulate_moments for several), got {skip_first!r}")
    tic = time.perf_counter()
    moments, seconds = accumulate_moments(model, tokens, batch_size=batch_size, attention_mask=attention_mask,
                                          parts=parts, skip_first=skip_first, weighting=weighting,
                                          max_probs_bytes=max_probs_bytes, progress=progress)
    spectra = Spectra.from_moments(moments[(skip_first, None)], centered=centered, skip_first=skip_first,
                                   weighting=weighting, seconds=seconds)
    spectra.seconds["total"] = time.perf_counter() - tic
    return spectra


def combine(moments: dict[tuple[int, int | None], dict[str, Moments]], skip_first: int) -> dict[str, Moments]:
    """Moments of every position >= ``skip_first`` from the segments :func:`accumulate_moments` returned."""
    chosen = [seg for seg in moments if seg[0] >= skip_first]
    if not chosen or min(seg[0] for seg in chosen) != skip_first:
        raise ValueError(f"skip_first={skip_first} is not a segment boundary; available: "
                         f"{sorted(seg[0] for seg in moments)}")
    out = {}
    for part in moments[chosen[0]]:
        total = moments[chosen[0]][part]
        for seg in chosen[1:]:
            total = total + moments[seg][part]
        out[part] = total
    return out


def merge(*results: dict[tuple[int, int | None], dict[str, Moments]]) -> dict[tuple[int, int | None], dict[str, Moments]]:
    """Add the moments of several :func:`accumulate_moments` runs over disjoint data (same segments and parts)."""
    first = results[0]
    for other in results[1:]:
        if set(other) != set(first) or any(set(other[seg]) != set(first[seg]) for seg in first):
            raise ValueError("cannot merge moments with different segments or parts")
    return {seg: {part: sum((r[seg][part] for r in results[1:]), first[seg][part]) for part in first[seg]}
            for seg in first}

