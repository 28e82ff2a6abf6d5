"""Cross-layer similarity: CKA/cosine maths on synthetic matrices, streaming == one shot, shapes on tiny models."""

import pytest
import torch

import kvlab
from kvlab.analysis.similarity import (LayerSimilarity, SimilarityStats, aligned_cosine, layer_similarity,
                                       linear_cka)
from conftest import left_padded_batch


def _gram_cka(x, y):
    """Independent reference: CKA from centred Gram matrices, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return (k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt()


@pytest.mark.parametrize("n,d,d2", [(50, 8, 8), (33, 5, 12), (7, 16, 3)])
def test_linear_cka_properties(n, d, d2):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g) + 3.0
    y = x[:, :1] * torch.randn(1, d2, generator=g) + 0.5 * torch.randn(n, d2, generator=g)
    cka = linear_cka(x, y)
    torch.testing.assert_close(cka, _gram_cka(x, y))
    torch.testing.assert_close(linear_cka(y, x), cka)  # symmetric
    torch.testing.assert_close(linear_cka(x, x), torch.tensor(1.0, dtype=torch.float64))
    assert 0.0 <= cka <= 1.0
    q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    torch.testing.assert_close(linear_cka(x @ q * 7.0 + 2.0, y), cka)  # rotation, scale and shift invariant
    assert not torch.allclose(aligned_cosine(x @ q, x), torch.tensor(1.0, dtype=torch.float64))  # cosine is not
    torch.testing.assert_close(aligned_cosine(x, 3.0 * x), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(aligned_cosine(x, -x), torch.tensor(-1.0, dtype=torch.float64))


def test_streaming_statistics_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    n, layers, heads, dim = 61, 4, 3, 6
    x = torch.randn(n, layers, heads, dim, generator=g) * 0.1 + 50.0  # large means: the shift must prevent cancellation
    x[:, 2] = x[:, 1] @ torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]  # layer 2 = rotated layer 1
    stats = SimilarityStats(layers, heads, dim)
    for chunk in x.split(17):
        stats.add(chunk)
    cka, cos = stats.cka(), stats.cosine()
    assert cka.shape == cos.shape == (heads, layers, layers)
    for h in range(heads):
        for a in range(layers):
            for b in range(layers):
                torch.testing.assert_close(cka[h, a, b], linear_cka(x[:, a, h], x[:, b, h]), atol=1e-6, rtol=0)
                torch.testing.assert_close(cos[h, a, b], aligned_cosine(x[:, a, h], x[:, b, h]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cka[:, 1, 2], torch.ones(heads, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"the statistics were made for \(4, 3, 6\)"):
        stats.add(torch.randn(5, 3, 3, 6))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_layer_similarity_shapes_and_bounds(arch):
    model = kvlab.tiny_model(arch, n_layers=4)
    spec = kvlab.ModelSpec.from_model(model)
    ids = torch.randint(3, 97, (5, 12), generator=torch.Generator().manual_seed(1))
    sim = layer_similarity(model, ids, batch_size=2, skip_first=3)
    shape = (spec.n_kv_heads, spec.n_layers, spec.n_layers)  # llama GQA: 2 kv heads, gpt2 MHA: 4, gemma3 MQA: 1
    assert sim.n_tokens == 5 * (12 - 3) and sim.shape == (spec.n_layers, spec.n_kv_heads)
    for part in ("keys", "values"):
        for table, low in ((sim.cka, 0.0), (sim.cosine, -1.0)):
            m = table[part]
            assert m.shape == shape
            torch.testing.assert_close(m.diagonal(dim1=1, dim2=2), torch.ones(shape[:2], dtype=torch.float64))
            torch.testing.assert_close(m, m.transpose(1, 2))
            assert (m >= low).all() and (m <= 1.0).all()
    assert set(sim.seconds) >= {"forward", "accumulate", "total"}


def test_layer_similarity_equals_captured_math_with_padding_and_sinks():
    model = kvlab.tiny_model("llama", n_layers=3)
    ids, mask, _ = left_padded_batch(97, [13, 9, 11], seed=2)
    sim = layer_similarity(model, ids, attention_mask=mask, batch_size=2, skip_first=2)
    cap = kvlab.capture(model, ids, mask, what=("keys", "values"))
    keep = mask.bool() & ((mask.cumsum(-1) - 1) >= 2)  # real tokens at positions >= 2
    assert sim.n_tokens == int(keep.sum()) == 11 + 7 + 9
    for part in ("keys", "values"):
        feats = [getattr(cap, part)[l].transpose(1, 2)[keep] for l in range(3)]  # (N, H, D) per layer
        for h in range(2):
            for a in range(3):
                for b in range(3):
                    x, y = feats[a][:, h], feats[b][:, h]
                    torch.testing.assert_close(sim.cka[part][h, a, b], linear_cka(x, y), atol=1e-5, rtol=0)
                    torch.testing.assert_close(sim.cosine[part][h, a, b], aligned_cosine(x, y), atol=1e-5, rtol=0)


def _synthetic(layers=4, heads=2, seed=0) -> LayerSimilarity:
    g = torch.Generator().manual_seed(seed)

    def table():
        m = torch.rand(heads, layers, layers, generator=g, dtype=torch.float64)
        m = (m + m.transpose(1, 2)) / 2
        m.diagonal(dim1=1, dim2=2).fill_(1.0)
        return m

    return LayerSimilarity({"keys": table() * 2 - 1, "values": table() * 2 - 1}, {"keys": table(), "values": table()},
                           n_tokens=100, skip_first=4)


def test_adjacent_and_reuse_candidates():
    sim = _synthetic()
    adj = sim.adjacent("keys", "cka")
    assert adj.shape == (3, 2)
    assert adj[1, 0] == sim.cka["keys"][0, 2, 1]  # row i: layer i + 1 against layer i
    torch.testing.assert_close(sim.adjacent("both", "cosine"),
                               torch.minimum(sim.adjacent("keys", "cosine"), sim.adjacent("values", "cosine")))
    picked = sim.reuse_candidates(0.5, "cka")
    assert picked.shape == (4, 2) and not picked[0].any()
    assert torch.equal(picked[1:], sim.adjacent("both", "cka") >= 0.5)
    assert sim.reuse_candidates(0.0, "cka")[1:].all() and not sim.reuse_candidates(1.0, "cka", part="keys").any()
    with pytest.raises(ValueError, match=r"threshold for metric 'cka' must be in \[0, 1\]"):
        sim.reuse_candidates(-0.1, "cka")
    with pytest.raises(ValueError, match=r"threshold for metric 'cosine' must be in \[-1, 1\]"):
        sim.reuse_candidates(1.5, "cosine")
    with pytest.raises(ValueError, match="unknown metric 'l2'; allowed: cka, cosine"):
        sim.adjacent("keys", "l2")
    with pytest.raises(ValueError, match="unknown part 'queries'; allowed: keys, values"):
        sim.adjacent("queries", "cka")


def test_frame_and_persistence(tmp_path):
    sim = _synthetic()
    frame = sim.to_frame()
    assert len(frame) == 2 * 2 * 4 * 4 and set(frame.columns) == {"part", "head", "layer", "other", "cosine", "cka"}
    row = frame[(frame.part == "values") & (frame["head"] == 1) & (frame.layer == 3) & (frame.other == 0)]
    assert row["cka"].item() == sim.cka["values"][1, 3, 0].item()
    again = LayerSimilarity.load(sim.save(tmp_path / "sim.safetensors"))
    assert torch.equal(again.cka["keys"], sim.cka["keys"]) and again.skip_first == 4
    flat = LayerSimilarity.from_tensors(sim.tensors(), n_tokens=100)
    assert torch.equal(flat.cosine["values"], sim.cosine["values"])
    assert "layers=4, kv_heads=2" in repr(sim)


def test_layer_similarity_errors():
    model = kvlab.tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"tokens must be \(N, T\)"):
        layer_similarity(model, torch.randint(3, 97, (8,)))
    with pytest.raises(ValueError, match="parts must be distinct names from keys, values"):
        layer_similarity(model, torch.randint(3, 97, (1, 8)), parts=("keys_pre",))
    with pytest.raises(ValueError, match="only 0 token"):
        layer_similarity(model, torch.randint(3, 97, (1, 4)), skip_first=4)
