import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import kvlab
from kvlab.analysis.spectra import (PARTS, Moments, Spectra, accumulate_moments, combine, head_spectra, merge,
                                    moment_update, received_attention)
from kvlab.capturing import capture
from conftest import left_padded_batch


def _ids(n=3, t=20, seed=0, vocab=97):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Spectral norm of the difference of the orthogonal projectors onto span(a) and span(b) (columns)."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, ord=2))


@pytest.mark.parametrize("part", ["keys", "values"])
def test_centred_spectrum_matches_sklearn_pca(part):
    model = kvlab.tiny_model("llama")
    ids = _ids(4, 24)
    spec = head_spectra(model, ids, batch_size=3, parts=(part,), centered=True)  # 2 batches, uneven
    x = getattr(capture(model, ids, what=(part,)), part)[1][:, 0].double().numpy()  # layer 1 head 0
    x = x.reshape(-1, x.shape[-1])
    pca = PCA().fit(x)
    ratio = (spec.eigenvalues[part][1, 0] / spec.eigenvalues[part][1, 0].sum()).numpy()
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, atol=1e-5)
    n = x.shape[0]
    np.testing.assert_allclose(spec.eigenvalues[part][1, 0].numpy() * n / (n - 1), pca.explained_variance_,
                               rtol=1e-4, atol=1e-7)
    assert spec.n_tokens == n
    u = spec.eigenvectors[part][1, 0].double().numpy()
    for r in (1, 4, 10):  # leading eigenvalues are distinct for this data: subspaces must agree
        assert _subspace_distance(u[:, :r], pca.components_[:r].T) < 1e-3
    np.testing.assert_allclose(spec.means[part][1, 0].numpy(), pca.mean_, atol=1e-5)


def test_uncentred_spectrum_is_the_svd_of_the_raw_matrix():
    model = kvlab.tiny_model("gpt2")
    ids = _ids(3, 16)
    spec = head_spectra(model, ids, batch_size=2, parts=("keys",))
    x = capture(model, ids, what=("keys",)).keys[2][:, 3].reshape(-1, 16).double()  # layer 2 head 3
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(spec.eigenvalues["keys"][2, 3], s**2 / x.shape[0], rtol=1e-5, atol=1e-8)
    u = spec.eigenvectors["keys"][2, 3].double()
    for r in (1, 3, 8):
        assert _subspace_distance(u[:, :r].numpy(), vh[:r].T.numpy()) < 1e-3
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_shapes_energy_and_effective_rank(arch):
    model = kvlab.tiny_model(arch)
    ms = kvlab.ModelSpec.from_model(model)
    spec = head_spectra(model, _ids(2, 13), batch_size=2)
    assert spec.parts == PARTS and spec.shape == (ms.n_layers, ms.n_kv_heads, ms.head_dim)
    for part in PARTS:
        values = spec.eigenvalues[part]
        assert torch.all(values[..., :-1] >= values[..., 1:]) and torch.all(values >= 0)
        assert spec.eigenvectors[part].dtype == torch.float32
        assert spec.eigenvectors[part].shape == (ms.n_layers, ms.n_kv_heads, ms.head_dim, ms.head_dim)
        energy = spec.energy(part)
        assert torch.all(energy[..., 1:] >= energy[..., :-1] - 1e-12)
        assert torch.all(energy[..., -1] == 1.0) and torch.all(energy > 0)
        eff = spec.effective_rank(part)
        assert eff.shape == values.shape[:2] and torch.all((eff >= 1) & (eff <= ms.head_dim))
        r90 = spec.rank_for_energy(part, 0.9)
        assert torch.all((r90 >= 1) & (r90 <= ms.head_dim))
        # the smallest such rank: the one below does not reach 90 %
        e = energy.gather(-1, (r90 - 1).unsqueeze(-1)).squeeze(-1)
        assert torch.all(e >= 0.9 - 1e-12)
        below = energy.gather(-1, (r90 - 2).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        assert torch.all((r90 == 1) | (below < 0.9))
        assert torch.all(spec.rank_for_energy(part, 1.0) <= ms.head_dim)
    frame = spec.to_frame()
    assert list(frame.columns) == ["layer", "head", "part", "rank", "eigenvalue", "energy"]
    assert len(frame) == len(PARTS) * ms.n_layers * ms.n_kv_heads * ms.head_dim
    assert frame.groupby(["layer", "head", "part"])["energy"].max().eq(1.0).all()
    basis = spec.basis("values", layer=0, head=0, rank=5)
    assert basis.shape == (ms.head_dim, 5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)


def test_gpt2_keys_pre_equal_keys():
    spec = head_spectra(kvlab.tiny_model("gpt2"), _ids(2, 9), batch_size=2, parts=("keys", "keys_pre"))
    torch.testing.assert_close(spec.eigenvalues["keys"], spec.eigenvalues["keys_pre"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padding_is_excluded(arch):
    model = kvlab.tiny_model(arch)
    lengths = [11, 6, 9]
    ids, mask, _ = left_padded_batch(97, lengths)
    padded, _ = accumulate_moments(model, ids, attention_mask=mask, batch_size=3, skip_first=(0, 2))
    rows = [ids[i:i + 1, ids.shape[1] - n:] for i, n in enumerate(lengths)]
    for skip in (0, 2):
        alone = [combine(accumulate_moments(model, r, batch_size=1, skip_first=skip)[0], skip) for r in rows]
        got = combine(padded, skip)
        for part in PARTS:
            want = alone[0][part] + alone[1][part] + alone[2][part]
            assert torch.equal(got[part].count, want.count)
            assert int(got[part].count[0, 0]) == sum(n - skip for n in lengths)
            torch.testing.assert_close(got[part].s2, want.s2, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[part].s1, want.s1, rtol=1e-4, atol=1e-4)


def test_skip_first_drops_the_first_positions():
    model = kvlab.tiny_model("llama")
    ids = _ids(2, 10)
    spec = head_spectra(model, ids, batch_size=2, parts=("keys",), skip_first=3)
    assert spec.n_tokens == 2 * 7 and spec.skip_first == 3
    keys = capture(model, ids, what=("keys",)).keys[0][:, :, 3:]  # (B, H, 7, D)
    x = keys[:, 1].reshape(-1, keys.shape[-1]).double()
    torch.testing.assert_close(spec.eigenvalues["keys"][0, 1], torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0),
                               rtol=1e-5, atol=1e-8)
    # the segments of one pass add up to the whole, and match separate runs
    moments, _ = accumulate_moments(model, ids, batch_size=2, parts=("keys",), skip_first=(0, 1, 3))
    assert set(moments) == {(0, 1), (1, 3), (3, None)}
    whole = head_spectra(model, ids, batch_size=2, parts=("keys",))
    for skip, ref in ((0, whole), (3, spec)):
        from_segments = Spectra.from_moments(combine(moments, skip))
        torch.testing.assert_close(from_segments.eigenvalues["keys"], ref.eigenvalues["keys"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="segment boundary"):
        combine(moments, 2)
    # moments over disjoint pieces of the data add up to those of the whole
    halves = merge(*(accumulate_moments(model, part, parts=("keys",), skip_first=(0, 1, 3))[0] for part in ids.split(1)))
    for seg in moments:
        torch.testing.assert_close(halves[seg]["keys"].s2, moments[seg]["keys"].s2, rtol=1e-5, atol=1e-5)


def test_attention_weighting_matches_explicit_weights():
    model = kvlab.tiny_model("llama")
    ms = kvlab.ModelSpec.from_model(model)
    ids, mask, _ = left_padded_batch(97, [12, 7])
    # a tiny probability budget forces one row at a time and one layer per forward pass
    per_layer = ms.n_heads * 12 * 12 * 4
    spec = head_spectra(model, ids, attention_mask=mask, batch_size=2, parts=("values",), weighting="attention",
                        skip_first=1, max_probs_bytes=per_layer)
    cap = capture(model, ids, mask, what=("values", "probs"))
    w = received_attention(cap.probs[2], ms.n_kv_heads)  # (B, H_kv, T)
    assert w.shape == (2, ms.n_kv_heads, 12)
    torch.testing.assert_close(w.sum((1, 2)), torch.tensor([12.0, 7.0]) * ms.n_heads)  # every query spreads 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    w = w * (mask.bool() & (positions >= 1)).unsqueeze(1)
    v = cap.values[2][:, 1].double()  # (B, T, D) head 1
    wh = w[:, 1].double()
    m = torch.einsum("bt,btd,bte->de", wh, v, v) / wh.sum()
    torch.testing.assert_close(spec.eigenvalues["values"][2, 1], torch.linalg.eigvalsh(m).flip(0).clamp(min=0),
                               rtol=1e-4, atol=1e-7)
    assert spec.n_tokens == 11 + 6 and spec.weighting == "attention"


def test_moment_update_one_matmul_for_all_heads():
    x = torch.randn(2, 3, 5, 4)
    w = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]]).unsqueeze(1)
    s2, s1, weight, count = moment_update(x, w)
    for h in range(3):
        rows = x[:, h][w[:, 0].bool()].double()
        torch.testing.assert_close(s2[h], rows.T @ rows, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s1[h], rows.sum(0), rtol=1e-5, atol=1e-5)
    assert weight.tolist() == [8.0] * 3 and count.tolist() == [8] * 3
    m = Moments.zeros(1, 3, 4)
    m.add(0, x, w)
    with pytest.raises(ValueError, match="no tokens"):
        Moments.zeros(1, 1, 4).matrix()


