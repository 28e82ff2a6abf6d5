"""KV-Compress: the metric equals an independent computation from captured attention, one global budget gives
per-head variable counts in whole blocks, eviction really frees blocks (pool and measured bytes follow the
theoretical saving), the harnesses run it, and bad options fail loudly."""

import math

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.methods.kvcompress import KVCompress
from kvlab.cache.paged import PagedCache
from conftest import left_padded_batch


def _forward(model, ids, mask, pos, cache=None):
    return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None).logits


def _compressed(model, method, ids, mask=None, pos=None):
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        before = cache.pool.blocks_in_use
        method.compress(cache, attention_mask=mask)
    return cache, before


def _metric(probs, n, width, window, metric, kernel, agg, n_kv, align="center"):
    """Independent KV-Compress metric for one row: probs (H, T, T) of a left-padded row with ``n`` real tokens ->
    (H_kv, n) per real token (window tokens unpooled)."""
    w = min(window, width)
    obs = probs[:, width - w:, width - n:]  # (H, w, n) window queries -> real keys
    per_head = {"l1": obs.sum(1), "l2": obs.square().sum(1).sqrt(), "max": obs.amax(1)}[metric]  # (H, n)
    earlier = n - min(w, n)  # real tokens before the window
    if kernel > 1 and earlier:
        pooled = per_head.clone()
        for k in range(earlier):
            lo, hi = (k - kernel + 1, k + 1) if align == "after" else (k - kernel // 2, k + kernel // 2 + 1)
            pooled[:, k] = per_head[:, max(0, lo): min(earlier, hi)].amax(-1)
        per_head = pooled
    grouped = per_head.view(n_kv, -1, n)
    return grouped.sum(1) if agg == "sum" else grouped.amax(1)


def _kept_columns(layer, b, h):
    index = layer.index[b, h]
    return sorted(index[index >= 0].tolist())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("metric,agg,kernel,align", [("l1", "sum", 1, "center"), ("l2", "max", 1, "center"),
                                                     ("l2", "sum", 3, "center"), ("max", "sum", 3, "center"),
                                                     ("l2", "sum", 5, "after")])
def test_keeps_protected_then_best_metric_in_whole_blocks_with_a_global_budget(arch, metric, agg, kernel, align):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    lengths, S, window, sinks, budget = [60, 37], 4, 6, 2, 0.3
    ids, mask, pos = left_padded_batch(97, lengths, seed=7)
    width = ids.shape[1]
    cap = kvlab.capture(model, ids, mask, what=("probs",))
    method = KVCompress(budget, window=window, metric=metric, group_agg=agg, kernel=kernel, sinks=sinks, block_size=S,
                        pool_align=align)
    cache, _ = _compressed(model, method, ids, mask, pos)
    for b, n in enumerate(lengths):
        counts = torch.stack([layer.lengths[b] for layer in cache.layers])  # (L, H_kv)
        target = math.floor(budget * n * spec.n_layers * spec.n_kv_heads + 0.5)
        assert abs(int(counts.sum()) - target) <= S / 2  # one global budget, nearest whole blocks
        assert all(int(c) % S == 0 or int(c) == n for c in counts.flatten())  # whole blocks (or everything)
        units = []  # (mean metric, layer, head, first unit?) of the last unit taken / first left, per head
        for i, layer in enumerate(cache.layers):
            m = _metric(cap.probs[i][b], n, width, window, metric, kernel, agg, spec.n_kv_heads, align)  # (H_kv, n)
            for h in range(spec.n_kv_heads):
                kept = [c - (width - n) for c in _kept_columns(layer, b, h)]  # real-token positions 0..n-1
                protected = set(range(sinks)) | set(range(n - window, n))
                assert protected <= set(kept), (i, b, h)  # sinks and the observation window are kept
                others = [k for k in range(n) if k not in protected]
                kept_others = sorted((float(m[h, k]) for k in kept if k not in protected), reverse=True)
                dropped = sorted((float(m[h, k]) for k in others if k not in kept), reverse=True)
                if kept_others and dropped:
                    assert kept_others[-1] >= dropped[0] - 1e-6  # the best of the others, by the metric
                extra = len(kept) - len(protected)
                first = math.ceil(len(protected) / S) * S - len(protected)  # the mandatory unit's other tokens
                if extra > first:  # a taken unit of S tokens (the last one) vs the first unit left behind
                    units.append(("taken", sum(kept_others[-S:]) / S))
                if dropped:
                    units.append(("left", sum(dropped[:S]) / min(S, len(dropped))))
        taken = [v for kind, v in units if kind == "taken"]
        left = [v for kind, v in units if kind == "left"]
        if taken and left:  # no head's next block is worth more than another head's last block
            assert min(taken) >= max(left) - 1e-6


def test_heads_keep_different_counts_that_sum_to_the_budget():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 200))
    S = 8
    cache, _ = _compressed(model, KVCompress(0.25, block_size=S, window=8), ids)
    counts = torch.stack([layer.lengths[0] for layer in cache.layers]).flatten()
    assert counts.unique().numel() > 1  # variable compression rate per (layer, head)
    target = 0.25 * 200 * len(counts)
    assert abs(int(counts.sum()) - target) <= S * len(counts)  # within one block per head (in fact half a block)
    assert abs(int(counts.sum()) - target) <= S / 2
    assert (counts % S == 0).all() and (counts >= 16).all()  # whole blocks, at least sinks + window rounded up


