"""One distillation loop shared by every trained method (MatryoshkaKV now; KV-CAR autoencoders, Attention-Gate later).

The model is frozen; only the method's own parameters learn. Per step, for a batch of token chunks (B, T):

    teacher = model with the plain full cache (method ``none``), logits under no_grad
    student = model run through the method's cache, gradients flowing into ``method.trainable()``
    loss    = kl_weight * KL(teacher || student) + ce_weight * CE(next token)      (defaults 0.25 / 0.75)

KL is the mean over every position of sum_v p_teacher (log p_teacher - log p_student) (temperature 1, as the
official MatryoshkaKV code); CE is the mean next-token NLL of the student over the T - 1 predicted tokens.

What a method provides:

* ``trainable() -> torch.nn.Module`` (required): the parameters Adam updates.
* ``train_mode()`` (optional): a context manager entered around the whole loop; inside it ``new_cache`` must build
  caches from the *live* trainable parameters (so gradients reach them); on exit the method freezes what it learned.
* ``training_caches(model, step, generator) -> [(label, make_cache), ...]`` (optional): the per-step hook. Each
  entry is one student pass; the step's loss is the **sum** over the entries (one backward per entry, gradients
  accumulate, then one optimiser step). MatryoshkaKV returns one entry with sampled ranks (Matryoshka) or one
  per rank of a fixed list (Starbucks). Default: ``[("", lambda: method.new_cache(model))]``.
* ``auxiliary_loss() -> Tensor | None`` (optional): called after each student pass; a scalar added to that pass's
  loss before its backward (e.g. Attention-Gate's sparsity term, collected during the forward). The logged
  ``loss`` stays the distillation loss; methods log their own terms through ``callback``.

    result = distill(model, method, ids, steps=100, lr=5e-3, batch_size=2, seed=0)
    result.history       # DataFrame: step, loss, kl, ce, tokens, seconds, step_seconds (+ loss[label] per entry)

Deterministic for a seed: batches are drawn from a seeded permutation of the rows of ``data`` (a fresh one per
epoch) and the hook gets a seeded ``torch.Generator``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

CacheFactory = Callable[[], Any]
Hook = Callable[[int, torch.Generator], Iterable[tuple[str, CacheFactory]]]


@dataclass
class TrainResult:
    """What :func:`distill` did: per-step history (a pandas DataFrame) and totals."""

    history: Any  # pandas.DataFrame, one row per step
    steps: int
    tokens: int  # training tokens fed to the student (B * T per step, not multiplied by the hook's entries)
    seconds: float
    seed: int
    options: dict = field(default_factory=dict)

    def summary(self) -> dict:
        h = self.history
        tail = h.tail(min(10, len(h))) if len(h) else h
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 2), "seed": self.seed,
                "loss_first": float(h["loss"].iloc[0]) if len(h) else None,
                "loss_last10": float(tail["loss"].mean()) if len(h) else None, **self.options}


def check_tokens(data: torch.Tensor, what: str = "data") -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] < 2 or data.dtype != torch.long:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{what} must be a (N, T >= 2) LongTensor of token ids, got {shape}")
    return data


def distill_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, ids: torch.Tensor,
                 kl_weight: float, ce_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for student logits (B, T, V), teacher log-probs (B, T, V) and token ids (B, T); fp32."""
    logp = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    vocab = logp.shape[-1]
    kl = F.kl_div(logp.reshape(-1, vocab), teacher_logprobs.reshape(-1, vocab), log_target=True,
                  reduction="batchmean")  # mean over the B*T positions of KL(teacher || student)
    ce = F.nll_loss(logp[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1).to(logp.device))
    return kl_weight * kl + ce_weight * ce, kl, ce


def forward_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    from ..eval.forward import forward

    batch, length = ids.shape
    mask = torch.ones_like(ids)
    pos = torch.arange(length).expand(batch, length)
    return forward(model, ids, mask, pos, cache)  # (B, T, V)


def teacher_logprobs(model, ids: torch.Tensor, teacher=None) -> torch.Tensor:
    """Log-probs (B, T, V) of the model with the plain full cache (method ``none`` unless ``teacher`` is given)."""
    from ..methods.base import NoCompression

    teacher = teacher if teacher is not None else NoCompression()
    with torch.no_grad(), teacher.apply(model) as cache:
        return F.log_softmax(forward_logits(model, ids, cache).float(), dim=-1)


def _default_hook(method, model) -> Hook:
    hook = getattr(method, "training_caches", None)
    if hook is not None:
        return lambda step, generator: hook(model, step, generator)
    return lambda step, generator: [("", lambda: method.new_cache(model))]


def _check_options(steps, lr, batch_size, kl_weight, ce_weight, data, max_seconds) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= data.shape[0]:
        raise ValueError(f"batch_size must be an int in 1..{data.shape[0]} (rows of data), got {batch_size!r}")
    if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
        raise ValueError(f"kl_weight and ce_weight must be >= 0 and not both 0, got {kl_weight}, {ce_weight}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")


