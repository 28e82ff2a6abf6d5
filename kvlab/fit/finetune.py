"""Task fine-tuning on multiple-choice items: LoRA with the full cache, or LoRA trained jointly with Attention-Gate.

Used to check the Attention-Gate paper's fine-tuning claim (Zeng et al. 2024: on RTE, Attention-Gate + fine-tuning is
+13.9 % over LoRA while evicting 62.8 % of the tokens). Only validation splits ship, so :func:`split_items` cuts one
split into two disjoint, seeded halves (train / test); nothing of the test half is ever seen in training.

Loss (``loss="choice"``, the default): for every item, the log-likelihood of each choice is the sum of its
continuation tokens' log-probs given the context (exactly what :func:`kvlab.eval.multiple_choice` scores, with the same
lm-eval tokenisation :func:`kvlab.eval.encode_pair`); the loss is the cross-entropy of a softmax over the item's
choices against the gold index (mean over items). It optimises the quantity ``acc`` is computed from. ``loss="gold"``
instead is the mean next-token NLL of the gold continuation's tokens (language-model style).

Batching: each (context + continuation[:-1]) row is fed once (choices that share it, e.g. RTE's single-token
`` True`` / `` False``, share one row), left padded with ``position_ids = cumsum(mask) - 1`` as the evaluation does.

Variants (:func:`finetune`):

* ``method=None`` (or method ``none``): LoRA adapters (peft, ``rank`` / ``alpha`` on ``targets``, default q_proj and
  v_proj) trained through the plain model and full cache.
* ``method=AttentionGate(...)``: the same LoRA adapters and a *copy* of the gate trained jointly; the gate's in-context
  masks are active in every training forward (straight-through flags, :meth:`AttentionGate.train_mode`) and its
  sparsity term toward ``target`` (keep rate) is added to the task loss (``auxiliary_loss``), as in
  :func:`kvlab.fit.train.distill`. The gate gets its own learning rate ``gate_lr``.

The model's base weights never change (they are frozen; the test suite checks it). The adapters are injected in place
(``peft.LoraModel`` on the model object itself, so the model keeps its class and every kvlab method / cache path works
unchanged); evaluation reads through the *active* (unmerged) adapters. :meth:`FineTuned.unload` removes them and gives
the original modules back; :meth:`FineTuned.disabled` switches them off for a block.

    train, test = split_items(kvlab.data.load_task("rte"), n_train=138, seed=0)
    ft = finetune(model, tok, train, method=gate.with_budget(0.372), target=0.372, epochs=2, lr=2e-4)
    kvlab.eval.multiple_choice(model, tok, ft.method, test)      # through the adapters and the fine-tuned gate
    ft.unload()
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import padded_positions
from ..data.tasks import MCItem
from ..eval.forward import forward, pad_id_of, pad_left
from ..eval.multiple_choice import encode_pair

LOSSES = ("choice", "gold")

__all__ = ["LOSSES", "FineTuned", "split_items", "encode_items", "add_lora", "finetune", "item_loss"]


# ------------------------------------------------------------------------------------------------------ the split


def split_items(items: Sequence[MCItem], n_train: int, seed: int = 0) -> tuple[list[MCItem], list[MCItem]]:
    """Two disjoint halves (train, test) of ``items``: a seeded permutation, the first ``n_train`` rows train.

    Both halves come back in the items' original order. Raises ``ValueError`` if ``n_train`` leaves either half
    empty or if two items share an ``idx`` (the halves could not then be shown disjoint)."""
    items = list(items)
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or not 1 <= n_train < len(items):
        raise ValueError(f"n_train must be an int in 1..{len(items) - 1} (both halves non-empty; {len(items)} "
                         f"items), got {n_train!r}")
    keys = [(item.task, item.idx) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("items must have distinct (task, idx): duplicates would leak between the halves")
    order = np.random.default_rng(seed).permutation(len(items))
    train_rows = set(order[: int(n_train)].tolist())
    train = [item for row, item in enumerate(items) if row in train_rows]
    test = [item for row, item in enumerate(items) if row not in train_rows]
    assert not ({(i.task, i.idx) for i in train} & {(i.task, i.idx) for i in test})
    return train, test


# ------------------------------------------------------------------------------------------------------ encoding


@dataclass
class _Encoded:
    """One item: unique feed rows (context + continuation[:-1]) and, per choice, (row, first target column, targets)."""

    rows: list[tuple[int, ...]]
    choices: list[tuple[int, int, tuple[int, ...]]]
    gold: int


def encode_items(tokenizer, items: Sequence[MCItem]) -> list[_Encoded]:
    """Token the items as :func:`kvlab.eval.encode_pair` does; see the module docstring for the rows."""
    out = []
    for item in items:
        if not isinstance(item, MCItem):
            raise ValueError(f"items must be MCItem, got {type(item).__name__}")
        if item.n_choices < 2 or not 0 <= item.gold < item.n_choices:
            raise ValueError(f"item {item.task}/{item.idx}: needs >= 2 choices and a gold index among them, got "
                             f"{item.n_choices} choices, gold={item.gold}")
        rows: list[tuple[int, ...]] = []
        choices = []
        for context, continuation in item.requests:
            ctx, cont = encode_pair(tokenizer, context, continuation)
            feed = ctx + cont[:-1]
            if feed not in rows:
                rows.append(feed)
            choices.append((rows.index(feed), len(ctx) - 1, cont))  # logits at len(ctx)-1 .. predict cont
        out.append(_Encoded(rows, choices, item.gold))
    return out


def item_loss(model, batch: Sequence[_Encoded], *, cache=None, pad_id: int = 0, loss: str = "choice"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, choice log-likelihoods (n_items, max choices), -inf where an item has fewer) of one batch."""
    feeds = [row for enc in batch for row in enc.rows]
    offsets = np.cumsum([0] + [len(enc.rows) for enc in batch])
    ids, mask = pad_left(feeds, pad_id)  # (R, T)
    logits = forward(model, ids, mask, padded_positions(mask), cache)  # (R, T, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    width = ids.shape[1]
    n_choices = max(len(enc.choices) for enc in batch)
    scores = logp.new_full((len(batch), n_choices), float("-inf"))
    gold_nll = []
    for b, enc in enumerate(batch):
        for c, (row, first, targets) in enumerate(enc.choices):
            r = int(offsets[b]) + row
            shift = width - len(feeds[r])  # left padding of this row
            cols = torch.arange(len(targets)) + first + shift
            tok = torch.tensor(targets)
            lp = logp[r, cols, tok]  # (len(cont),)
            scores[b, c] = lp.sum()
            if c == enc.gold:
                gold_nll.append(-lp)
    if loss == "choice":
        gold = torch.tensor([enc.gold for enc in batch])
        value = F.cross_entropy(scores, gold)
    else:
        value = torch.cat(gold_nll).mean()
    return value, scores.detach()