def test_layer_scope_gives_every_layer_its_own_budget_ranked_across_its_heads():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (2, 200))
    S, budget = 8, 0.25
    layered, _ = _compressed(model, KVCompress(budget, block_size=S, window=8, scope="layer"), ids)
    whole, _ = _compressed(model, KVCompress(budget, block_size=S, window=8), ids)
    target = budget * 200 * spec.n_kv_heads
    per_layer = torch.stack([layer.lengths.sum(-1) for layer in layered.layers])  # (L, B)
    assert ((per_layer - target).abs() <= S / 2).all()  # each layer holds its own share, nearest whole blocks
    model_wide = torch.stack([layer.lengths.sum(-1) for layer in whole.layers])
    assert (model_wide - target).abs().max() > S  # the model-wide ranking moves tokens between layers
    assert abs(int(model_wide.sum(0)[0]) - budget * 200 * spec.n_kv_heads * spec.n_layers) <= S / 2
    for layer in layered.layers:  # heads within a layer still keep different counts, in whole blocks
        assert (layer.lengths % S == 0).all()
    assert torch.cat([layer.lengths.flatten() for layer in layered.layers]).unique().numel() > 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("options", [{}, {"floor": 20, "kernel": 7, "pool_align": "after", "metric": "max"}])
def test_eviction_frees_blocks_and_measured_bytes_follow_the_theoretical_ones(arch, budget, options):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    batch, tokens, S = 2, 300, 4
    ids = torch.randint(3, 97, (batch, tokens))
    method = KVCompress(budget, block_size=S, window=8, **options)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        before = cache.pool.blocks_in_use
        tables_before = torch.cat([layer.block_tables.flatten() for layer in cache.layers])
        method.compress(cache)
    pool = cache.pool
    assert before == spec.n_layers * batch * spec.n_kv_heads * math.ceil(tokens / S)
    after = pool.blocks_in_use
    assert abs(after - budget * before) <= batch  # the pool holds ~budget x the blocks (whole blocks, per row)
    tables = torch.cat([layer.block_tables.flatten() for layer in cache.layers])
    tables = set(tables[tables >= 0].tolist())
    freed = set(tables_before.tolist()) - tables
    assert len(freed) == before - after and freed <= set(pool.free_ids)  # freed ids are on the free list
    assert not tables & set(pool.free_ids)
    assert after == sum(layer.blocks_in_use() for layer in cache.layers)
    b = cache.kv_bytes("fp32")
    assert b.full == batch * tokens * spec.kv_bytes_per_token()
    assert b.theoretical <= b.measured <= 1.05 * b.theoretical  # physical memory = the theoretical saving
    assert b.measured >= after * pool.block_bytes  # blocks in use are counted...
    assert b.measured < pool.capacity_bytes  # ...not the pool's reservation (the free blocks)
    assert abs(b.theoretical_budget - budget) <= S / 2 / (tokens * spec.n_layers * spec.n_kv_heads) + 1e-12


def test_allocation_takes_the_best_blocks_over_all_heads():
    method = KVCompress(0.5, block_size=2)
    inf = float("-inf")
    free = torch.tensor([[[9, 8, 7, 6, 5, inf], [4, 3, 2, 1, inf, inf]]], dtype=torch.float64)  # (L=1, H=2, C)
    n = torch.tensor([[6, 5]])
    protected = torch.tensor([[1, 1]])
    assert method._allocate(free, n, protected, 1).tolist() == [[2, 2]]  # at least the protected, in whole blocks
    assert method._allocate(free, n, protected, 6).tolist() == [[4, 2]]  # the best block: head 0's (8, 7)
    assert method._allocate(free, n, protected, 8).tolist() == [[6, 2]]
    assert method._allocate(free, n, protected, 9).tolist() == [[6, 4]]
    assert method._allocate(free, n, protected, 10).tolist() == [[6, 4]]  # the last block (1 token) -> 11: no
    assert method._allocate(free, n, protected, 100).tolist() == [[6, 5]]  # everything (head 1 not a multiple)


