"""Token eviction (StreamingLLM, H2O, SnapKV): exact at budget 1, keeps what each paper says (checked against
independent computations from captured probabilities), frees bytes, handles left padding and batch expansion."""

import math

import pytest
import torch
import torch.nn.functional as F

import kvlab
from kvlab import attention
from kvlab.cache.eviction import EvictionLayer, softmax_attention
from kvlab.methods.token import H2O, SnapKV, Streaming
from conftest import left_padded_batch

METHODS = {"streaming": lambda b: Streaming(b, sinks=3), "h2o": lambda b: H2O(b),
           "snapkv": lambda b: SnapKV(b, window=4, kernel=5)}


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _forward(model, ids, mask, pos, cache=None):
    return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None).logits


@torch.no_grad()
def _context_run(model, method, ids, mask, pos, cont, steps: int = 2):
    """Prefill ``ids``, compress, feed ``cont`` (B, Tc) in one forward, then its last ``steps`` tokens one by one.
    Returns the logits of every continuation token (B, Tc + steps, V), the cache and the full 2-D mask."""
    out = []
    with method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, model=model, attention_mask=mask, position_ids=pos, setting="query_aware")
        mask = torch.cat([mask, torch.ones_like(cont)], 1)
        last = pos[:, -1:]
        cpos = last + 1 + torch.arange(cont.shape[1])
        out.append(_forward(model, cont, mask, cpos, cache))
        for t in range(steps):
            mask = torch.cat([mask, torch.ones_like(cont[:, :1])], 1)
            out.append(_forward(model, cont[:, t: t + 1], mask, cpos[:, -1:] + 1 + t, cache))
    return torch.cat(out, 1), cache, mask