class _Batches:
    """Seeded batches of rows: a fresh permutation per epoch, consecutive slices of it."""

    def __init__(self, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.order, self.at = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.at + self.batch_size > len(self.order):
            self.order, self.at = torch.randperm(self.data.shape[0], generator=self.generator), 0
        rows = self.order[self.at: self.at + self.batch_size]
        self.at += self.batch_size
        return self.data[rows]  # (B, T)


def distill(model, method, data: torch.Tensor, *, steps: int, lr: float = 5e-3, batch_size: int = 2,
            kl_weight: float = 0.25, ce_weight: float = 0.75, seed: int = 0, hook: Hook | None = None,
            teacher=None, max_seconds: float | None = None, grad_clip: float | None = None,
            callback: Callable[[int, Any], dict | None] | None = None, progress: bool = True) -> TrainResult:
    """Train ``method.trainable()`` by distillation from the full-cache model on rows of ``data`` (N, T) ids.

    ``hook(step, generator) -> [(label, make_cache), ...]`` overrides the method's ``training_caches``. The loop
    stops after ``steps`` steps or, if given, once ``max_seconds`` of wall time have passed (checked after each
    step). ``callback(step, method)`` runs after every step (e.g. a periodic evaluation) and may return a dict
    merged into that step's log row. The model's parameters never change and get their ``requires_grad`` back.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    data = check_tokens(data)
    _check_options(steps, lr, batch_size, kl_weight, ce_weight, data, max_seconds)
    if not hasattr(method, "trainable"):
        raise TypeError(f"method {getattr(method, 'name', method)!r} has nothing to train (no trainable() module)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batches = _Batches(data, batch_size, generator)
    hook = hook or _default_hook(method, model)

    model_params = list(model.parameters())
    flags = [p.requires_grad for p in model_params]
    was_training = model.training
    rows: list[dict] = []
    tokens, start = 0, time.perf_counter()
    mode = method.train_mode() if hasattr(method, "train_mode") else nullcontext()
    try:
        for p in model_params:
            p.requires_grad_(False)
        model.eval()  # no dropout: the frozen model must compute the same function as at inference
        with mode:
            module = method.trainable()
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"method {getattr(method, 'name', method)!r} exposes no trainable parameters")
            own = {id(p) for p in model_params}
            if any(id(p) in own for p in params):
                raise ValueError("the method's trainable parameters include the model's own weights; they must be frozen")
            optimizer = torch.optim.Adam(params, lr=lr)
            auxiliary = getattr(method, "auxiliary_loss", None)
            bar = tqdm(range(steps), desc=f"distill {getattr(method, 'name', '')}", unit="step", disable=not progress)
            for step in bar:
                tic = time.perf_counter()
                ids = batches.next()
                target = teacher_logprobs(model, ids, teacher)
                optimizer.zero_grad(set_to_none=True)
                row = {"step": step}
                total = kl_sum = ce_sum = 0.0
                entries = list(hook(step, generator))
                if not entries:
                    raise ValueError(f"the training hook returned no caches at step {step}")
                with method.attached(model):
                    for label, make_cache in entries:
                        logits = forward_logits(model, ids, make_cache())
                        loss, kl, ce = distill_loss(logits, target, ids, kl_weight, ce_weight)
                        extra = auxiliary() if auxiliary is not None else None
                        (loss if extra is None else loss + extra).backward()
                        total, kl_sum, ce_sum = total + loss.item(), kl_sum + kl.item(), ce_sum + ce.item()
                        if len(entries) > 1:
                            row[f"loss[{label}]"] = loss.item()
                        del logits, loss
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                tokens += ids.numel()
                now = time.perf_counter()
                row.update(loss=total, kl=kl_sum / len(entries), ce=ce_sum / len(entries), entries=len(entries),
                           tokens=tokens, seconds=now - start, step_seconds=now - tic)
                if callback is not None:
                    extra = callback(step, method)
                    if extra:
                        row.update(extra)
                rows.append(row)
                bar.set_postfix(loss=f"{total:.4f}", kl=f"{row['kl']:.4f}")
                if max_seconds is not None and now - start >= max_seconds:
                    break
    finally:
        for p, flag in zip(model_params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    options = dict(lr=lr, batch_size=batch_size, chunk_len=int(data.shape[1]), kl_weight=kl_weight,
                   ce_weight=ce_weight, grad_clip=grad_clip, steps_requested=steps, max_seconds=max_seconds)
    return TrainResult(history=pd.DataFrame(rows), steps=len(rows), tokens=tokens,
                       seconds=time.perf_counter() - start, seed=seed, options=options)


@torch.no_grad()
def evaluate_loss(model, method, data: torch.Tensor, *, batch_size: int = 2, kl_weight: float = 0.25,
                  ce_weight: float = 0.75, teacher=None) -> dict:
    """Mean distillation loss, KL and CE of ``method``'s ordinary cache over all rows of ``data`` (no training)."""
    data = check_tokens(data)
    sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    for start in range(0, data.shape[0], batch_size):
        ids = data[start: start + batch_size]
        target = teacher_logprobs(model, ids, teacher)
        with method.attached(model):
            logits = forward_logits(model, ids, method.new_cache(model))
        for key, value in zip(sums, distill_loss(logits, target, ids, kl_weight, ce_weight)):
            sums[key] += value.item() * ids.shape[0]
    return {key: value / data.shape[0] for key, value in sums.items()}