def test_bad_arguments_raise():
    model = kvlab.tiny_model("llama")
    ids = _ids(1, 5)
    with pytest.raises(ValueError, match="allowed: keys, keys_pre, values"):
        head_spectra(model, ids, parts=("keys", "queries"))
    with pytest.raises(ValueError, match="weighting"):
        head_spectra(model, ids, weighting="norm")
    with pytest.raises(ValueError, match="skip_first"):
        head_spectra(model, ids, skip_first=-1)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        head_spectra(model, ids[0])
    spec = head_spectra(model, ids, parts=("keys",))
    with pytest.raises(ValueError, match="allowed: keys"):
        spec.energy("values")
    with pytest.raises(ValueError, match="allowed: keys, keys_pre, values"):
        spec.effective_rank("k")
    with pytest.raises(ValueError, match="rank must be"):
        spec.basis("keys", 0, 0, 0)


def test_save_and_load(tmp_path):
    spec = head_spectra(kvlab.tiny_model("llama"), _ids(2, 6), batch_size=2, skip_first=1)
    back = Spectra.load(spec.save(tmp_path / "s.safetensors"))
    assert back.parts == spec.parts and back.skip_first == 1 and back.n_tokens == spec.n_tokens
    torch.testing.assert_close(back.eigenvectors["keys"], spec.eigenvectors["keys"])


def test_bf16_forward_is_opt_in_and_close():
    """dtype=bfloat16 runs the forward passes on a bf16 copy (the model itself stays float32); the second moments
    agree with the float32 ones to bf16 rounding."""
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (3, 24))
    exact, _ = accumulate_moments(model, ids, batch_size=2, parts=("keys", "values"))
    rounded, _ = accumulate_moments(model, ids, batch_size=2, parts=("keys", "values"), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    for part in ("keys", "values"):
        a, b = exact[(0, None)][part].matrix(), rounded[(0, None)][part].matrix()
        assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.abs().max()))
