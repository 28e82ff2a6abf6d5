"""Attention-score bias: the three importance scores, the metric frames, and the bias itself on a built case."""

import pytest
import torch

import kvlab
from kvlab.analysis.bias import (CORRELATION_COLUMNS, DECILE_COLUMNS, OVERLAP_COLUMNS, SCORES, attention_bias,
                                 bias_frames, importance_from_probs, kept_mask, spearman)


def _content_attention(weights: torch.Tensor) -> torch.Tensor:
    """Causal probabilities (1, 1, T, T) where query q attends to key k <= q in proportion to a fixed importance w_k:
    what each token is worth does not depend on its position, but early tokens are seen by more queries."""
    t = weights.shape[-1]
    causal = torch.ones(t, t).tril().bool()
    probs = weights[None, :].expand(t, t).masked_fill(~causal, 0.0)
    return (probs / probs.sum(-1, keepdim=True))[None, None]


@pytest.mark.parametrize("total,context,seed", [(240, 180, 0), (97, 61, 1), (400, 300, 2)])
def test_length_normalised_score_tracks_the_oracle_better_than_accumulated(total, context, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.randn(total, generator=g, dtype=torch.float64))  # log-normal importance
    probs = _content_attention(weights)
    scores = importance_from_probs(probs, context, total - context)
    # the oracle is exactly proportional to the importance: future queries see every context key
    assert spearman(scores["oracle"][0, 0].numpy(), weights[:context].numpy()) == pytest.approx(1.0)
    corr, deciles, overlap = bias_frames({k: v[:, None] for k, v in scores.items()}, layers=[0], budgets=(0.2,))
    rho = corr.set_index("score")["spearman"]
    assert rho["normalized"] >= rho["accumulated"] + 0.1
    first = deciles[deciles.decile == 0].set_index("score")["share"]
    assert first["accumulated"] > first["oracle"]  # accumulated scores keep too many early tokens
    ov = overlap.set_index("score")["overlap"]
    assert ov["normalized"] >= ov["accumulated"]


def test_scores_follow_the_mask_for_counts():
    probs = _content_attention(torch.ones(6, dtype=torch.float64))  # uniform causal attention
    s = importance_from_probs(probs, 4, 2)
    # key k is seen by the context queries k..3: accumulated = sum_{q=k}^{3} 1/(q+1), normalised = that / (4 - k)
    expected = torch.tensor([sum(1 / (q + 1) for q in range(k, 4)) for k in range(4)], dtype=torch.float64)
    torch.testing.assert_close(s["accumulated"][0, 0], expected)
    torch.testing.assert_close(s["normalized"][0, 0], expected / torch.tensor([4.0, 3, 2, 1], dtype=torch.float64))
    torch.testing.assert_close(s["oracle"][0, 0], torch.tensor([1 / 5 + 1 / 6] * 4, dtype=torch.float64))


@pytest.mark.parametrize("level", ["kv", "query"])
@pytest.mark.parametrize("n_seqs,total,context,n_future", [(3, 41, 29, 9), (1, 23, 11, 12)])
def test_model_pass_equals_captured_probabilities_and_frames_are_tidy(tiny, level, n_seqs, total, context, n_future):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids = torch.randint(3, 97, (n_seqs, total))
    res = attention_bias(tiny, ids, context_len=context, n_future=n_future, budgets=(0.2, 0.5), batch_size=2,
                         level=level, query_chunk=7)
    heads = spec.n_kv_heads if level == "kv" else spec.n_heads
    cap = kvlab.capture(tiny, ids[:, : context + n_future], what=("probs",))
    for i in range(spec.n_layers):
        seen = cap.probs[i][:, :1] > 0  # (B, 1, T, T) what each query sees (sliding windows included)
        ref = importance_from_probs(cap.probs[i], context, n_future, seen, spec.n_kv_heads if level == "kv" else None)
        for name in SCORES:
            torch.testing.assert_close(res.scores[name][:, i], ref[name].float(), atol=1e-5, rtol=1e-5)
    assert res.scores["oracle"].shape == (n_seqs, spec.n_layers, heads, context)
    assert list(res.correlation.columns) == CORRELATION_COLUMNS
    assert list(res.deciles.columns) == DECILE_COLUMNS
    assert list(res.overlap.columns) == OVERLAP_COLUMNS
    assert len(res.correlation) == n_seqs * spec.n_layers * heads * 2
    sums = res.deciles.groupby(["seq", "layer", "head", "score", "budget"])["share"].sum()
    assert len(sums) == n_seqs * spec.n_layers * heads * 3 * 2
    assert ((sums - 1).abs() < 1e-9).all()  # shares of each kept set sum to 1
    assert res.overlap["overlap"].between(0, 1).all()
    assert res.correlation["spearman"].dropna().between(-1, 1).all()
    summary = res.summary()
    assert set(summary.columns) == {"score", "budget", "spearman", "overlap", "first_decile", "last_decile"}


def test_sliding_window_layers_count_only_queries_that_see_the_key():
    model = kvlab.tiny_model("gemma3")  # sliding window 8 on layers 0, 1
    res = attention_bias(model, torch.randint(3, 97, (1, 30)), context_len=20, n_future=10)
    acc, norm = res.scores["accumulated"][0, 0, 0], res.scores["normalized"][0, 0, 0]
    torch.testing.assert_close(norm[:12], acc[:12] / 8)  # each early key is seen by the 8 queries of its window
    torch.testing.assert_close(res.scores["oracle"][0, 0, 0, :2], torch.zeros(2))  # out of every future window


def test_kept_mask_and_errors():
    keep = kept_mask(torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]]), 0.4)
    assert keep.tolist() == [[False, True, False, True, False]]
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 20))
    with pytest.raises(ValueError, match="exceeds the 20 tokens"):
        attention_bias(model, ids, context_len=15, n_future=6)
    with pytest.raises(ValueError, match="level must be one of kv, query"):
        attention_bias(model, ids, context_len=15, n_future=5, level="group")
    with pytest.raises(ValueError, match=r"budgets must be a non-empty list of fractions in \(0, 1\]"):
        attention_bias(model, ids, context_len=15, n_future=5, budgets=(0.0,))
    with pytest.raises(ValueError, match="layers"):
        attention_bias(model, ids, context_len=15, n_future=5, layers=[7])
    with pytest.raises(ValueError, match="skip_first"):
        attention_bias(model, ids, context_len=15, n_future=5, skip_first=14)
