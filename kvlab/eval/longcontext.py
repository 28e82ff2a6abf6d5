"""Long-context retrieval / QA: prefill a long context, compress the cache, then answer by greedy decoding.

Protocol: always "compress the context, then continue" (``context``). Settings:

* ``query_aware``: the question is part of the prefill; ``method.compress`` sees document + question.
* ``query_agnostic``: prefill the document alone, compress, then feed the question and generate (kvpress-style).

Both settings feed exactly the same tokens (document part ++ question part, tokenised separately), only the moment
of compression differs. Generation is a small greedy loop with explicit ``position_ids`` and a 2-D attention mask
over every token seen (never derived from the cache length, which token eviction changes). Batches are left
padded; in the query-agnostic setting the question block is left padded too (padding in the middle, masked), so
every row's last column is a real token.

Prompt formats (``prompt=``): ``"chat"`` (default) renders the tokenizer's chat template with one user turn
``"{context}\\n\\nQuestion: {question}"`` and the generation prompt; the document part ends right after the
context. ``"plain"`` is ``"{context}"`` + ``"\\n\\nQuestion: {question}\\nAnswer:"``. On SmolLM2-135M-Instruct with
the full cache, needle at 2k tokens: see README / the report for the measured comparison that chose the default.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from .forward import Meter, forward, pad_id_of, pad_left, positions, progress_bar

SETTINGS = ("query_aware", "query_agnostic")
LONG_TASKS = ("needle", "longqa")
PROMPTS = ("chat", "plain")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_prompt(tokenizer, context: str, question: str, prompt: str = "chat") -> tuple[list[int], list[int]]:
    """(document ids, question ids): their concatenation is the whole prompt, ready for generation."""
    if prompt == "plain" or (prompt == "chat" and not getattr(tokenizer, "chat_template", None)):
        return _encode(tokenizer, context), _encode(tokenizer, f"\n\nQuestion: {question}\nAnswer:")
    if prompt != "chat":
        raise ValueError(f"unknown prompt format {prompt!r}; allowed: {', '.join(PROMPTS)}")
    marker = "\x00KVLAB_SPLIT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{context}{marker}\n\nQuestion: {question}"}],
                                         tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return _encode(tokenizer, head), _encode(tokenizer, tail)


def stop_ids_of(tokenizer) -> set[int]:
    """Token ids that end an answer: EOS and the chat end-of-turn token where the tokenizer has one."""
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(eos)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid >= 0 and tid != unk:
            ids.add(tid)
    return ids


@torch.inference_mode()
def greedy_generate(model, method, prompts: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                    setting: str = "query_aware", max_new_tokens: int = 32, stop_ids: Sequence[int] = (),
                    pad_id: int = 0, batch_size: int = 1, stop_text=None, progress: bool = True,
                    meter: Meter | None = None) -> list[list[int]]:
    """Greedy continuation of each (document ids, question ids) prompt through ``method``'s cache.

    The document (query-agnostic) or document + question (query-aware) is prefilled and ``method.compress`` is
    called with ``model``, ``attention_mask``, ``position_ids`` and ``setting``; then the rest is fed and the
    answer decoded token by token. A row stops at a token of ``stop_ids`` (kept in the output) or when
    ``stop_text(ids)`` is true; the batch stops when every row has. Returns the generated ids per prompt.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; allowed: {', '.join(SETTINGS)}")
    meter = meter if meter is not None else Meter()
    stop_ids = set(stop_ids)
    outputs: dict[int, list[int]] = {}
    with method.attached(model):
        for index in progress_bar(_batches(model, prompts, setting, batch_size), desc=f"generate ({setting})",
                                  enabled=progress):
            batch = [prompts[i] for i in index]
            cache = method.new_cache(model)
            first = [list(d) + list(q) for d, q in batch] if setting == "query_aware" else [list(d) for d, _ in batch]
            ids, mask = pad_left(first, pad_id)  # (B, T)
            pos = positions(mask)
            logits = forward(model, ids, mask, pos, cache, logits_to_keep=1)[:, -1]  # (B, V)
            meter.count(mask)
            method.compress(cache, model=model, attention_mask=mask, position_ids=pos, setting=setting)
            if setting == "query_agnostic":
                qids, qmask = pad_left([list(q) for _, q in batch], pad_id)
                qpos = positions(qmask, mask.sum(-1))
                mask = torch.cat([mask, qmask], dim=1)
                logits = forward(model, qids, mask, qpos, cache, logits_to_keep=1)[:, -1]
                meter.count(qmask)
                pos = qpos
            last_pos = pos[:, -1]
            rows = len(batch)
            generated: list[list[int]] = [[] for _ in range(rows)]
            done = [False] * rows
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1).cpu()  # (B,)
                for r in range(rows):
                    if not done[r]:
                        generated[r].append(int(nxt[r]))
                        if int(nxt[r]) in stop_ids or (stop_text is not None and stop_text(generated[r])):
                            done[r] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                last_pos = last_pos + 1
                step_mask = torch.ones(rows, 1, dtype=mask.dtype)
                mask = torch.cat([mask, step_mask], dim=1)
                logits = forward(model, nxt[:, None], mask, last_pos[:, None], cache, logits_to_keep=1)[:, -1]
                meter.count(step_mask)
            meter.account(cache)
            del cache
            outputs.update(zip(index, generated))
    return [outputs[i] for i in range(len(prompts))]


