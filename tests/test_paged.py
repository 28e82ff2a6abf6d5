"""The paged KV store: block pool (allocate / free / grow), block tables that give back what was written, compaction
that frees blocks, decode through the paged kernel equal to dense attention, and exactness at budget 1 on tiny models
(left padding, continuations, greedy decoding, batch expansion)."""

import math

import pytest
import torch

import kvlab
from kvlab import attention
from kvlab.kernels.paged_attention.reference import paged_decode_attention
from kvlab.methods.kvcompress import KVCompress
from kvlab.cache.paged import BlockPool, PagedCache, PagedLayer
from conftest import left_padded_batch


def _forward(model, ids, mask, pos, cache=None):
    return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None).logits


# ---------------------------------------------------------------------------------------------- pool


def test_pool_allocates_frees_and_grows_geometrically_keeping_data():
    pool = BlockPool(block_size=3, min_blocks=2)
    assert pool.capacity == 0 and pool.blocks_in_use == 0
    pool.bind(5, 7, torch.float32, "cpu")
    a = pool.allocate(2)
    assert pool.capacity == 2 and pool.blocks_in_use == 2 and sorted(a.tolist()) == [0, 1]
    slots = a[:, None] * 3 + torch.arange(3)  # every slot of both blocks
    k, v, cols = torch.randn(2, 3, 5), torch.randn(2, 3, 7), torch.arange(6).view(2, 3)
    pool.write(slots, k, v, cols)
    b = pool.allocate(3)  # 0 free -> grows to max(2 + 3, 2 x 2) = 5
    assert pool.capacity == 5 and pool.grows == 1 and sorted(b.tolist()) == [2, 3, 4]
    rk, rv, rc = pool.read(slots)  # data survived the copy
    assert torch.equal(rk, k) and torch.equal(rv, v) and torch.equal(rc, cols.int())
    pool.free(a)
    assert pool.blocks_in_use == 3 and set(a.tolist()) <= set(pool.free_ids)
    c = pool.allocate(1)
    assert c.item() in a.tolist() and pool.capacity == 5  # freed blocks are reused before growing
    pool.allocate(2)
    assert pool.capacity == 10 and pool.blocks_in_use == 6  # geometric: x2
    assert pool.block_bytes == 3 * ((5 + 7) * 4 + 4)
    assert pool.capacity_bytes == 10 * pool.block_bytes and pool.in_use_bytes == 6 * pool.block_bytes


