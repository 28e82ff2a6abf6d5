"""KV-CAR cross-layer reuse: exact without reuse, equal to a copy-from-below reference with it, real bytes saved."""

import math

import pytest
import torch

import kvlab
from kvlab.analysis.similarity import LayerSimilarity
from kvlab.cache import FullLayer, KVLabCache
from kvlab.methods.reuse import Reuse, ReuseLayer
from conftest import left_padded_batch


def _logits(model, ids, mask, pos, cache):
    with torch.no_grad(), kvlab.attach(model):
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits


class _CopyFromBelow(FullLayer):
    """Independent reference: a full cache whose reused heads are overwritten, at update time, with what the layer
    below stored for the same tokens (chains follow, since the layer below was overwritten first)."""

    def __init__(self, layer_idx, reused, below):
        super().__init__(layer_idx)
        self.reused, self.below = reused, below

    def _store(self, k, v):
        new = k.shape[-2]
        k, v = k.clone(), v.clone()
        for h, r in enumerate(self.reused):
            if r:
                k[:, h] = self.below.keys[:, h, self.length:self.length + new]
                v[:, h] = self.below.values[:, h, self.length:self.length + new]
        return super()._store(k, v)


def _reference(heads):
    layers = []
    for i, row in enumerate(heads):
        layers.append(_CopyFromBelow(i, row, layers[-1] if layers else None))
    return KVLabCache(layers)


CHAIN = {  # (L, H_kv) patterns with a chain (layer 2 reads layer 0 through layer 1) and a fully reused layer
    "llama": [[False, False], [True, False], [True, True], [False, True]],
    "gpt2": [[False] * 4, [True, False, True, False], [True, True, False, False], [True, True, True, True]],
    "gemma3": [[False], [True], [True], [False]],
}