def _batches(model, prompts, setting: str, batch_size: int) -> list[list[int]]:
    """Prompt indices per batch, in order. Query-agnostic batches of a model with sliding-window layers hold
    questions of one length only: padding between document and question would shift the windows (they count
    cache slots, padding included), so such batches never need it."""
    from ..models import ModelSpec

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(prompts)))
    if setting == "query_agnostic" and ModelSpec.from_model(model).sliding_layers:
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(len(prompts[i][1]), []).append(i)
        return [g[k: k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    return [order[k: k + batch_size] for k in range(0, len(order), batch_size)]


def _items(tokenizer, task: str, context_len: int, n: int, seed: int, source: str, depths=None):
    from .. import data

    if task == "needle":
        depths = depths if depths is not None else [(i + 0.5) / n for i in range(n)]
        return [item for i, d in enumerate(depths)
                for item in data.needle(tokenizer, context_len=context_len, depth=float(d), n=1, seed=seed * 1000 + i)]
    if task == "longqa":
        return data.longqa(tokenizer, context_len=context_len, source=source, n=n, seed=seed)
    raise ValueError(f"unknown long-context task {task!r}; allowed: {', '.join(LONG_TASKS)}")


def _answer_text(tokenizer, ids: Sequence[int], stop_ids: set[int]) -> str:
    ids = [i for i in ids if i not in stop_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text.split("\n")[0].strip()


def long_context(model, tokenizer, method, task: str = "needle", context_len: int = 2048, n: int = 8, *,
                 setting: str = "query_aware", max_new_tokens: int = 24, batch_size: int = 2, seed: int = 0,
                 prompt: str = "chat", source: str = "squad", depths=None, items=None, progress: bool = True,
                 meter: Meter | None = None) -> dict:
    """Accuracy (``score_answer``: normalised substring match) of greedy answers on long-context ``task``.

    ``needle``: ``n`` items at depths ``(i + 0.5) / n`` (or ``depths``); ``longqa``: ``n`` questions from
    ``source`` (``squad`` or ``hotpotqa``). ``items`` overrides the builder (a list of ``LongItem``).
    A context longer than the model's window is refused (ValueError naming the limit).
    Returns ``{acc, acc_ci95 (Wilson), n, context_len, setting, protocol: "context", prompt, records, ...}`` (drop ``records``,
    a list of per-item dicts, before JSON if you like; it is JSON-ready).
    """
    from ..data import score_answer

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; allowed: {', '.join(SETTINGS)}")
    from ..models import check_window

    check_window(model, context_len, f"{task} at context_len {context_len}")
    items = list(items) if items is not None else _items(tokenizer, task, context_len, n, seed, source, depths)
    prompts = [build_prompt(tokenizer, it.context, it.question, prompt) for it in items]
    longest = max((len(d) + len(q) for d, q in prompts), default=0)
    check_window(model, longest + max_new_tokens, f"{task}: the longest prompt ({longest} tokens) + {max_new_tokens} "
                 "new tokens")
    stops = stop_ids_of(tokenizer)

    def stop_text(ids):  # an answer is one line: stop once a newline follows some text
        return "\n" in tokenizer.decode(ids, skip_special_tokens=True).strip()

    own = Meter()
    start = time.perf_counter()
    generated = greedy_generate(model, method, prompts, setting=setting, max_new_tokens=max_new_tokens,
                                stop_ids=stops, pad_id=pad_id_of(tokenizer), batch_size=batch_size,
                                stop_text=stop_text, progress=progress, meter=own)
    own.seconds = time.perf_counter() - start
    if meter is not None:
        meter.add(own)
    records = []
    for it, (doc, q), ids in zip(items, prompts, generated):
        answer = _answer_text(tokenizer, ids, stops)
        records.append({"task": it.task, "idx": it.idx, "depth": it.depth, "prompt_tokens": len(doc) + len(q),
                        "answers": list(it.answers), "prediction": answer,
                        "score": score_answer(answer, list(it.answers))})
    acc = sum(r["score"] for r in records) / len(records) if records else float("nan")
    from .stats import wilson

    ci = list(wilson(sum(r["score"] for r in records), len(records))) if records else [float("nan")] * 2
    return {"acc": acc, "acc_ci95": ci, "n": len(records), "task": task, "context_len": context_len, "setting": setting,
            "protocol": "context", "prompt": prompt, **({"source": source} if task == "longqa" else {}),
            **own.as_dict(), "records": records}
