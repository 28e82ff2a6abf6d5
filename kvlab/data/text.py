"""Text corpora for calibration and perplexity: ``wiki`` and ``c4`` from exllamav3's calibration set.

Neither WikiText-2 nor C4's validation split ships in any package, so kvlab uses the closest substitutes that do
(name them honestly in every table): ``wiki.utf8`` (2,349 Wikipedia articles, each wrapped in
``<doc id=... url=... title=...> ... </doc>``) and ``c4.utf8`` (584 web pages, one per line).

Split (deterministic, by whole documents, so ``calib`` and ``eval`` never share a document): the documents are
kept in file order; the first 80 % (``floor(0.8 * n_docs)``) are ``calib``, the remaining 20 % are ``eval``.
A contiguous split rather than an interleaved one, because neighbouring wiki articles are often near-duplicates
(e.g. consecutive "Belgian First Division 1902-03/1903-04/..." seasons) and would leak across an interleaved split.
Wiki documents lose their ``<doc>`` markup (the title line stays, as the first line of the article); documents
are joined with a blank line (``"\\n\\n"``).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import torch

from .fetch import artifact_path

__all__ = ["TEXT_NAMES", "SPLITS", "CALIB_FRACTION", "documents", "text", "text_chunks", "tokenize_split"]

TEXT_NAMES: tuple[str, ...] = ("wiki", "c4")
SPLITS: tuple[str, ...] = ("calib", "eval")
CALIB_FRACTION = 0.8
DOC_SEPARATOR = "\n\n"
_MAX_PIECE_CHARS = 4000  # tokenise long documents in pieces of about this size (no over-long-sequence warnings)
_WIKI_DOC = re.compile(r"<doc [^>]*>\n?(.*?)</doc>", re.S)


def _check(name: str, split: str) -> None:
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown text corpus {name!r}; allowed: {TEXT_NAMES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")


@functools.lru_cache(maxsize=None)
def _all_documents(name: str) -> tuple[str, ...]:
    raw = (artifact_path("text") / f"{name}.utf8").read_text(encoding="utf-8")
    if name == "wiki":
        docs = [m.group(1).strip() for m in _WIKI_DOC.finditer(raw)]
    else:
        docs = [line.strip() for line in raw.splitlines()]
    return tuple(d for d in docs if d)


def documents(name: str, *, split: str = "eval") -> list[str]:
    """The documents of one split, in file order (see the module docstring for the split rule)."""
    _check(name, split)
    docs = _all_documents(name)
    n_calib = int(len(docs) * CALIB_FRACTION)
    return list(docs[:n_calib] if split == "calib" else docs[n_calib:])


def text(name: str, *, split: str = "eval") -> str:
    """Raw text of corpus ``name`` ("wiki" or "c4"), split "calib" or "eval"; documents joined by a blank line."""
    return DOC_SEPARATOR.join(documents(name, split=split))


def _cut_points(doc: str) -> tuple[list[int], list[int]]:
    """Positions ``i`` where ``doc[i]`` is the last whitespace before a non-space (newlines, other whitespace)."""
    newline, other = [], []
    for m in re.finditer(r"\s(?=\S)", doc):
        (newline if m.group() == "\n" else other).append(m.start())
    return newline, other


def _pieces(doc: str, max_chars: int = _MAX_PIECE_CHARS) -> list[str]:
    """Cut a document into pieces of at most ~max_chars whose concatenation is the document.

    Cuts go right before the last whitespace character preceding a word (preferably a newline), which is where
    byte-level BPE pre-tokenisers (GPT-2, Llama-3, SmolLM2) split anyway, so tokenising the pieces gives the same
    ids as tokenising the whole text (checked for SmolLM2 in the tests; approximate for other tokenisers).
    """
    if len(doc) <= max_chars:
        return [doc]
    newline, other = _cut_points(doc)
    out, start = [], 0
    while len(doc) - start > max_chars:
        limit = start + max_chars
        cut = max((i for i in newline if start + max_chars // 4 < i <= limit), default=None)
        if cut is None:
            cut = max((i for i in other if start < i <= limit), default=limit)
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def _text_pieces(name: str, split: str) -> list[str]:
    """Pieces whose concatenation is exactly ``text(name, split=split)``; separators open the next document."""
    pieces: list[str] = []
    for i, doc in enumerate(documents(name, split=split)):
        parts = _pieces(doc)
        if i > 0:
            parts[0] = DOC_SEPARATOR + parts[0]
        pieces.extend(parts)
    return pieces


def _tokenizer_key(tokenizer: Any) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None) or id(tokenizer),
            getattr(tokenizer, "vocab_size", None))


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize_split(name: str, tokenizer: Any, *, split: str = "eval") -> torch.Tensor:
    """All token ids of one split as a 1-D LongTensor (no special tokens), cached per (corpus, split, tokenizer)."""
    _check(name, split)
    key = (name, split, _tokenizer_key(tokenizer))
    if key not in _TOKEN_CACHE:
        ids = tokenizer(_text_pieces(name, split), add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor([t for piece in ids for t in piece], dtype=torch.long)
    return _TOKEN_CACHE[key]


def text_chunks(name: str, tokenizer: Any, *, chunk_len: int, n_chunks: int | None = None, split: str = "eval",
                seed: int | None = None) -> torch.Tensor:
    """Non-overlapping chunks of exactly ``chunk_len`` tokens of a split, shape ``(n, chunk_len)``.

    The split's token stream is cut from its start into consecutive chunks (the remainder is dropped).
    ``n_chunks=None`` returns them all; otherwise the first ``n_chunks`` (``seed=None``) or a seeded random subset
    of ``n_chunks`` (kept in stream order). Asking for more chunks than exist raises ``ValueError``.
    """
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
    ids = tokenize_split(name, tokenizer, split=split)
    available = ids.numel() // chunk_len
    chunks = ids[: available * chunk_len].view(available, chunk_len)  # (available, chunk_len)
    if n_chunks is None:
        return chunks.clone()
    if n_chunks < 1 or n_chunks > available:
        raise ValueError(f"n_chunks={n_chunks} but {name}/{split} has {available} chunks of {chunk_len} tokens "
                         f"({ids.numel()} tokens); ask for 1..{available} or a shorter chunk_len")
    if seed is None:
        return chunks[:n_chunks].clone()
    pick = np.sort(np.random.default_rng(seed).choice(available, size=n_chunks, replace=False))
    return chunks[torch.from_numpy(pick)].clone()
