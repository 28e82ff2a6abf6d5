"""Batched forward helpers shared by every evaluation: padding, positions, one forward through a cache, a meter.

Every forward of the harness passes explicit ``position_ids`` and a 2-D ``attention_mask`` covering every token the
cache has *seen* plus the new ones (1 = real token, 0 = padding). Positions are ``cumsum(mask) - 1`` (clamped at 0
for padding), continued by hand across calls, never derived from the cache length: token-eviction methods make the
cache length differ from the positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..attention import padded_positions
from ..budget import DEFAULT_DTYPE, kv_bytes


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask, both (B, T) long, padded on ``side`` ("left" or "right") to the longest sequence (T >= 1)."""
    width = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[row, span] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, span] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pad(seqs, pad_id, side="left")


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pad(seqs, pad_id, side="right")


positions = padded_positions  # the eval modules' name for it


def pad_id_of(tokenizer) -> int:
    """The id used for padding (never attended to, so any valid id works)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def forward(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache=None,
            logits_to_keep: int = 0) -> torch.Tensor:
    """One forward; ``mask`` (B, past + T) covers the cache's tokens and ``ids`` (B, T). Returns logits (B, T', V).

    With ``cache`` the forward writes to and reads through it (``use_cache=True``), so every attention read goes
    through the method's cache; without, it is the plain model.
    """
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                past_key_values=cache, use_cache=cache is not None, logits_to_keep=logits_to_keep)
    return out.logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (...,) from logits (..., V) in fp32: ``logit[target] - logsumexp(logits)``.

    Reads the logits once more instead of writing a full log-softmax copy (the vocabulary makes that the largest
    tensor of an evaluation, and on a CPU the copy costs as much as a tenth of the forward).
    """
    targets = targets.to(logits.device)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return (picked - torch.logsumexp(logits.float(), dim=-1)).cpu()


@dataclass
class Meter:
    """What an evaluation forwarded and what its caches held.

    ``tokens`` counts real (non-padding) tokens fed to the model, ``padded_tokens`` everything fed (padding too).
    ``full/theoretical/measured`` are *summed over every cache the evaluation used*, each accounted once, after its
    last forward (see :func:`kvlab.budget.kv_bytes`); their ratio ``budget = measured / full`` is therefore the
    token-weighted fraction of the full cache's bytes the method kept on exactly this workload. Floating bytes are
    counted in the reference dtype ``dtype`` (:func:`kvlab.budget.kv_bytes`; "bf16" by default).
    """

    tokens: int = 0
    padded_tokens: int = 0
    forwards: int = 0
    caches: int = 0
    full: int = 0
    theoretical: int = 0
    measured: int = 0
    reference: int = 0  # window-bounded full (see kvlab.budget): differs from full on sliding-window models
    seconds: float = 0.0
    shapes: list = field(default_factory=list, repr=False)  # (B, T) of every forward's new ids
    dtype: str = DEFAULT_DTYPE  # reference dtype of the byte counts

    def count(self, mask: torch.Tensor) -> None:
        """Count one forward of the new tokens described by ``mask`` (B, T)."""
        self.tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        self.forwards += 1
        self.shapes.append(tuple(mask.shape))

    def account(self, cache) -> None:
        """Add the bytes of a cache after its last forward."""
        try:
            kb = kv_bytes(cache, self.dtype)
        except ValueError:  # a cache that never saw a token
            return
        self.caches += 1
        self.full += kb.full
        self.theoretical += kb.theoretical
        self.measured += kb.measured
        self.reference += kb.reference if kb.reference is not None else kb.full

    def add(self, other: "Meter") -> None:
        for name in ("tokens", "padded_tokens", "forwards", "caches", "full", "theoretical", "measured", "reference",
                     "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.shapes.extend(other.shapes)

    def kv_dict(self) -> dict:
        def frac(x):
            return x / self.full if self.full else float("nan")

        return {"full": self.full, "theoretical": self.theoretical, "measured": self.measured,
                "budget": frac(self.measured), "theoretical_budget": frac(self.theoretical), "caches": self.caches,
                "dtype": self.dtype,
                "reference": self.reference,
                "budget_vs_reference": self.measured / self.reference if self.reference else float("nan")}

    def as_dict(self) -> dict:
        return {"tokens_forwarded": self.tokens, "padded_tokens": self.padded_tokens, "forwards": self.forwards,
                "seconds": self.seconds,
                "tokens_per_second": self.tokens / self.seconds if self.seconds else float("nan"),
                "kv_bytes": self.kv_dict()}


def progress_bar(iterable=None, *, total=None, desc: str = "", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
