"""MatryoshkaKV: trainable orthogonal projections of keys and values, one matrix serving every budget.

Paper: Lin et al., "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection" (ICLR 2025,
arXiv:2410.14731). Same cache as :class:`~kvlab.methods.pca.PCA` (per (layer, kv head) the cache stores
k @ U[:, :r] and v @ W[:, :r], sinks at full rank; see :class:`~kvlab.cache.projected.ProjectedLayer`), but
U and W are full D x D orthogonal matrices, initialised from PCA's eigenvectors and trained by distillation from
the full-cache model (:func:`kvlab.fit.train.distill`: 0.25 KL(teacher || student) + 0.75 CE, as the official code).
Columns stay ordered by importance, so truncating one trained matrix to its first r columns serves any budget.

Orthogonal parametrisation (per (layer, kv head), keys and values alike; shapes (L, H_kv, D, D)):

    U = U0 @ cayley(A),   cayley(A) = (I - S/2)^-1 (I + S/2),   S = A - A^T (skew-symmetric),   A = 0 at the start

U0 is the PCA basis (a fixed buffer), A the trainable parameter. Why this form: the Cayley map is the one the
official code uses and one batched ``linalg.solve`` covers every head; U is orthogonal to float precision at every
step (no re-orthogonalisation, no drift), and since A = 0 gives cayley(A) = I training starts *exactly* at PCA,
whatever the sign of det(U0) (a bare Cayley or exponential map reaches only rotations, det = +1, and needs an
inverse map to start from a given matrix; ``torch.nn.utils.parametrizations.orthogonal`` would do the same
"base times map" internally but ties the state to a module's weight and its state_dict layout). Near A = 0 the map
is well conditioned, which is where a short fine-tune stays.

Training schedules (``schedule``):

* ``"matryoshka"`` (the paper): every step, a rank for every (layer, kv head) and separately for keys and values is
  drawn uniformly from the set ``train_ranks`` (default the eighths {D/8, ..., D}; the official code draws
  ``32 * randint(1, 5)`` for D = 128, i.e. quarters, but a per-head rank search here works on a grid of D/8);
  one student pass. Independent draws per head mean every prefix of every
  matrix is trained and heads learn to work next to neighbours at other ranks (what a later per-head rank search
  produces).
* ``"starbucks"``: a fixed list of ranks, small to large (default {D/4, D/2, 3D/4}; full rank is exact whatever
  the basis, so it would add compute and no gradient), uniform over heads; every step sums the loss over all of them.
* ``"fixed"``: plain distillation at the method's own ranks (``budget`` or ``key_ranks``/``value_ranks``).

Evaluation uses the trained, frozen bases (``key_bases``/``value_bases``, no grad) at the method's ranks; change
the budget without retraining with :meth:`MatryoshkaKV.with_budget`. Save/load: safetensors + a JSON provenance
record beside it (never pickle).

    press = MatryoshkaKV(budget=0.5, sinks=4).fit(model, calib, steps=100, train_data=chunks_256)
    press.save("runs/matryoshka.safetensors"); press = MatryoshkaKV.load("runs/matryoshka.safetensors")
    quarter = press.with_budget(0.25)       # same matrices, first D/4 columns
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from ..cache.base import KVLabCache
from ..models import ModelSpec
from . import artefacts
from .pca import PCA
from ..cache.projected import ProjectedLayer

SCHEDULES = ("matryoshka", "starbucks", "fixed")


def cayley(a: torch.Tensor) -> torch.Tensor:
    """(..., D, D) -> orthogonal (..., D, D): (I - S/2)^-1 (I + S/2) with S = a - a^T; the identity at a = 0."""
    s = a - a.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - 0.5 * s, eye + 0.5 * s)


class OrthogonalBases(torch.nn.Module):
    """Trainable orthogonal key and value bases: ``forward() -> (U, W)``, each (L, H_kv, D, D) = base @ cayley(A)."""

    def __init__(self, key_init: torch.Tensor, value_init: torch.Tensor):
        super().__init__()
        for what, t in (("key_init", key_init), ("value_init", value_init)):
            if t.ndim != 4 or t.shape[-1] != t.shape[-2]:
                raise ValueError(f"{what} must be (layers, kv heads, D, D), got {tuple(t.shape)}")
        self.register_buffer("key_init", key_init.detach().float().clone())
        self.register_buffer("value_init", value_init.detach().float().clone())
        self.key_skew = torch.nn.Parameter(torch.zeros_like(self.key_init))
        self.value_skew = torch.nn.Parameter(torch.zeros_like(self.value_init))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_init @ cayley(self.key_skew), self.value_init @ cayley(self.value_skew)


@dataclass(eq=False)
class MatryoshkaKV(PCA):
    name: ClassVar[str] = "matryoshka"
    axes: ClassVar[tuple[str, ...]] = ("feature",)

    schedule: str = "matryoshka"
    train_ranks: list | None = None  # ints in 1..D or fractions in (0, 1]; None: the schedule's default
    steps: int = 300
    lr: float = 5e-3
    batch_size: int = 2
    train_chunk_len: int = 256  # prepare(): training chunks from the corpus' calib split
    train_chunks: int = 512
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    seed: int = 0
    init_key_bases: torch.Tensor | None = field(default=None, repr=False)  # the PCA bases training started from
    init_value_bases: torch.Tensor | None = field(default=None, repr=False)

    FIT_OPTIONS: ClassVar[tuple[str, ...]] = PCA.FIT_OPTIONS + (
        "schedule", "train_ranks", "steps", "lr", "batch_size", "train_chunk_len", "train_chunks", "kl_weight",
        "ce_weight", "seed")

    def __post_init__(self):
        super().__post_init__()
        self._check_training_options()
        self._module: OrthogonalBases | None = None
        self._live = False  # inside train_mode(): caches read the live parametrised bases
        self.history = None  # pandas DataFrame of every training step so far
        self.provenance.setdefault("runs", [])

    # ---- options
    def _check_training_options(self) -> None:
        if self.values != "plain":
            raise ValueError(f"matryoshka trains orthogonal value bases: values must be 'plain', got {self.values!r} "
                             "(output-aware value bases are a PCA option: pca values='output_aware')")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {self.kl_weight}, {self.ce_weight}")
        if self.train_ranks is not None:
            ranks = list(self.train_ranks) if isinstance(self.train_ranks, (list, tuple)) else None
            if not ranks or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in ranks):
                raise ValueError("train_ranks must be a non-empty list of ranks (ints >= 1) or fractions of head_dim "
                                 f"in (0, 1], got {self.train_ranks!r}")

    def rank_set(self, head_dim: int) -> list[int]:
        """The training ranks for ``head_dim``, sorted: ``train_ranks`` resolved, or the schedule's default."""
        if self.train_ranks is None:
            if self.schedule == "matryoshka":  # every eighth, so every rank a per-head search picks is trained
                return sorted({max(1, round(head_dim * q / 8)) for q in range(1, 9)})
            quarters = sorted({max(1, round(head_dim * q / 4)) for q in (1, 2, 3)})
            return [r for r in quarters if r < head_dim] or [head_dim]
        ranks = set()
        for r in self.train_ranks:
            if isinstance(r, float) and r <= 1.0:
                r = max(1, round(r * head_dim))
            if not float(r).is_integer() or not 1 <= r <= head_dim:
                raise ValueError(f"train_ranks must be ints in 1..{head_dim} or fractions in (0, 1], got {self.train_ranks!r}")
            ranks.add(int(r))
        return sorted(ranks)

    # ---- bases and caches
    def trainable(self) -> OrthogonalBases:
        """The trainable orthogonal bases (created from the current bases on first use: PCA's, or loaded ones)."""
        if not self.fitted:
            raise RuntimeError("MatryoshkaKV has no bases yet: call .fit(model, calib_ids) or .prepare(model, tokenizer)")
        if self._module is None:
            if self.init_key_bases is None:
                self.init_key_bases, self.init_value_bases = self.key_bases.clone(), self.value_bases.clone()
            self._module = OrthogonalBases(self.key_bases, self.value_bases)
        return self._module

    @contextmanager
    def train_mode(self) -> Iterator[OrthogonalBases]:
        """Inside: new caches read the live parametrised bases (gradients reach them). On exit the trained bases
        are frozen into ``key_bases``/``value_bases``, which every later cache (evaluation) reads."""
        module = self.trainable()
        self._live = True
        try:
            yield module
        finally:
            self._live = False
            self.materialize()

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the trainable module's current bases into ``key_bases``/``value_bases`` (detached)."""
        if self._module is not None:
            keys, values = self._module()
            self.key_bases, self.value_bases = keys.detach().clone(), values.detach().clone()

    def _bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._live:
            return self._module()
        if not self.fitted:
            raise RuntimeError("MatryoshkaKV has no bases yet: call .fit(model, calib_ids) or .prepare(model, tokenizer)")
        return self.key_bases, self.value_bases

    @staticmethod
    def _layer(layer_idx, keys, values, key_ranks, value_ranks, sinks, n_heads, rotary=None) -> ProjectedLayer:
        heads = range(n_heads)
        return ProjectedLayer(layer_idx, [keys[layer_idx, h, :, : int(key_ranks[layer_idx, h])] for h in heads],
                              [values[layer_idx, h, :, : int(value_ranks[layer_idx, h])] for h in heads], sinks=sinks,
                              rotary=rotary)

    def _cache(self, spec: ModelSpec, key_ranks: torch.Tensor, value_ranks: torch.Tensor, rotaries) -> KVLabCache:
        keys, values = self._bases()  # (L, H_kv, D, D) each; live (with grad) while training
        if keys.shape != (spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.head_dim):
            raise ValueError(f"bases are {tuple(keys.shape)} but the model needs "
                             f"({spec.n_layers}, {spec.n_kv_heads}, {spec.head_dim}, {spec.head_dim})")
        return KVLabCache([self._layer(i, keys, values, key_ranks, value_ranks, self.sinks, spec.n_kv_heads,
                                       rotaries[i]) for i in range(spec.n_layers)])

    def make_layer(self, layer_idx: int, spec: ModelSpec, rotary=None):
        self._check_rotary(rotary)
        key_ranks, value_ranks = self.ranks(spec)
        keys, values = self._bases()
        return self._layer(layer_idx, keys, values, key_ranks, value_ranks, self.sinks, spec.n_kv_heads, rotary)

    def new_cache(self, model):
        spec = ModelSpec.from_model(model)
        return self._cache(spec, *self.ranks(spec), self.rotaries(model))

    def training_caches(self, model, step: int, generator: torch.Generator):
        """The per-step hook of :func:`kvlab.fit.train.distill`: [(label, make_cache)], loss summed over the list."""
        spec = ModelSpec.from_model(model)
        rot = self.rotaries(model)
        if self.schedule == "fixed":
            key_ranks, value_ranks = self.ranks(spec)
            return [("fixed", lambda: self._cache(spec, key_ranks, value_ranks, rot))]
        ranks = torch.tensor(self.rank_set(spec.head_dim))
        shape = (spec.n_layers, spec.n_kv_heads)
        if self.schedule == "matryoshka":
            key_ranks = ranks[torch.randint(len(ranks), shape, generator=generator)]
            value_ranks = ranks[torch.randint(len(ranks), shape, generator=generator)]
            return [("sampled", lambda: self._cache(spec, key_ranks, value_ranks, rot))]
        return [(f"r={int(r)}", lambda r=int(r): self._cache(spec, torch.full(shape, r), torch.full(shape, r), rot))
                for r in ranks]

    def with_budget(self, budget: float | None = None, *, key_ranks=None, value_ranks=None) -> "MatryoshkaKV":
        """The same trained matrices at another budget (or per-head ranks): a new method sharing the bases."""
        changes = {"key_ranks": key_ranks, "value_ranks": value_ranks}
        if budget is not None:
            changes["budget"] = budget
        other = dataclasses.replace(self, **changes)
        other.provenance, other.metrics, other.history = self.provenance, dict(self.metrics), self.history
        return other

    # ---- training
    def fit(self, model, calib: torch.Tensor, *, steps: int | None = None, schedule: str | None = None,
            ranks: list | None = None, lr: float | None = None, batch_size: int | None = None,
            kl_weight: float | None = None, ce_weight: float | None = None, seed: int | None = None,
            train_data: torch.Tensor | None = None, eval_data: torch.Tensor | None = None,
            max_seconds: float | None = None, callback=None, progress: bool = True) -> "MatryoshkaKV":
        """PCA on ``calib`` (N, T) ids (unless bases exist already), then ``steps`` steps of distillation on the rows
        of ``train_data`` (default ``calib``). Keyword options override (and update) the dataclass fields; calling
        ``fit`` again continues training from the current bases. With ``eval_data`` the distillation loss at the
        method's own ranks is measured before and after (``metrics``)."""
        from ..fit import train

        with self.overridden(steps=steps, schedule=schedule, train_ranks=ranks, lr=lr, batch_size=batch_size,
                             kl_weight=kl_weight, ce_weight=ce_weight, seed=seed):
            self._check_training_options()
            train_data = train.check_tokens(train_data if train_data is not None else calib, "train_data")
            if self.batch_size > train_data.shape[0]:
                raise ValueError(f"batch_size={self.batch_size} but train_data has only {train_data.shape[0]} rows")
            self.rank_set(ModelSpec.from_model(model).head_dim)  # clear error before any work
            self.check_model(model)
        if not self.fitted:
            tic = time.perf_counter()
            PCA.fit(self, model, calib)
            self.provenance["pca"]["seconds"] = round(time.perf_counter() - tic, 2)
        self.trainable()
        if eval_data is not None:
            self.metrics.setdefault("eval_before", train.evaluate_loss(
                model, self, eval_data, batch_size=self.batch_size, kl_weight=self.kl_weight, ce_weight=self.ce_weight))
        if self.steps:
            result = train.distill(model, self, train_data, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                   kl_weight=self.kl_weight, ce_weight=self.ce_weight, seed=self.seed,
                                   max_seconds=max_seconds, callback=callback, progress=progress)
            self._log_run(result, ModelSpec.from_model(model).head_dim)
            self.sensitivity = None  # measured on the bases before training: stale now
        if eval_data is not None:
            self.metrics["eval_after"] = train.evaluate_loss(
                model, self, eval_data, batch_size=self.batch_size, kl_weight=self.kl_weight, ce_weight=self.ce_weight)
        return self

    def _log_run(self, result, head_dim: int) -> None:
        import pandas as pd

        done = self.trained_steps
        history = result.history.assign(step=result.history["step"] + done)
        self.history = history if self.history is None else pd.concat([self.history, history], ignore_index=True)
        self.provenance["runs"].append({
            **result.summary(), "schedule": self.schedule, "ranks": self.rank_set(head_dim),
            "budget": self.budget, "sinks": self.sinks,
            "history": history[[c for c in ("step", "loss", "kl", "ce", "tokens", "seconds")
                                if c in history]].round(6).to_dict("records"),
        })

    @property
    def trained_steps(self) -> int:
        return sum(run["steps"] for run in self.provenance.get("runs", []))

    @property
    def trained_tokens(self) -> int:
        return sum(run["tokens"] for run in self.provenance.get("runs", []))

    def _fit_default(self, model, tokenizer) -> None:
        """PCA on the corpus' calib split, then ``steps`` steps of training on its ``train_chunks`` chunks."""
        from ..data import text_chunks

        calib = text_chunks(self.corpus, tokenizer, chunk_len=self.chunk_len, n_chunks=self.calib_chunks, split="calib")
        chunks = text_chunks(self.corpus, tokenizer, chunk_len=self.train_chunk_len, n_chunks=self.train_chunks,
                             split="calib")
        if self.steps:
            print(f"matryoshka: no artefact for this model and these options (source={self.source!r}); "
                  f"training {self.steps} steps (to ship one: `{artefacts.fit_command(self.name, model)}`)",
                  file=sys.stderr)
        self.fit(model, calib, train_data=chunks)

    # ---- persistence (safetensors + JSON record, see kvlab.methods.artefacts)
    def _tensors(self) -> dict[str, torch.Tensor]:
        if self._live:
            self.materialize()
        tensors = super()._tensors()
        if self.init_key_bases is not None:
            tensors.update(init_key_bases=self.init_key_bases, init_value_bases=self.init_value_bases)
        return tensors

    def _record(self, model=None) -> dict:
        return {**super()._record(model), "trained_steps": self.trained_steps, "trained_tokens": self.trained_tokens,
                "train_seconds": round(sum(run["seconds"] for run in self.provenance.get("runs", [])), 2)}

    def _take(self, tensors: dict, record: dict, path) -> None:
        super()._take(tensors, record, path)
        self.init_key_bases, self.init_value_bases = tensors.get("init_key_bases"), tensors.get("init_value_bases")
        self.provenance.setdefault("runs", [])
        self._module = None
