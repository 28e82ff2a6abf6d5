"""Output-aware value bases (PCA values="output_aware"): exact at full rank, optimal in the output metric (beats
plain PCA on the error after o_proj at every rank, on the data it was fitted to), same bytes, persistence, errors."""

import pytest
import torch

import kvlab
from kvlab.methods import PCA, MatryoshkaKV
from kvlab.methods.output_aware import oblique_bases, output_metrics, output_weights


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


def _ids(n=4, length=24, seed=0):
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dim,rank", [(7, 3), (16, 5)])
def test_oblique_bases_minimise_the_metric_error(dim, rank):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(500, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
    w = torch.randn(3 * dim, dim, generator=g, dtype=torch.float64)
    c, m = x.T @ x / len(x), w.T @ w
    enc, dec = oblique_bases(c, m)
    torch.testing.assert_close(dec.double() @ enc.double().T, torch.eye(dim, dtype=torch.float64), atol=1e-4, rtol=0)
    err = lambda e, d: float(((x - x @ e @ d.T) @ w.T).pow(2).sum())
    ours = err(enc[:, :rank].double(), dec[:, :rank].double())
    u = torch.linalg.eigh(c).eigenvectors.flip(-1)[:, :rank]  # plain PCA at the same rank
    assert ours < err(u, u)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_full_rank_exact_and_low_rank_beats_plain_after_o_proj(arch):
    model = kvlab.tiny_model(arch)
    spec = kvlab.ModelSpec.from_model(model)
    ids = _ids()
    aware = PCA(budget=1.0, sinks=0, weighting=None, values="output_aware", source=None).fit(model, ids)
    assert aware.value_decoders.shape == aware.value_bases.shape
    full = model(ids).logits
    with torch.no_grad(), aware.apply(model) as cache:
        torch.testing.assert_close(model(ids, past_key_values=cache, use_cache=True).logits, full, atol=1e-4, rtol=0)
    plain = PCA(budget=1.0, sinks=0, weighting=None, source=None).fit(model, ids)
    cap = kvlab.capture(model, ids, what=("values",), layers=[0])
    v = cap.values[0]  # (B, H_kv, T, D)
    w = output_weights(model, 0).reshape(-1, spec.n_heads, spec.head_dim)  # (hidden, H, D)
    group = spec.n_heads // spec.n_kv_heads
    r = max(1, spec.head_dim // 4)

    def out_err(enc, dec):
        total = 0.0
        for h in range(spec.n_kv_heads):
            e = v[:, h] - v[:, h] @ enc[0, h, :, :r] @ dec[0, h, :, :r].T  # (B, T, D)
            for q in range(h * group, (h + 1) * group):
                total += float((e @ w[:, q].T).pow(2).sum())
        return total

    assert out_err(aware.value_bases, aware.value_decoders) < out_err(plain.value_bases, plain.value_bases)


def test_same_bytes_as_plain_and_round_trip(tmp_path):
    model = kvlab.tiny_model("llama")
    ids = _ids()
    aware = PCA(budget=0.5, sinks=1, values="output_aware", keys="pre_rope", source=None).fit(model, ids)
    plain = PCA(budget=0.5, sinks=1, keys="pre_rope", source=None).fit(model, ids)
    test = _ids(2, 19, seed=4)
    out, nbytes = {}, {}
    for name, method in (("aware", aware), ("plain", plain)):
        with torch.no_grad(), method.apply(model) as cache:
            out[name] = model(test, past_key_values=cache, use_cache=True).logits
        nbytes[name] = cache.kv_bytes()
    assert nbytes["aware"].measured == nbytes["plain"].measured
    assert abs(nbytes["aware"].measured - nbytes["aware"].theoretical) <= 0.02 * nbytes["aware"].theoretical
    path = aware.save(tmp_path / "aware.safetensors", model)
    loaded = PCA.load(path)
    assert loaded.values == "output_aware" and loaded.keys == "pre_rope"
    with torch.no_grad(), loaded.apply(model) as cache:
        torch.testing.assert_close(model(test, past_key_values=cache, use_cache=True).logits, out["aware"])
    with pytest.raises(ValueError, match="output_aware"):
        PCA.load(path, values="plain")


def test_output_metric_sums_the_group_and_errors():
    model = kvlab.tiny_model("llama")
    spec = kvlab.ModelSpec.from_model(model)
    m = output_metrics(model)
    w = output_weights(model, 1).double()[:, : spec.head_dim]  # query head 0 only
    group = spec.n_heads // spec.n_kv_heads
    w_all = output_weights(model, 1).double()[:, : group * spec.head_dim].reshape(-1, group, spec.head_dim)
    torch.testing.assert_close(m[1, 0], sum(w_all[:, g].T @ w_all[:, g] for g in range(group)))
    assert not torch.allclose(m[1, 0], w.T @ w)
    with pytest.raises(ValueError, match="values must be one of"):
        PCA(values="aware")
    with pytest.raises(ValueError, match="values must be 'plain'"):
        MatryoshkaKV(values="output_aware")