# ------------------------------------------------------------------------------------------------------ LoRA


def add_lora(model, *, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q_proj", "v_proj"),
             dropout: float = 0.0, seed: int = 0):
    """Inject LoRA adapters into ``model`` in place (``peft.LoraModel``); returns the LoraModel (``.model is model``).

    B starts at zero (the adapted model equals the base model until trained); A is seeded by ``seed``."""
    from peft import LoraConfig, LoraModel

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    targets = list(targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if not targets or missing:
        raise ValueError(f"LoRA targets {missing or targets} are not modules of {type(model).__name__} "
                         f"(e.g. q_proj, k_proj, v_proj, o_proj for Llama)")
    if any("lora_A" in name for name, _ in model.named_parameters()):
        raise ValueError("the model already carries LoRA adapters: unload() the previous fine-tune first")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraModel(model, config, "default")
    return lora


def _lora_params(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


@dataclass
class FineTuned:
    """A fine-tune's outcome: the adapted model (adapters active, in place), the method to evaluate it through
    (``none`` or the fine-tuned gate) and the training log."""

    model: Any
    method: Any
    lora: Any = field(repr=False)
    history: Any  # pandas DataFrame, one row per step: step, epoch, loss, (keep_rate, sparsity), seconds
    steps: int
    seconds: float
    settings: dict

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model inside the block (adapters off)."""
        self.lora.disable_adapter_layers()
        try:
            yield
        finally:
            self.lora.enable_adapter_layers()

    def unload(self):
        """Remove the adapters (the original modules come back, base weights untouched); returns the model."""
        return self.lora.unload()


# ------------------------------------------------------------------------------------------------------ training


def _check(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def finetune(model, tokenizer, items: Sequence[MCItem], *, method=None, epochs: int = 2, lr: float = 2e-4,
             gate_lr: float = 5e-3, batch_size: int = 4, rank: int = 8, alpha: float = 16.0,
             targets: Sequence[str] = ("q_proj", "v_proj"), target: float | None = None,
             sparsity_weight: float | None = None, loss: str = "choice", seed: int = 0,
             max_seconds: float | None = None, grad_clip: float | None = 1.0, progress: bool = True) -> FineTuned:
    """Fine-tune LoRA adapters (and, with an Attention-Gate ``method``, a copy of its gate) on ``items``.

    ``epochs`` passes over a seeded permutation of the items per epoch, ``batch_size`` items per Adam step (LoRA at
    ``lr``, the gate at ``gate_lr``). ``target`` / ``sparsity_weight`` override the gate's training keep-rate target
    and sparsity weight (default: its own). Stops early once ``max_seconds`` have passed (checked after each step).
    The returned :class:`FineTuned` holds ``method``: ``none`` for LoRA alone, or the fine-tuned gate (a new
    AttentionGate object; the given one is left unchanged)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..methods.attention_gate import AttentionGate
    from ..methods.base import NoCompression

    items = list(items)
    if not items:
        raise ValueError("finetune needs at least one training item")
    _check("epochs", epochs, 1)
    _check("batch_size", batch_size, 1)
    if batch_size > len(items):
        raise ValueError(f"batch_size={batch_size} but only {len(items)} training items")
    for name, value in (("lr", lr), ("gate_lr", gate_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    if method is None or isinstance(method, NoCompression):
        gate = None
        if target is not None or sparsity_weight is not None:
            raise ValueError("target / sparsity_weight only apply to an attention_gate method")
    elif isinstance(method, AttentionGate):
        if method.gate is None:
            raise ValueError("the attention_gate method has no gate: prepare(), load() or init_gate() it first")
        changes = {"gate": copy.deepcopy(method.gate)}
        if target is not None:
            changes["target"] = target  # validated by AttentionGate
        if sparsity_weight is not None:
            changes["sparsity_weight"] = sparsity_weight
        gate = method.with_budget(None, **changes)
        gate.provenance = copy.deepcopy(method.provenance)
        gate.init_gate(model)  # checks the gate fits the model
    else:
        raise ValueError(f"method must be None, 'none' or an attention_gate method, got "
                         f"{getattr(method, 'name', type(method).__name__)!r}")

    encoded = encode_items(tokenizer, items)
    pad_id = pad_id_of(tokenizer)
    model_params = list(model.parameters())
    flags = [p.requires_grad for p in model_params]
    was_training = model.training
    lora = add_lora(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    params = _lora_params(model)
    base = [p for name, p in model.named_parameters() if "lora_" not in name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_steps = epochs * (len(items) // batch_size + (1 if len(items) % batch_size else 0))
    rows: list[dict] = []
    start = time.perf_counter()
    try:
        for p in base:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()  # no dropout
        with (gate.attached(model) if gate else nullcontext()), (gate.train_mode() if gate else nullcontext()):
            groups = [{"params": params, "lr": float(lr)}]
            if gate is not None:
                groups.append({"params": list(gate.trainable().parameters()), "lr": float(gate_lr)})
            optimizer = torch.optim.Adam(groups)
            bar = tqdm(total=n_steps, desc=f"finetune {'lora' if gate is None else 'gate+lora'}", unit="step",
                       disable=not progress)
            step, stop = 0, False
            for epoch in range(epochs):
                order = rng.permutation(len(items))
                for at in range(0, len(order), batch_size):
                    batch = [encoded[i] for i in order[at: at + batch_size]]
                    optimizer.zero_grad(set_to_none=True)
                    cache = gate.new_cache(model) if gate is not None else None
                    value, scores = item_loss(model, batch, cache=cache, pad_id=pad_id, loss=loss)
                    aux = gate.auxiliary_loss() if gate is not None else None
                    (value if aux is None else value + aux).backward()
                    del cache
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    optimizer.step()
                    gold = torch.tensor([enc.gold for enc in batch])
                    row = {"step": step, "epoch": epoch, "loss": value.item(),
                           "train_acc": float((scores.argmax(-1) == gold).float().mean())}
                    if gate is not None:
                        row.update(gate._step_stats())
                    row["seconds"] = time.perf_counter() - start
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("loss", "keep_rate")})
                    step += 1
                    if max_seconds is not None and row["seconds"] >= max_seconds:
                        stop = True
                        break
                if stop:
                    break
            bar.close()
    except BaseException:
        lora.unload()
        raise
    finally:
        for p, flag in zip(model_params, flags):
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    seconds = time.perf_counter() - start
    settings = {"variant": "lora" if gate is None else "attention_gate+lora", "loss": loss, "epochs": epochs,
                "steps": len(rows), "steps_planned": n_steps, "lr": lr, "batch_size": batch_size, "rank": rank,
                "alpha": alpha, "targets": list(targets), "dropout": 0.0, "grad_clip": grad_clip, "seed": seed,
                "max_seconds": max_seconds, "n_train": len(items),
                "lora_parameters": int(sum(p.numel() for p in params))}
    if gate is not None:
        settings.update(gate_lr=gate_lr, target=gate.train_target, sparsity_weight=gate.sparsity_weight,
                        sinks=gate.sinks, local=gate.local, gate_parameters=int(sum(
                            p.numel() for p in gate.trainable().parameters())))
        gate.provenance.setdefault("runs", []).append({"finetune": settings})
    return FineTuned(model=model, method=gate if gate is not None else NoCompression(), lora=lora,
                     history=pd.DataFrame(rows), steps=len(rows), seconds=seconds, settings=settings)
