"""Where a needle's tokens go under token eviction (issue 22's diagnosis).

For one needle item (:func:`kvlab.data.needle`) and one token-eviction method, :func:`needle_trace` prefills the
prompt through the method's cache exactly as the long-context harness does (query-aware: document + question;
query-agnostic: the document alone), calls ``method.compress`` once (the only eviction step of the "context"
protocol), and reads, per (layer, kv head), which of the needle value's tokens (the digits to retrieve) are still in
the cache (``layer.index``: the kept columns) and how many tokens that head keeps.

:func:`retrieval_share` is the method-free reference: in the full model, the share of the attention that the
prompt's last ``window`` queries (the observation window; with the question in the prompt, these are the question's
tokens) give to the value tokens, per (layer, kv head), summed over the query heads of its group. Heads with a large
share are the "retrieval heads" of this item: if a method keeps the value there, the answer can be read.

    items = kvlab.data.needle(tok, context_len=2048, depth=0.5)
    share = retrieval_share(model, tok, items[0])                      # (L, H_kv)
    tr = needle_trace(model, tok, kvlab.methods.get("kvcompress", 0.125), items[0])
    tr.kept, tr.counts                                                 # (L, H_kv) fraction of the value kept, tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SETTINGS = ("query_aware", "query_agnostic")


@dataclass
class NeedleTrace:
    """One method on one item: ``kept`` (L, H_kv) fraction of the value's tokens each head still holds after
    compress, ``counts`` (L, H_kv) tokens each head keeps, ``n_tokens`` tokens prefilled, ``value_cols`` the value's
    columns in the prefill, ``budget`` the method's budget."""

    method: str
    budget: float
    setting: str
    n_tokens: int
    value_cols: list[int]
    kept: torch.Tensor
    counts: torch.Tensor

    def all_kept(self) -> torch.Tensor:
        """(L, H_kv) bool: the head holds every token of the value."""
        return self.kept >= 1.0 - 1e-9


def value_columns(tokenizer, doc_ids: list[int], item) -> list[int]:
    """Columns (positions in ``doc_ids``) of the tokens that overlap the needle's value digits in the context."""
    value = item.answers[0]
    text = tokenizer.decode(doc_ids)
    at = text.find(item.meta["needle"])
    if at < 0:
        raise ValueError("the needle text is not in the decoded document: is this a kvlab.data.needle item?")
    start = at + item.meta["needle"].index(value)
    end = start + len(value)
    cols, pos = [], 0
    for i in range(len(doc_ids)):  # character span of each token by decoding prefixes (robust to merges)
        nxt = len(tokenizer.decode(doc_ids[: i + 1]))
        if nxt > start and pos < end:
            cols.append(i)
        pos = nxt
        if pos >= end:
            break
    return cols


def _prompt(tokenizer, item, setting: str, prompt: str):
    from ..eval.longcontext import build_prompt

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; allowed: {', '.join(SETTINGS)}")
    doc, question = build_prompt(tokenizer, item.context, item.question, prompt)
    return doc, (doc + question if setting == "query_aware" else doc)


@torch.inference_mode()
def needle_trace(model, tokenizer, method, item, *, setting: str = "query_aware", prompt: str = "chat") -> NeedleTrace:
    """Prefill ``item``'s prompt through ``method``'s cache, compress once, and read where the value's tokens are."""
    from ..eval.forward import forward

    doc, ids = _prompt(tokenizer, item, setting, prompt)
    cols = value_columns(tokenizer, doc, item)
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    pos = torch.arange(len(ids))[None]
    with method.attached(model):
        cache = method.new_cache(model)
        forward(model, x, mask, pos, cache, logits_to_keep=1)
        method.compress(cache, model=model, attention_mask=mask, position_ids=pos, setting=setting)
        kept, counts = [], []
        for layer in cache.layers:
            index = layer.index[0].long()  # (H_kv, C) kept columns, -1 empty
            kept.append(torch.isin(index, torch.tensor(cols)).sum(-1).double() / len(cols))
            counts.append((index >= 0).sum(-1))
    return NeedleTrace(method.name, float(getattr(method, "budget", 1.0)), setting, len(ids), cols,
                       torch.stack(kept), torch.stack(counts))


@torch.inference_mode()
def retrieval_share(model, tokenizer, item, *, window: int = 32, setting: str = "query_aware",
                    prompt: str = "chat") -> torch.Tensor:
    """(L, H_kv) share of the last ``window`` prompt queries' attention (full model, summed over the window queries
    and the group's query heads) that lands on the needle value's tokens."""
    from ..eval.forward import forward
    from ..methods.kvcompress import KVCompress

    doc, ids = _prompt(tokenizer, item, setting, prompt)
    cols = torch.tensor(value_columns(tokenizer, doc, item))
    probe = KVCompress(1.0, window=window, metric="l1", kernel=1)  # budget 1: nothing evicted, window recorded
    x = torch.tensor([ids])
    with probe.attached(model):
        cache = probe.new_cache(model)
        forward(model, x, torch.ones_like(x), torch.arange(len(ids))[None], cache, logits_to_keep=1)
        shares = []
        for layer in cache.layers:
            stat = layer.window[0].sum(1).double()  # (H_kv, C): summed over the group's query heads
            index = layer.index[0].long()  # (H_kv, C) column of each slot
            on_value = torch.isin(index, cols) & (index >= 0)
            shares.append((stat * on_value).sum(-1) / stat.masked_fill(index < 0, 0).sum(-1))
    return torch.stack(shares)