def _reference(model, ids, mask, cont, steps: int = 2):
    """The plain model on the same tokens: logits at the continuation positions."""
    all_ids = torch.cat([ids, cont, cont[:, :steps]], 1)
    all_mask = torch.cat([mask, torch.ones(len(ids), cont.shape[1] + steps, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = _forward(model, all_ids, all_mask, (all_mask.cumsum(-1) - 1).clamp(min=0))
    return logits[:, ids.shape[1]:]


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("lengths", [[13], [19, 7, 12]])
def test_budget_one_equals_full_cache(tiny, name, lengths):
    ids, mask, pos = left_padded_batch(97, lengths, seed=len(lengths))
    cont = torch.randint(3, 97, (len(lengths), 5))
    ours, cache, _ = _context_run(tiny, METHODS[name](1.0), ids, mask, pos, cont)
    torch.testing.assert_close(ours, _reference(tiny, ids, mask, cont), atol=1e-5, rtol=0)
    layer = cache.layers[-1]
    assert int((layer.index >= 0).sum()) == layer.n_heads * (sum(lengths) + 7 * len(lengths))  # padding dropped


@pytest.mark.parametrize("shape", [(1, 6, 3, 16, 8), (2, 9, 3, 7, 5), (3, 4, 4, 1, 11)])
def test_softmax_attention_equals_sdpa_with_gqa_and_padding_rows(shape):
    batch, heads, n_kv, queries, keys = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, t, 8, generator=g) for h, t in ((heads, queries), (n_kv, keys), (n_kv, keys)))
    mask = torch.rand(batch, n_kv, queries, keys, generator=g) > 0.3
    mask[0, :, 0] = False  # a query that sees nothing (padding)
    out, received = softmax_attention(q, k, v, mask, None, chunk=3)
    ref = attention.sdpa(q, k, v, mask.repeat_interleave(heads // n_kv, 1), None)
    rows = mask.repeat_interleave(heads // n_kv, 1).any(-1).transpose(1, 2)  # (B, Q, H) rows with a visible key
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-6, rtol=0)
    probs = torch.softmax((q @ k.repeat_interleave(heads // n_kv, 1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~mask.repeat_interleave(heads // n_kv, 1), float("-inf")), -1).nan_to_num(0)
    torch.testing.assert_close(received, probs.sum(2).view(batch, n_kv, heads // n_kv, keys), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- what is kept


def _kept_sets(cache, mask):
    """Per layer: list over rows of list over heads of sorted kept position ids."""
    out = []
    for layer in cache.layers:
        pos = layer.kept_positions(mask)
        out.append([[sorted(p[p >= 0].tolist()) for p in row] for row in pos])
    return out


@pytest.mark.parametrize("lengths,sinks,budget", [([23], 4, 0.5), ([17, 9, 30], 2, 0.3), ([6, 11], 5, 0.2),
                                                  ([12, 12], 0, 0.25)])
def test_streaming_keeps_sinks_and_recent_positions(lengths, sinks, budget):
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, lengths, seed=2)
    method = Streaming(budget, sinks=sinks)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, attention_mask=mask)
    for layer_sets in _kept_sets(cache, mask):
        for n, heads in zip(lengths, layer_sets):
            keep = max(1, _round(budget * n))
            first = list(range(min(sinks, keep)))
            expected = first + list(range(n - (keep - len(first)), n))
            assert all(h == expected for h in heads)
    assert cache.layers[0].shared_heads


def _received(probs, n_kv):
    """Independent H2O score: probs (B, H, Q, K) summed over queries and over each kv head's query heads."""
    b, h, q, k = probs.shape
    return probs.sum(2).view(b, n_kv, h // n_kv, k).sum(2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("lengths,budget,recent_frac", [([21], 0.4, 0.5), ([15, 26], 0.3, 0.25),
                                                        ([9, 14, 5], 0.6, 0.0)])
def test_h2o_keeps_recent_plus_heaviest_hitters(arch, lengths, budget, recent_frac):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, lengths, seed=5)
    cap = kvlab.capture(model, ids, mask, what=("probs",))
    method = H2O(budget, recent_frac=recent_frac)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        for i, layer in enumerate(cache.layers):  # the accumulated scores equal the captured ones
            torch.testing.assert_close(layer.scores, _received(cap.probs[i], spec.n_kv_heads), atol=1e-5, rtol=0)
        method.compress(cache, attention_mask=mask)
    width = ids.shape[1]
    for i, layer_sets in enumerate(_kept_sets(cache, mask)):
        scores = _received(cap.probs[i], spec.n_kv_heads)  # (B, H_kv, T) by column
        for row, (n, heads) in enumerate(zip(lengths, layer_sets)):
            keep = max(1, _round(budget * n))
            n_recent = _round(recent_frac * keep)
            recent = list(range(n - n_recent, n))
            for h, kept in enumerate(heads):
                others = scores[row, h, width - n: width - n_recent]  # real, non-recent positions 0 .. n - n_recent
                heavy = others.topk(keep - n_recent).indices.tolist()
                assert kept == sorted(heavy + recent), (i, row, h)
    assert cache.layers[0].scores is None  # freed after compress (no decode-time eviction)


def _snapkv_reference(probs, n_real, width, window, kernel, n_kv, keep):
    """Independent SnapKV for one row: probs (H, T, T) of a left-padded row with ``n_real`` real tokens."""
    heads = probs.shape[0]
    w = min(window, n_real)
    real = probs[:, width - n_real:, width - n_real:]  # (H, n, n) real part
    obs = real[:, n_real - w:, : n_real - w].sum(1)  # (H, n - w) window queries -> earlier keys
    pooled = torch.stack([torch.stack([obs[h, max(0, k - kernel // 2): k + kernel // 2 + 1].max()
                                       for k in range(n_real - w)]) for h in range(heads)]) if n_real > w else obs
    score = pooled.view(n_kv, heads // n_kv, -1).sum(1)  # (H_kv, n - w)
    raw = obs.view(n_kv, heads // n_kv, -1).sum(1)
    out = []
    for h in range(n_kv):
        if keep <= w:
            out.append(list(range(n_real - keep, n_real)))
        else:  # ties of the pooled score: higher raw score, then later position
            ranked = sorted(range(n_real - w), key=lambda k: (float(score[h, k]), float(raw[h, k]), k), reverse=True)
            out.append(sorted(ranked[: keep - w] + list(range(n_real - w, n_real))))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("lengths,budget,window,kernel", [([30], 0.4, 6, 7), ([25, 13], 0.5, 4, 3),
                                                          ([18, 7, 11], 0.3, 5, 1), ([20], 0.1, 8, 5)])
def test_snapkv_matches_independent_computation(arch, lengths, budget, window, kernel):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, lengths, seed=7)
    cap = kvlab.capture(model, ids, mask, what=("probs",))
    method = SnapKV(budget, window=window, kernel=kernel)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, attention_mask=mask)
    for i, layer_sets in enumerate(_kept_sets(cache, mask)):
        for row, (n, heads) in enumerate(zip(lengths, layer_sets)):
            keep = max(1, _round(budget * n))
            expected = _snapkv_reference(cap.probs[i][row], n, ids.shape[1], window, kernel, spec.n_kv_heads, keep)
            assert heads == expected, (i, row)


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("arch,batch,tokens,budget", [("llama", 1, 37, 0.5), ("gpt2", 3, 50, 0.2),
                                                      ("gemma3", 2, 29, 0.35)])
def test_measured_bytes_after_compress(name, arch, batch, tokens, budget):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (batch, tokens))
    method = METHODS[name](budget)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        method.compress(cache)
    b = cache.kv_bytes("fp32")
    keep = _round(budget * tokens)
    assert b.theoretical == batch * keep * spec.kv_bytes_per_token() // 1  # exactly the kept entries
    assert b.full == batch * tokens * spec.kv_bytes_per_token()
    assert b.theoretical <= b.measured <= 1.02 * b.theoretical  # + int16 column index
    assert abs(b.theoretical_budget - budget) <= 0.5 / tokens + 1e-12
    assert all(layer.keys.shape == (batch, spec.n_kv_heads, keep, spec.head_dim) for layer in cache.layers)


def test_ragged_per_head_counts_store_empty_slots_and_count_allocation():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 20))
    method = Streaming(1.0)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        method.compress(cache)
        layer = cache.layers[1]
        layer.evict(torch.tensor([[5, 9], [7, 3]]))  # a later method may keep different counts per (row, head)
    assert layer.keys.shape[2] == 9 and layer.occupied().tolist() == [[5, 9], [7, 3]]
    assert (layer.index[0, 0, 5:] == -1).all()
    rows = [r for r in layer.accounting() if r["part"] == "K"]
    assert [r["theoretical"] for r in rows] == [(5 + 7) * 16 * 4, (9 + 3) * 16 * 4]
    # still attends correctly: one decode step equals attention restricted to the kept columns
    step = torch.randint(3, 97, (2, 1))
    with torch.no_grad(), kvlab.attach(model):
        _forward(model, step, torch.ones(2, 21, dtype=torch.long), torch.full((2, 1), 20), cache)
    assert layer.occupied().tolist() == [[6, 10], [8, 4]]


# ---------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padded_batch_equals_batch_of_one(name, arch):
    model = kvlab.tiny_model(arch)
    lengths = [17, 9, 24]
    ids, mask, pos = left_padded_batch(97, lengths, seed=11)
    cont = torch.randint(3, 97, (3, 4))
    method = METHODS[name](0.5)
    batched, cache, full_mask = _context_run(model, method, ids, mask, pos, cont)
    sets = _kept_sets(cache, full_mask)
    for row, n in enumerate(lengths):
        one = ids[row:row + 1, -n:]
        alone, cache1, mask1 = _context_run(model, method, one, torch.ones_like(one), torch.arange(n)[None],
                                            cont[row:row + 1])
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=0)
        assert [s[row] for s in sets] == [s[0] for s in _kept_sets(cache1, mask1)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_select_indices_expands_a_compressed_context(name):
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, [15, 22], seed=13)
    method = METHODS[name](0.4)
    select = torch.tensor([1, 0, 1, 1])
    conts = torch.randint(3, 97, (4, 5))
    cmask = torch.ones_like(conts)
    cmask[1, 3:] = 0  # right padding of a shorter continuation
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, attention_mask=mask)
        cache.batch_select_indices(select)
        full_mask = torch.cat([mask[select], cmask], 1)
        cpos = attention.padded_positions(cmask, mask.sum(-1)[select])
        expanded = _forward(model, conts, full_mask, cpos, cache)
    assert cache.layers[0].batch_size == 4
    for k, row in enumerate(select.tolist()):
        n = int(mask[row].sum())
        with torch.no_grad(), method.apply(model) as single:
            one = ids[row:row + 1, -n:]
            _forward(model, one, None, torch.arange(n)[None], single)
            method.compress(single)
            m = int(cmask[k].sum())
            ref = _forward(model, conts[k:k + 1, :m], None, torch.arange(n, n + m)[None], single)
        torch.testing.assert_close(expanded[k, :m], ref[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("method", [H2O(0.4, decode=True), Streaming(0.3, sinks=2, decode=True)], ids=repr)
def test_decode_eviction_keeps_the_budget(method):
    model = kvlab.tiny_model("gpt2")
    ids, mask, pos = left_padded_batch(97, [18, 11], seed=3)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, attention_mask=mask)
        last = pos[:, -1:]
        for t in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            _forward(model, torch.randint(3, 97, (2, 1)), mask, last + 1 + t, cache)
            for layer in cache.layers:
                expected = torch.floor(method.budget * layer.real_seen.double() + 0.5).long()
                assert layer.occupied().tolist() == expected[:, None].expand(-1, layer.n_heads).tolist()
    if isinstance(method, Streaming):
        for heads, n in zip(_kept_sets(cache, mask)[0], [24, 17]):
            keep = _round(0.3 * n)
            assert heads[0] == [0, 1] + list(range(n - keep + 2, n))
    else:
        assert cache.layers[0].scores is not None  # kept (and counted) for decode-time eviction


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make,match", [
    (lambda: Streaming(0.0), r"budget must be in \(0, 1\]"),
    (lambda: H2O(1.5), r"budget must be in \(0, 1\]"),
    (lambda: SnapKV(-0.2), r"budget must be in \(0, 1\]"),
    (lambda: Streaming(0.5, sinks=-1), "sinks must be an int >= 0"),
    (lambda: Streaming(0.5, sinks=2.5), "sinks takes an integer, got 2.5"),  # the type check (methods.options)
    (lambda: H2O(0.5, recent_frac=1.2), r"recent_frac must be in \[0, 1\]"),
    (lambda: SnapKV(0.5, window=0), "window must be an int >= 1"),
    (lambda: SnapKV(0.5, kernel=4), "kernel must be odd"),
    (lambda: SnapKV(0.5, pooling="mean"), "pooling must be one of max, avg"),
])
def test_bad_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_throughout_protocol_and_misuse_fail_loudly():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 10))
    method = H2O(0.5)
    with torch.no_grad(), method.apply(model) as cache:
        with pytest.raises(RuntimeError, match="the cache is empty"):
            method.compress(cache)
        _forward(model, ids, None, None, cache)
        with pytest.raises(RuntimeError, match="protocol='context'"):
            cache.kv_bytes("fp32")
        with pytest.raises(RuntimeError, match="protocol='context'"):
            _forward(model, ids[:, :1], torch.ones(2, 11, dtype=torch.long), torch.full((2, 1), 10), cache)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, tokens seen\) = \(2, 10\)"):
            method.compress(cache, attention_mask=torch.ones(2, 9))
        with pytest.raises(ValueError, match="was built by"):
            H2O(0.3).compress(cache)
    with pytest.raises(ValueError, match="eviction layers"):
        method.compress(kvlab.methods.Full().new_cache(model))
    assert Streaming.protocols == H2O.protocols == SnapKV.protocols == ("context",)
    assert isinstance(method.new_cache(model).layers[0], EvictionLayer)


