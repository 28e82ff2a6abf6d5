"""Needle trace (issue 22's diagnosis): the value's columns are the digits, at budget 1 every head keeps them all,
the retrieval share is a share, and an evicting method's counts and kept fractions are what its cache holds."""

import pytest
import torch

import kvlab
from kvlab.analysis.needle_trace import needle_trace, retrieval_share, value_columns
from kvlab.eval.longcontext import build_prompt


@pytest.fixture(scope="module")
def item(smollm2):
    _, tok = smollm2
    return kvlab.data.needle(tok, context_len=200, depth=0.4, seed=1)[0]


def test_value_columns_are_the_digits(smollm2, item):
    _, tok = smollm2
    doc, _ = build_prompt(tok, item.context, item.question)
    cols = value_columns(tok, doc, item)
    assert cols == list(range(cols[0], cols[-1] + 1))
    assert tok.decode([doc[c] for c in cols]).strip() == item.answers[0]


def test_full_budget_keeps_the_value_everywhere_and_eviction_counts_match(smollm2, item):
    model, tok = smollm2
    spec = kvlab.ModelSpec.from_model(model)
    full = needle_trace(model, tok, kvlab.methods.get("kvcompress", 1.0, window=8), item)
    assert full.kept.shape == (spec.n_layers, spec.n_kv_heads) and bool(full.all_kept().all())
    assert (full.counts == full.n_tokens).all()
    tight = needle_trace(model, tok, kvlab.methods.get("snapkv", 0.25, window=8), item, setting="query_agnostic")
    assert tight.n_tokens < full.n_tokens  # the question is not prefilled
    assert (tight.counts == round(0.25 * tight.n_tokens)).all()  # snapkv: equal counts per head
    assert ((tight.kept >= 0) & (tight.kept <= 1)).all() and not bool(tight.all_kept().all())


def test_retrieval_share_is_a_share(smollm2, item):
    model, tok = smollm2
    share = retrieval_share(model, tok, item, window=8)
    assert share.shape == (30, 3) and bool(((share >= 0) & (share <= 1)).all()) and float(share.max()) > 0
    with pytest.raises(ValueError, match="unknown setting"):
        retrieval_share(model, tok, item, setting="aware")
