import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: kernels run in Triton's interpreter on CPU

import pytest
import torch

import kvlab
from kvlab.kernels import dispatch
from kvlab.kernels.projected_attention import reference as proj_ref
from kvlab.kernels.rope_attention import reference as rope_ref
from kvlab.rope import Rotary

try:
    import triton  # noqa: F401

    from kvlab.kernels.rope_attention import triton as rope_tri

    NO_TRITON = None
except ImportError as err:
    NO_TRITON = f"triton cannot be imported ({err}); install kvlab[dev] to run the kernels in the interpreter"

needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

CASES = {  # batch, GQA ratio, D, Dv, key ranks, value ranks, T, lengths (None: all T)
    "g1": (1, 1, 16, 16, [1, 16], [16, 1], 17, None),
    "g2": (3, 2, 24, 20, [5, 24, 1], [3, 11, 20], 37, [37, 0, 20]),
    "g3": (2, 3, 34, 32, [7], [32], 33, [1, 33]),  # D/2 = 17: odd half
    "g8": (2, 8, 64, 48, [9, 64], [48, 2], 40, [40, 25]),
    "d80": (1, 4, 80, 80, [80, 33], [1, 79], 70, [70]),  # three token tiles
}


def _case(name, dtype, seed=0):
    batch, group, dim, vdim, key_ranks, value_ranks, tokens, lengths = CASES[name]
    g = torch.Generator().manual_seed(seed)
    parts = lambda d, ranks: proj_ref.pack_ragged(
        [torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :r] for r in ranks])
    (u, k_off), (w, v_off) = parts(dim, key_ranks), parts(vdim, value_ranks)
    query = torch.randn(batch, len(key_ranks) * group, dim, generator=g).to(dtype)
    key_codes = torch.randn(batch, tokens, u.shape[1], generator=g).to(dtype)
    value_codes = torch.randn(batch, tokens, w.shape[1], generator=g).to(dtype)
    positions = torch.randint(0, 3000, (batch, tokens), generator=g)  # any positions, not only 0..T-1
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    lengths = None if lengths is None else torch.tensor(lengths)
    return (query, key_codes, value_codes, u, w, k_off, v_off, positions, inv_freq), lengths


@pytest.mark.parametrize("case", CASES)
def test_reference_is_attention_over_rebuilt_rotated_keys(case):
    (query, kc, vc, u, w, k_off, v_off, pos, freq), lengths = _case(case, torch.float32)
    got = rope_ref.rope_decode_attention(query, kc, vc, u, w, k_off, v_off, pos, freq, 0.9, lengths, scaling=0.2)
    keys = rope_ref.rotate(proj_ref.reconstruct(kc, u, k_off), pos, freq, 0.9)  # (B, H_kv, T, D)
    values = proj_ref.reconstruct(vc, w, v_off)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhtd->bht", query, keys) * 0.2
    if lengths is not None:
        scores = scores.masked_fill(torch.arange(kc.shape[1]) >= lengths[:, None, None], float("-inf"))
    want = torch.einsum("bht,bhtd->bhd", torch.softmax(scores, -1).nan_to_num(0.0), values)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotation_is_the_model_rotary_and_position_zero_is_the_projected_read():
    model = kvlab.tiny_model("llama")
    rot = Rotary.from_model(model, 0)
    x = torch.randn(2, 3, 9, kvlab.ModelSpec.from_model(model).head_dim)
    pos = torch.randint(0, 500, (2, 9))
    torch.testing.assert_close(rope_ref.rotate(x, pos, rot.module.inv_freq, rot.module.attention_scaling),
                               rot.rotate(x, pos), atol=1e-5, rtol=1e-5)
    (query, kc, vc, u, w, k_off, v_off, pos, freq), lengths = _case("g2", torch.float32)
    zero = torch.zeros_like(pos)
    torch.testing.assert_close(dispatch.rope_decode_attention(query, kc, vc, u, w, k_off, v_off, zero, freq, 1.0,
                                                              lengths),
                               proj_ref.projected_decode_attention(query, kc, vc, u, w, k_off, v_off, lengths),
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("lift", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype, lift):
    inputs, lengths = _case(case, dtype)
    got = rope_tri.rope_decode_attention(*inputs, 1.1, lengths, lift=lift)
    want = rope_ref.rope_decode_attention(*inputs, 1.1, lengths, lift=lift)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@needs_triton
def test_kernel_reads_strided_inputs():
    (query, kc, vc, u, w, k_off, v_off, pos, freq), lengths = _case("g8", torch.float32)
    pos_t = pos.T.contiguous().T  # (B, T) stored token-major
    wide = torch.zeros(*query.shape[:2], 2 * query.shape[2])
    wide[..., ::2] = query
    got = rope_tri.rope_decode_attention(wide[..., ::2], kc, vc, u, w, k_off, v_off, pos_t, freq, 1.0, lengths)
    want = rope_ref.rope_decode_attention(query, kc, vc, u, w, k_off, v_off, pos, freq, 1.0, lengths)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_errors_say_what_is_allowed():
    (query, kc, vc, u, w, k_off, v_off, pos, freq), lengths = _case("g2", torch.float32)
    call = rope_tri.rope_decode_attention
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        call(query, kc, vc, u, w, k_off, v_off, pos.float(), freq)
    with pytest.raises(ValueError, match=r"positions must be an integer tensor \(B=3, T=37\)"):
        call(query, kc, vc, u, w, k_off, v_off, pos[:, :5], freq)
    with pytest.raises(ValueError, match=r"inv_freq must be a float tensor \(D/2=12,\)"):
        call(query, kc, vc, u, w, k_off, v_off, pos, freq[:5])
    with pytest.raises(ValueError, match="share one dtype"):
        call(query.half(), kc, vc, u, w, k_off, v_off, pos, freq)