def test_perplexity_context_protocol_runs_and_reports_budget():
    from kvlab.eval.perplexity import perplexity

    model = kvlab.tiny_model("llama")
    chunks = torch.randint(3, 97, (3, 40))
    full = perplexity(model, None, kvlab.methods.Full(), chunks, protocol="context", progress=False)
    same = perplexity(model, None, H2O(1.0), chunks, protocol="context", progress=False)
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    half = perplexity(model, None, SnapKV(0.5, window=4), chunks, protocol="context", progress=False)
    # context of 20 tokens kept at half, the 19 fed continuation tokens in full: (10 + 19) / 39
    assert half["kv_bytes"]["theoretical_budget"] == pytest.approx(29 / 39)
    with pytest.raises(RuntimeError, match="protocol='context'"):
        perplexity(model, None, Streaming(0.5), chunks, protocol="throughout", progress=False)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_long_context_harness_batched_equals_one_by_one(name, setting):
    from kvlab.eval.longcontext import greedy_generate

    model = kvlab.tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [(torch.randint(3, 97, (n,), generator=g).tolist(), torch.randint(3, 97, (q,), generator=g).tolist())
               for n, q in [(30, 3), (17, 6), (25, 4)]]  # question padding sits between document and question
    method = METHODS[name](0.4)
    kwargs = dict(setting=setting, max_new_tokens=6, progress=False)
    assert (greedy_generate(model, method, prompts, batch_size=3, **kwargs)
            == greedy_generate(model, method, prompts, batch_size=1, **kwargs))


