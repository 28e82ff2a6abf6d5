"""The precision axis composed with features and tokens (kvlab.methods.quant_composed, Composed(bits=...)) on tiny
random models: 8-bit compositions are close to the unquantized ones, bytes are codes + parameters exactly (measured
= theoretical up to the eviction index and statistics), the split is budget / (feature x precision), bad options
are refused, and search_split tries bits too."""

import pytest
import torch

import kvlab
from kvlab.methods import PCA, Composed
from kvlab.methods.feature_x_token import search_split
from kvlab.methods.quant_composed import QuantEvictionLayer, QuantProjectedEvictionLayer, QuantProjectedLayer
from conftest import left_padded_batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


_PCA = {}


def _pca(arch):
    if arch not in _PCA:
        model = kvlab.tiny_model(arch)
        ids = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(0))
        _PCA[arch] = model, PCA(budget=0.5, sinks=2, source=None).fit(model, ids)
    return _PCA[arch]


@torch.no_grad()
def _run(model, method, ids, mask, pos, cont, steps=0):
    with method.apply(model) as cache:
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        method.compress(cache, attention_mask=mask)
        full = torch.cat([mask, torch.ones_like(cont)], dim=1)
        cpos = pos[:, -1:] + 1 + torch.arange(cont.shape[1])
        logits = model(cont, attention_mask=full, position_ids=cpos, past_key_values=cache, use_cache=True).logits
        for step in range(steps):  # token-by-token decoding after the continuation
            full = torch.cat([full, torch.ones_like(cont[:, :1])], dim=1)
            model(cont[:, :1], attention_mask=full, position_ids=cpos[:, -1:] + 1 + step, past_key_values=cache,
                  use_cache=True)
    return logits, cache


CASES = {  # label -> (Composed options, layer class, fraction of the bytes kept besides precision)
    "tokens x precision": (dict(feature=None, token="h2o", bits=8), QuantEvictionLayer, 0.25),
    "features x precision": (dict(feature="pca", token=None, bits=8, residual=2), QuantProjectedLayer, 0.5),
    "all three": (dict(feature="pca", token="h2o", bits=8, feature_budget=0.5), QuantProjectedEvictionLayer, 0.25),
}


def _plain(case, pca):
    """The same composition without the precision axis (8-bit codes of the same kept entries should be close)."""
    if case == "tokens x precision":
        return kvlab.methods.get("h2o", 0.25)
    if case == "features x precision":  # every token kept (streaming at budget 1): the codes alone
        return Composed(budget=0.5, feature="pca", token="streaming", feature_budget=0.5, feature_method=pca)
    return Composed(budget=0.25, feature="pca", token="h2o", feature_budget=0.5, feature_method=pca)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_eight_bits_are_close_to_the_unquantized_composition(arch, case):
    model, pca = _pca(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, [19, 12], seed=3)
    cont = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(4))
    options, layer_cls, kept = CASES[case]
    p = 8 / 16 + 2 / 4  # precision fraction at 8 bits, groups of 4
    method = Composed(budget=kept * p, feature_method=pca if options["feature"] else None, group_size=4, **options)
    assert method.precision == pytest.approx(p)
    logits, cache = _run(model, method, ids, mask, pos, cont, steps=2)
    assert all(isinstance(layer, layer_cls) for layer in cache.layers)
    plain = _plain(case, pca)
    if options["feature"]:
        assert method.rank(spec) == plain.rank(spec) == spec.head_dim // 2
    assert method.token_budget == pytest.approx(getattr(plain, "token_budget", plain.budget))
    ref, _ = _run(model, plain, ids, mask, pos, cont)
    assert (logits - ref).abs().max() < 5e-2  # 8-bit codes of the same kept entries
    _, cache = _run(model, method, ids, mask, pos, cont)  # no decoding: no growth slack in the slots
    b = cache.kv_bytes()
    assert b.theoretical <= b.measured <= 1.3 * b.theoretical  # + int16 index and H2O's scores per slot


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bytes_are_packed_codes_and_parameters(bits):
    model, pca = _pca("llama")
    spec = kvlab.ModelSpec.from_model(model)
    ids, mask, pos = left_padded_batch(97, [20, 20], seed=5)
    method = Composed(budget=0.5 * 0.5 * (bits / 16 + 2 / 8), feature_budget=0.5, feature_method=pca, bits=bits,
                      group_size=8, sinks=0, token="streaming", token_options={"sinks": 1})
    _, cache = _run(model, method, ids, mask, pos, torch.randint(3, 97, (2, 2)))  # 2 tokens: no decoding slack
    layer = cache.layers[0]
    r = method.rank(spec)
    kept = int((layer.index >= 0).sum())  # over rows and heads
    assert layer.keys.dtype == torch.uint8 and layer.keys.shape[-1] == r * bits // 8
    codes = 2 * kept * r * bits // 8
    params = 2 * 2 * r * spec.n_kv_heads * 2 + kept * 2 * (r // 8) * 2  # keys per (row, head, channel); values
    b = cache.kv_bytes()
    assert b.by("layer").loc[0, "theoretical"] == codes + params
    index = sum(layer.index.untyped_storage().nbytes() for layer in cache.layers)  # int16 column per slot
    assert b.measured == b.theoretical + index  # streaming keeps no statistics: the rest is codes and parameters


def test_split_follows_the_precision_fraction():
    method = Composed(budget=1 / 16, feature="pca", token="h2o", bits=4, group_size=32, feature_budget=0.5)
    assert method.precision == pytest.approx(4 / 16 + 2 / 32)
    assert method.token_budget == pytest.approx((1 / 16) / (0.5 * method.precision))
    only = Composed(budget=0.1, feature="pca", token=None, bits=2, group_size=32)
    assert only.split == pytest.approx(0.1 / 0.1875) and only.token_budget == 1.0
    assert Composed(budget=0.1, feature=None, token="h2o", bits=4).token_budget == pytest.approx(0.1 / 0.3125)


@pytest.mark.parametrize("options, message", [
    (dict(feature=None, token=None, bits=2), "composed needs two axes or three"),
    (dict(feature="pca", token=None), "composed needs two axes or three"),
    (dict(bits=3), "bits must be one of"),
    (dict(bits=2, residual=-1), "residual"),
    (dict(feature="pca", token=None, bits=4, feature_budget=0.5), "leave feature_budget unset"),
    (dict(budget=0.2, feature="pca", token="h2o", bits=2, feature_budget=0.5), "feature_budget must be in"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Composed(**options)


def test_group_size_must_divide_head_dim_for_quantized_tokens():
    model = kvlab.tiny_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="does not divide head_dim 16"):
        Composed(feature=None, token="h2o", bits=4, group_size=6, budget=0.2).new_cache(model)


def test_search_split_tries_bits(monkeypatch):
    model, pca = _pca("llama")
    import kvlab.data

    chunks = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(kvlab.data, "text_chunks", lambda *a, **k: chunks)
    best, table = search_split(model, None, 0.125, feature="pca", token="h2o", splits=[0.5, 1.0],
                               bits=(None, 8, 4), prepared=pca, group_size=8)
    assert set(table["bits"].dropna()) == {8, 4} and table["bits"].isna().sum() == 2  # two splits per precision
    assert len(table) == 6 and best.bits in (None, 8, 4)