def test_pool_rejects_bad_use():
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        BlockPool(0)
    pool = BlockPool(4)
    with pytest.raises(RuntimeError, match="before bind"):
        pool.allocate(1)
    pool.bind(4, 4, torch.float32, "cpu")
    ids = pool.allocate(2)
    pool.free(ids[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free(ids[:1])
    with pytest.raises(ValueError, match="block ids must be in"):
        pool.free(torch.tensor([99]))
    with pytest.raises(ValueError, match="separate pools"):
        pool.bind(8, 4, torch.float32, "cpu")


# ---------------------------------------------------------------------------------------------- one layer


def _layer(block_size: int, batch: int = 2, heads: int = 2) -> PagedLayer:
    return PagedLayer(0, KVCompress(1.0, block_size=block_size), BlockPool(block_size, min_blocks=1))


def _write(layer: PagedLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    layer.update(k, v)
    attention.clear_handoff()  # no attention read in these unit tests


def _read_back(layer: PagedLayer, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token by token through the block tables, as the kernel reads."""
    S, n = layer.block_size, int(layer.lengths[b, h])
    t = torch.arange(n)
    blocks = layer.block_tables[b, h, t // S].long()
    return layer.pool.keys[blocks, t % S], layer.pool.values[blocks, t % S], layer.pool.index[blocks, t % S]


@pytest.mark.parametrize("block_size,lengths", [(4, [13, 1, 6]), (3, [7, 7]), (16, [5, 30, 2]), (1, [9])])
def test_block_tables_give_back_what_was_written(block_size, lengths):
    g = torch.Generator().manual_seed(block_size)
    layer = _layer(block_size)
    ks, vs = [], []
    for i, n in enumerate(lengths):
        k, v = torch.randn(2, 2, n, 6, generator=g), torch.randn(2, 2, n, 5, generator=g)
        _write(layer, k, v)
        layer.compressed = i == 0 or layer.compressed  # allow later writes (the context protocol's continuation)
        ks.append(k)
        vs.append(v)
    total = sum(lengths)
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    for b in range(2):
        for h in range(2):
            rk, rv, rc = _read_back(layer, b, h)
            assert torch.equal(rk, k[b, h]) and torch.equal(rv, v[b, h])
            assert rc.tolist() == list(range(total))
    assert layer.blocks_in_use() == 4 * math.ceil(total / block_size)  # block by block, no more
    assert layer.pool.blocks_in_use == layer.blocks_in_use()
    assert torch.equal(layer.keys[:, :, :total], k) and torch.equal(layer.values[:, :, :total], v)  # dense views


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_eviction_compacts_kept_tokens_in_column_order_and_frees_blocks(block_size):
    g = torch.Generator().manual_seed(1)
    layer = _layer(block_size)
    k, v = torch.randn(2, 2, 23, 4, generator=g), torch.randn(2, 2, 23, 4, generator=g)
    _write(layer, k, v)
    before = layer.block_tables.clone()
    keep = torch.tensor([[5, 23], [1, 12]])
    priority = torch.rand(2, 2, layer.n_slots, generator=g, dtype=torch.float64)
    layer.compress(keep, priority)
    pool = layer.pool
    for b in range(2):
        for h in range(2):
            n = int(keep[b, h])
            expected = sorted(priority[b, h, :23].topk(n).indices.tolist())
            rk, rv, rc = _read_back(layer, b, h)
            assert rc.tolist() == expected  # kept tokens in column order, in the head's first slots
            assert torch.equal(rk, k[b, h, expected]) and torch.equal(rv, v[b, h, expected])
            blocks = layer.block_tables[b, h]
            assert int((blocks >= 0).sum()) == math.ceil(n / block_size)
            assert blocks[: math.ceil(n / block_size)].tolist() == before[b, h, : math.ceil(n / block_size)].tolist()
    freed = set(before[before >= 0].tolist()) - set(layer.block_tables[layer.block_tables >= 0].tolist())
    assert len(freed) == int((before >= 0).sum()) - sum(math.ceil(int(n) / block_size) for n in keep.flatten())
    assert freed <= set(pool.free_ids)  # every block no longer needed is back on the free list
    assert pool.blocks_in_use == layer.blocks_in_use()
    assert layer.occupied().tolist() == keep.tolist()


@pytest.mark.parametrize("block_size,heads", [(4, 4), (3, 2), (5, 6)])
def test_decode_through_block_tables_equals_dense_attention_over_kept_tokens(block_size, heads):
    g = torch.Generator().manual_seed(block_size + heads)
    layer = _layer(block_size)
    k, v = torch.randn(2, 2, 19, 8, generator=g), torch.randn(2, 2, 19, 6, generator=g)
    _write(layer, k, v)
    keep = torch.tensor([[3, 19], [11, 6]])
    layer.compress(keep, torch.rand(2, 2, layer.n_slots, generator=g, dtype=torch.float64))
    kept = [[_read_back(layer, b, h)[2].tolist() for h in range(2)] for b in range(2)]
    k1, v1 = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 6, generator=g)
    layer.update(k1, v1)  # one decode token appended to every head
    query = torch.randn(2, heads, 1, 8, generator=g)
    out = attention.kvlab_attention(torch.nn.Module(), query, k1, v1, None, scaling=0.3)[0]  # (B, 1, H, Dv)
    assert layer.kernel_decodes == 1 and layer.dense_decodes == 0
    group = heads // 2
    for b in range(2):
        for j in range(heads):
            h = j // group
            keys = torch.cat([k[b, h, kept[b][h]], k1[b, h]])  # (n + 1, D)
            values = torch.cat([v[b, h, kept[b][h]], v1[b, h]])
            ref = torch.softmax(query[b, j, 0] @ keys.T * 0.3, -1) @ values
            torch.testing.assert_close(out[b, 0, j], ref, atol=1e-6, rtol=0)
    direct = paged_decode_attention(query[:, :, 0], layer.pool.keys, layer.pool.values, layer.block_tables,
                                    layer.lengths, 0.3)
    torch.testing.assert_close(out[:, 0], direct, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- models


@torch.no_grad()
def _greedy_run(model, method, ids, mask, pos, cont, steps):
    """Prefill, compress, feed ``cont`` in one forward, then ``steps`` greedy tokens. Returns logits of every
    position fed after the prefill (B, Tc + steps, V), the prefill logits, the ids fed and the cache."""
    with method.apply(model) as cache:
        first = _forward(model, ids, mask, pos, cache)
        method.compress(cache, model=model, attention_mask=mask, position_ids=pos, setting="query_aware")
        mask = torch.cat([mask, torch.ones_like(cont)], 1)
        p = pos[:, -1:] + 1 + torch.arange(cont.shape[1])
        out = [_forward(model, cont, mask, p, cache)]
        fed = [cont]
        for _ in range(steps):
            nxt = out[-1][:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            p = p[:, -1:] + 1
            out.append(_forward(model, nxt, mask, p, cache))
            fed.append(nxt)
    return torch.cat(out, 1), first, torch.cat(fed, 1), cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_budget_one_equals_the_plain_model_with_left_padding_and_greedy_decoding(arch):
    model = kvlab.tiny_model(arch)
    ids, mask, pos = left_padded_batch(97, [21, 10], seed=3)
    cont = torch.randint(3, 97, (2, 3))
    ours, first, fed, cache = _greedy_run(model, KVCompress(1.0, block_size=4, window=5), ids, mask, pos, cont, 4)
    all_ids = torch.cat([ids, fed], 1)
    all_mask = torch.cat([mask, torch.ones_like(fed)], 1)
    with torch.no_grad():
        ref = _forward(model, all_ids, all_mask, (all_mask.cumsum(-1) - 1).clamp(min=0))
    real = mask.bool()
    torch.testing.assert_close(first[real], ref[:, : ids.shape[1]][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, ref[:, ids.shape[1]:], atol=1e-5, rtol=0)
    assert isinstance(cache, PagedCache)
    full_attention = [layer for layer, kind in zip(cache.layers, kvlab.ModelSpec.from_model(model).layer_types)
                      if kind != "sliding_attention"] if arch == "gemma3" else cache.layers
    assert all(layer.kernel_decodes == 4 for layer in full_attention)  # decode steps went through the block tables
    sliding = [layer for layer in cache.layers if layer not in full_attention]
    assert all(layer.dense_decodes == 4 for layer in sliding)  # tokens outside the window: masked dense path
    for layer in cache.layers:
        assert layer.occupied().tolist() == [[21 + 7] * layer.n_heads, [10 + 7] * layer.n_heads]  # padding dropped


def test_none_reference_matches_too():
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, [17, 9], seed=4)
    cont = torch.randint(3, 97, (2, 2))
    ours, _, fed, _ = _greedy_run(model, KVCompress(1.0, block_size=3, window=4), ids, mask, pos, cont, 3)
    none, _, fed_none, _ = _greedy_run(model, kvlab.methods.get("none"), ids, mask, pos, cont, 3)
    assert torch.equal(fed, fed_none)
    torch.testing.assert_close(ours, none, atol=1e-5, rtol=0)


def test_padding_after_compress_is_dropped_and_batch_expansion_copies_blocks():
    model = kvlab.tiny_model("llama")
    ids, mask, pos = left_padded_batch(97, [15, 22], seed=13)
    method = KVCompress(0.5, block_size=4, window=4)
    select = torch.tensor([1, 0, 1, 1])
    conts = torch.randint(3, 97, (4, 5))
    cmask = torch.ones_like(conts)
    cmask[1, 3:] = 0  # right padding of a shorter continuation
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, ids, mask, pos, cache)
        method.compress(cache, attention_mask=mask)
        kept = [layer.occupied().clone() for layer in cache.layers]
        row_blocks = sum((layer.block_tables >= 0).sum((1, 2)) for layer in cache.layers)  # (B,) blocks per row
        cache.batch_select_indices(select)
        assert cache.pool.blocks_in_use == sum(layer.blocks_in_use() for layer in cache.layers)
        assert cache.pool.blocks_in_use == int(row_blocks[select].sum())  # each selected row owns a copy
        full_mask = torch.cat([mask[select], cmask], 1)
        cpos = attention.padded_positions(cmask, mask.sum(-1)[select])
        expanded = _forward(model, conts, full_mask, cpos, cache)
        for layer, k in zip(cache.layers, kept):
            assert layer.occupied().tolist() == (k[select] + cmask.sum(-1)[:, None]).tolist()  # padding dropped
    for k, row in enumerate(select.tolist()):
        n = int(mask[row].sum())
        with torch.no_grad(), method.apply(model) as single:
            _forward(model, ids[row:row + 1, -n:], None, torch.arange(n)[None], single)
            method.compress(single)
            m = int(cmask[k].sum())
            ref = _forward(model, conts[k:k + 1, :m], None, torch.arange(n, n + m)[None], single)
        torch.testing.assert_close(expanded[k, :m], ref[0], atol=1e-5, rtol=0)


def test_reset_returns_every_block():
    model = kvlab.tiny_model("gpt2")
    method = KVCompress(0.5, block_size=4)
    with torch.no_grad(), method.apply(model) as cache:
        _forward(model, torch.randint(3, 97, (2, 30)), None, None, cache)
        assert cache.pool.blocks_in_use == 3 * 2 * 4 * 8
        cache.reset()
    assert cache.pool.blocks_in_use == 0 and len(cache.pool.free_ids) == cache.pool.capacity