@pytest.mark.parametrize("method", [Streaming(0.5), H2O(0.5), SnapKV(0.5, window=4)], ids=lambda m: m.name)
def test_decoding_appends_in_place_with_spare_slots(method):
    """After compress, one-token steps write into spare slots (grown by a sixteenth, at least MIN_GROW) instead of
    re-allocating every step; the spare slots are counted in measured bytes and never read."""
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, [30, 21], seed=9)
    logits, cache, full = _context_run(model, method, ids, mask, pos, torch.randint(3, 97, (2, 3)), steps=3)
    layer = cache.layers[0]
    assert layer._keys.shape[2] > layer.slots == layer.keys.shape[2] == layer.index.shape[2]
    buffer, slots = layer._keys.data_ptr(), layer.slots
    with torch.no_grad(), kvlab.attach(model):
        full = torch.cat([full, torch.ones(2, 1, dtype=full.dtype)], dim=1)
        _forward(model, torch.randint(3, 97, (2, 1)), full, (full.cumsum(-1) - 1)[:, -1:], cache)
    assert layer._keys.data_ptr() == buffer and layer.slots == slots + 1  # appended in place
    kb = kvlab.kv_bytes(cache, "fp32")
    assert kb.measured > kb.theoretical  # the spare slots are allocated, so measured
    assert torch.isfinite(logits).all()