def test_no_reuse_equals_full_exactly(tiny):
    spec = kvlab.ModelSpec.from_model(tiny)
    ids, mask, pos = left_padded_batch(97, [15, 8, 11])
    full = _logits(tiny, ids, mask, pos, kvlab.methods.get("full").new_cache(tiny))
    for method in (Reuse(), Reuse(heads=[[False] * spec.n_kv_heads] * spec.n_layers)):
        ours = _logits(tiny, ids, mask, pos, method.new_cache(tiny))
        torch.testing.assert_close(ours[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_reuse_equals_copy_from_below_reference_prefill_and_decode(arch):
    model = kvlab.tiny_model(arch, n_layers=4)
    heads = CHAIN[arch]
    ids, mask, pos = left_padded_batch(97, [13, 7], seed=4)
    cache, ref = Reuse(heads=heads).new_cache(model), _reference(heads)
    ours, theirs = _logits(model, ids, mask, pos, cache), _logits(model, ids, mask, pos, ref)
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
    plain = _logits(model, ids, mask, pos, kvlab.methods.get("full").new_cache(model))
    assert not torch.allclose(ours[mask.bool()], plain[mask.bool()], atol=1e-3)  # reuse does change the model
    for step in range(3):  # token-by-token decode, positions continuing per row
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        tok = torch.randint(3, 97, (2, 1), generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(_logits(model, tok, mask, pos, cache), _logits(model, tok, mask, pos, ref),
                                   atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ref.get_seq_length() == 16


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bytes_show_only_stored_heads(arch):
    model = kvlab.tiny_model(arch, n_layers=4)
    spec = kvlab.ModelSpec.from_model(model)
    heads = torch.tensor(CHAIN[arch])
    cache = Reuse(heads=heads.tolist()).new_cache(model)
    _logits(model, torch.randint(3, 97, (3, 10)), None, None, cache)
    report = cache.kv_bytes("fp32")
    kept = 1 - heads.double().mean().item()
    assert abs(report.measured - report.theoretical) <= 0.02 * report.theoretical
    assert report.measured == report.theoretical == round(kept * report.full)
    for i, layer in enumerate(cache.layers):
        stored = int((~heads[i]).sum())
        assert list(layer.tensors()) == ([] if stored == 0 else [layer.keys, layer.values])
        if stored:
            assert layer.keys.shape == (3, stored, 10, spec.head_dim)  # only the own heads are allocated
    rows = report.table[report.table["reused_from"] >= 0]
    assert len(rows) == 2 * int(heads.sum())  # K and V of every reused head
    assert (rows["theoretical"] == 0).all() and (rows["tokens_kept"] == 0).all() and (rows["measured"] == 0).all()
    if arch == "llama":  # layer 2 head 0 reads layer 0 through the reused layer 1
        row = report.table[(report.table.layer == 2) & (report.table["head"] == 0)]
        assert set(row["reused_from"]) == {0}


def test_batch_select_reset_and_crop_follow_the_reference():
    model = kvlab.tiny_model("gpt2", n_layers=4)
    heads = CHAIN["gpt2"]
    ids, mask, pos = left_padded_batch(97, [9, 12], seed=5)
    cache, ref = Reuse(heads=heads).new_cache(model), _reference(heads)
    for c in (cache, ref):
        _logits(model, ids, mask, pos, c)
        c.batch_select_indices(torch.tensor([1, 1, 0]))  # as the multiple-choice harness expands contexts
    assert cache.layers[3].batch_size == 3 and cache.layers[3].keys is None  # fully reused layer, nothing stored
    mask3, pos3 = mask[[1, 1, 0]], pos[[1, 1, 0]]
    tok = torch.randint(3, 97, (3, 2))
    mask3 = torch.cat([mask3, torch.ones(3, 2, dtype=mask.dtype)], 1)
    pos3 = pos3[:, -1:] + torch.arange(1, 3)
    torch.testing.assert_close(_logits(model, tok, mask3, pos3, cache), _logits(model, tok, mask3, pos3, ref),
                               atol=1e-5, rtol=0)
    cache.crop(-2)
    assert cache.get_seq_length() == 12 and all(layer.get_seq_length() == 12 for layer in cache.layers)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[2].sources[0] is cache.layers[0]  # links survive reset
    fresh = _reference(heads)
    torch.testing.assert_close(_logits(model, ids, mask, pos, cache)[mask.bool()],
                               _logits(model, ids, mask, pos, fresh)[mask.bool()], atol=1e-5, rtol=0)


def _similarity(layers=5, heads=3, seed=0):
    """Synthetic similarity with distinct adjacent scores; values a bit below keys so "both" follows values."""
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for metric in ("cka", "cosine"):
        tables[metric] = {}
        for part, offset in (("keys", 0.0), ("values", -0.05)):
            m = torch.eye(layers, dtype=torch.float64).repeat(heads, 1, 1)
            adj = torch.rand(heads, layers - 1, generator=g, dtype=torch.float64) * 0.9 + 0.05 + offset
            idx = torch.arange(1, layers)
            m[:, idx, idx - 1] = m[:, idx - 1, idx] = adj
            tables[metric][part] = m
    return LayerSimilarity(tables["cosine"], tables["cka"], n_tokens=64)


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.5, 2 / 3, 0.9, 0.99, 1.0])
def test_budget_reuses_the_most_similar_heads(budget):
    sim = _similarity()
    method = Reuse(budget=budget, similarity=sim)
    chosen = method.selection()
    n = math.ceil((1 - budget) * 15 - 1e-9)
    assert int(chosen.sum()) == n and not chosen[0].any()
    assert 1 - n / 15 == pytest.approx(method.kept_fraction()) and method.kept_fraction() <= budget + 1e-12
    scores = sim.adjacent("both", "cka")
    if 0 < n < 12:
        assert scores[chosen[1:]].min() > scores[~chosen[1:]].max()  # the most similar ones


def test_budget_is_met_in_measured_bytes():
    model = kvlab.tiny_model("llama", n_layers=5)
    method = Reuse(budget=0.7, similarity=_similarity(5, 2))
    with torch.no_grad(), method.apply(model) as cache:
        model(torch.randint(3, 97, (2, 12)), past_key_values=cache, use_cache=True)
    assert cache.kv_bytes("fp32").budget == pytest.approx(0.7)  # 3 of 10 heads reused
    frame = method.to_frame()
    assert len(frame) == 10 and int(frame["reused"].sum()) == 3
    assert set(frame.columns) >= {"layer", "head", "reused", "read_from", "cka_keys", "cosine_values"}


def test_threshold_metric_and_part_select():
    sim = _similarity()
    chosen = Reuse(threshold=0.5, similarity=sim).selection()
    assert torch.equal(chosen[1:], sim.adjacent("both", "cka") >= 0.5)
    keys_only = Reuse(threshold=0.5, part="keys", similarity=sim).selection()
    assert keys_only.sum() >= chosen.sum() and (keys_only | ~chosen).all()  # keys alone allow more
    cosine = Reuse(threshold=0.5, metric="cosine", similarity=sim).selection()
    assert torch.equal(cosine[1:], sim.adjacent("both", "cosine") >= 0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_on_tiny_model_and_perplexity_harness(arch):
    from kvlab.eval.perplexity import perplexity

    model = kvlab.tiny_model(arch, n_layers=4)
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    method = Reuse(budget=0.6, skip_first=2).fit(model, ids)
    assert method.similarity.shape == (4, spec.n_kv_heads) and method.similarity.n_tokens == 3 * 14
    assert method.prepare(model, tokenizer=None) is method  # already measured: no data needed
    result = perplexity(model, None, method, ids, progress=False)
    assert math.isfinite(result["ppl"]) and result["kv_bytes"]["budget"] <= 0.6 + 1e-9


def test_save_and_load(tmp_path):
    method = Reuse(budget=0.5, metric="cosine", similarity=_similarity())
    path = method.save(tmp_path / "reuse.safetensors")
    again = Reuse.load(path)
    assert again.metric == "cosine" and again.budget == 0.5
    assert torch.equal(again.selection(), method.selection())
    other = Reuse.load(path, budget=1.0, threshold=0.9)
    assert torch.equal(other.selection()[1:], _similarity().adjacent("both", "cosine") >= 0.9)


def test_errors_say_what_is_allowed():
    model = kvlab.tiny_model("llama")  # 3 layers, 2 kv heads
    spec = kvlab.ModelSpec.from_model(model)
    with pytest.raises(ValueError, match="layer 0 cannot reuse"):
        Reuse(heads=[[True, False], [False, False], [False, False]]).new_cache(model)
    with pytest.raises(ValueError, match="layer 0 cannot reuse"):
        ReuseLayer(0, [True, False])
    with pytest.raises(ValueError, match=r"heads must be a \(3, 2\) list of bools"):
        Reuse(heads=[[False, False], [True, False]]).new_cache(model)
    with pytest.raises(ValueError, match=r"heads must be a \(3, 2\) list of bools"):
        Reuse(heads=[[0, 0], [2, 0], [0, 0]]).new_cache(model)
    with pytest.raises(ValueError, match=r"cannot be met by reuse alone.*allowed budgets: \[0.3333, 1\]"):
        Reuse(budget=0.3, similarity=_similarity(3, 2)).new_cache(model)
    Reuse(budget=1 / 3, similarity=_similarity(3, 2)).new_cache(model)  # the lowest budget: everything above 0
    with pytest.raises(ValueError, match=r"threshold for metric 'cka' must be in \[0, 1\], got 1.2"):
        Reuse(threshold=1.2)
    with pytest.raises(ValueError, match=r"threshold for metric 'cosine' must be in \[-1, 1\], got -1.5"):
        Reuse(threshold=-1.5, metric="cosine")
    with pytest.raises(ValueError, match="metric must be one of cka, cosine"):
        Reuse(metric="l2")
    with pytest.raises(ValueError, match="part must be one of both, keys, values"):
        Reuse(part="queries")
    with pytest.raises(ValueError, match="choose the reused heads one way: heads, threshold or budget < 1; got "
                                         "threshold and budget < 1"):
        Reuse(budget=0.5, threshold=0.9)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        Reuse(budget=0.0)
    with pytest.raises(RuntimeError, match="no similarity yet"):
        Reuse(budget=0.5).new_cache(model)
    with pytest.raises(ValueError, match=r"measured for \(layers, kv heads\) = \(5, 3\), the model has \(3, 2\)"):
        Reuse(budget=0.5, similarity=_similarity()).selection(spec)
    lonely = KVLabCache([ReuseLayer(0, [False, False]), ReuseLayer(1, [True, False]), ReuseLayer(2, [False, False])])
    with pytest.raises(RuntimeError, match="not linked to the layers below"):
        _logits(model, torch.randint(3, 97, (1, 4)), None, None, lonely)
    kvlab.attention.clear_handoff()


@pytest.mark.slow
def test_reuse_smoke_on_smollm2(smollm2):
    from kvlab.eval.perplexity import perplexity

    model, tok = smollm2
    method = Reuse(budget=0.9, calib_chunks=2, chunk_len=128).prepare(model, tok)
    sim = method.similarity
    assert sim.shape == (30, 3) and sim.n_tokens == 2 * (128 - 4)
    for part in ("keys", "values"):
        adj = sim.adjacent(part, "cka")
        assert adj.shape == (29, 3) and (adj > 0).all() and (adj <= 1).all()
    assert int(method.selection().sum()) == math.ceil(0.1 * 90)
    result = perplexity(model, tok, method, "wiki", chunk_len=128, n_chunks=2, progress=False)
    assert math.isfinite(result["ppl"]) and result["kv_bytes"]["budget"] == pytest.approx(81 / 90)