def test_protection_shrinks_to_the_budget_at_high_compression():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 256))
    cache, _ = _compressed(model, KVCompress(1 / 64, block_size=4, window=32, sinks=4), ids)
    counts = torch.stack([layer.lengths[0] for layer in cache.layers]).flatten()
    assert counts.tolist() == [4] * len(counts)  # 256 / 64: sinks + the last window tokens, one block each
    kept = cache.layers[0].index[0, 0].tolist()[:4]
    assert kept == [0, 1, 2, 3]  # sinks first (window shrank to 0)


@pytest.mark.parametrize("setting", ["query_aware", "query_agnostic"])
def test_long_context_harness_batched_equals_one_by_one(setting):
    from kvlab.eval.longcontext import greedy_generate

    model = kvlab.tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [(torch.randint(3, 97, (n,), generator=g).tolist(), torch.randint(3, 97, (q,), generator=g).tolist())
               for n, q in [(40, 3), (23, 6), (31, 4)]]  # question padding sits between document and question
    method = KVCompress(0.4, block_size=4, window=5)
    kwargs = dict(setting=setting, max_new_tokens=6, progress=False)
    assert (greedy_generate(model, method, prompts, batch_size=3, **kwargs)
            == greedy_generate(model, method, prompts, batch_size=1, **kwargs))


def test_perplexity_context_protocol_at_budget_one_equals_full():
    from kvlab.eval.perplexity import perplexity

    model = kvlab.tiny_model("gpt2")
    chunks = torch.randint(3, 97, (3, 40))
    full = perplexity(model, None, kvlab.methods.Full(), chunks, protocol="context", progress=False)
    same = perplexity(model, None, KVCompress(1.0, block_size=4, window=8), chunks, protocol="context", progress=False)
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)


def test_registry_and_cache_type():
    method = kvlab.methods.get("kvcompress", budget=0.25, metric="l1", block_size=8)
    assert isinstance(method, KVCompress) and method.budget == 0.25 and method.protocols == ("context",)
    assert isinstance(method.new_cache(kvlab.tiny_model("llama")), PagedCache)
    assert "kvcompress" in kvlab.methods.REGISTRY


@pytest.mark.parametrize("options,match", [
    (dict(budget=0.0), r"budget must be in \(0, 1\]"),
    (dict(metric="l3"), "metric must be one of l1, l2, max"),
    (dict(floor=-1), "floor must be an int >= 0"),
    (dict(pool_align="left"), "pool_align must be one of center, after"),
    (dict(group_agg="mean"), "group_agg must be one of sum, max"),
    (dict(kernel=4), "kernel must be odd"),
    (dict(kernel=0), "kernel must be an int >= 1"),
    (dict(scope="head"), "scope must be one of model, layer"),
    (dict(window=0), "window must be an int >= 1"),
    (dict(sinks=-1), "sinks must be an int >= 0"),
    (dict(block_size=0), "block_size must be an int >= 1"),
    (dict(block_size=2.0), "block_size takes an integer, got 2.0"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        KVCompress(**{"budget": 0.5, **options})


def test_misuse_fails_loudly(capsys):
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 12))
    method = KVCompress(0.5, block_size=4, window=8)
    with pytest.raises(ValueError, match="unknown option"):
        kvlab.methods.get("kvcompress", 0.5, recent_frac=0.5)
    with torch.no_grad(), method.apply(model) as cache:
        with pytest.raises(RuntimeError, match="the cache is empty"):
            method.compress(cache)
        _forward(model, ids, None, None, cache)
        with pytest.raises(RuntimeError, match="protocol='context'"):
            cache.kv_bytes("fp32")
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, tokens seen\) = \(2, 12\)"):
            method.compress(cache, attention_mask=torch.ones(2, 11))
        with pytest.raises(ValueError, match="was built by"):
            KVCompress(0.3).compress(cache)
        method.compress(cache)
        with pytest.raises(RuntimeError, match="already compressed"):
            method.compress(cache)
    with pytest.raises(ValueError, match="eviction layers"):
        method.compress(kvlab.methods.get("snapkv", 0.5).new_cache(model))  # dense eviction layers, not paged
    assert main(["eval", "--method", "kvcompress", "--opt", "metric=l3", "--tasks", "needle"]) == 2
    assert "metric must be one of l1, l2, max" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_decode_after_compress_equals_the_plain_model_hiding_the_evicted_entries(scope):
    """End to end: greedy decode through the compressed paged cache equals the plain model run once over prompt +
    generated tokens with an attention function that hides, from every query after the prompt, exactly the
    (layer, kv head, column) entries the cache evicted (positions, GQA mapping, block tables, mask)."""
    from transformers import AttentionInterface

    from kvlab.eval.forward import forward, pad_left, positions

    model = kvlab.tiny_model("llama")  # GQA
    spec = kvlab.ModelSpec.from_model(model)
    torch.manual_seed(3)
    prompt, steps = torch.randint(3, 97, (150,)).tolist(), 6
    method = KVCompress(0.25, block_size=4, window=8, kernel=3, scope=scope)
    with torch.no_grad(), method.attached(model):
        cache = method.new_cache(model)
        ids, mask = pad_left([prompt], 0)
        logits = forward(model, ids, mask, positions(mask), cache, logits_to_keep=1)[:, -1]
        method.compress(cache, attention_mask=mask)
        kept = []  # per layer (H_kv, P): the prompt columns each kv head still holds
        for layer in cache.layers:
            index = layer.index[0].long()
            kept.append(torch.stack([torch.isin(torch.arange(len(prompt)), index[h][index[h] >= 0])
                                     for h in range(spec.n_kv_heads)]))
        generated, step_logits = [], []
        for t in range(steps):
            token = logits.argmax(-1)
            generated.append(int(token))
            step_logits.append(logits[0])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            logits = forward(model, token[:, None], mask, torch.tensor([[len(prompt) + t]]), cache,
                             logits_to_keep=1)[:, -1]
    assert any(not k.all() for k in kept)  # something was evicted

    P = len(prompt)

    def hide_evicted(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        heads, n = query.shape[1], query.shape[2]
        group = heads // key.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril().repeat(key.shape[1], 1, 1)  # (H_kv, T, T)
        allowed[:, P:, :P] &= kept[module.layer_idx][:, None, :]
        allowed = allowed.repeat_interleave(group, 0)
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2), None

    AttentionInterface.register("kvlab_test_hide_evicted", hide_evicted)
    before = model.config._attn_implementation
    model.set_attn_implementation("kvlab_test_hide_evicted")
    try:
        with torch.no_grad():
            full = torch.tensor([prompt + generated[:-1]])
            reference = model(input_ids=full, position_ids=torch.arange(full.shape[1])[None], use_cache=False).logits
    finally:
        model.set_attn_implementation(before)
    torch.testing.assert_close(torch.stack(step_logits), reference[0, P - 1:], atol=2e-5, rtol=1e-4)


def test_observation_window_longer_than_the_context_is_an_error(capsys):
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, [20, 9], seed=2)
    method = KVCompress(0.5, block_size=4, window=10)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        with pytest.raises(ValueError, match=r"observation window \(10 queries\) is longer than the context \(9 real"):
            method.compress(cache, attention_mask=mask)
    # the command line: wiki chunks of 512 tokens, 256 of context < the window -> exit 2 with the message
    assert main(["eval", "--method", "kvcompress", "--opt", "window=300", "--ppl", "wiki", "--limit", "1",
                 "--protocol", "context"]) == 2
    assert "longer than the context (256 real tokens" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_floor_gives_every_head_at_least_its_floor_in_whole_blocks(scope):
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 200))
    S, floor, budget = 4, 10, 0.25
    cache, _ = _compressed(model, KVCompress(budget, block_size=S, window=4, sinks=2, floor=floor, scope=scope), ids)
    counts = torch.stack([layer.lengths[0] for layer in cache.layers])  # (L, H_kv)
    assert (counts >= 12).all() and (counts % S == 0).all()  # floor rounded up to whole blocks
    if scope == "model":
        assert abs(int(counts.sum()) - budget * 200 * counts.numel()) <= S / 2  # still one global budget
    plain, _ = _compressed(model, KVCompress(budget, block_size=S, window=4, sinks=2, scope=scope), ids)
    plain_counts = torch.stack([layer.lengths[0] for layer in plain.layers])
    assert int(counts.sum()) == int(plain_counts.sum())
    for layer, ref in zip(cache.layers, plain.layers):  # the floor's tokens: each head's best by its own metric
        for h in range(layer.n_heads):
            if int(ref.lengths[0, h]) >= int(layer.lengths[0, h]):
                assert set(_kept_columns(layer, 0, h)) <= set(_kept_columns(ref, 0, h))


def test_floor_above_the_budget_is_an_error(capsys):
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 64))
    method = KVCompress(0.125, block_size=4, window=4, floor=9)  # 12 per head > 8 per head
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, None, None, cache)
        with pytest.raises(ValueError, match="floor=9 tokens per .* is above the budget"):
            method.compress(cache)


def test_full_budget_with_a_floor_and_max_metric_equals_full():
    from kvlab.eval.perplexity import perplexity

    model = kvlab.tiny_model("llama")
    chunks = torch.randint(3, 97, (2, 48))
    full = perplexity(model, None, kvlab.methods.Full(), chunks, protocol="context", progress=False)
    same = perplexity(model, None, KVCompress(1.0, block_size=4, window=8, floor=8, metric="max"), chunks,
                      protocol="context", progress=False)
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
