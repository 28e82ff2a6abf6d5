"""The quantized decode-attention op (kvlab.kernels.quant_attention): the torch reference equals dense attention
over the dequantized cache of a real QuantStore, and the Triton kernel (interpreter) equals the reference over odd
shapes, bits and dtypes, with and without a full-precision tail."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from kvlab.kernels import dispatch
from kvlab.kernels.quant_attention import reference as ref
from kvlab.cache.quantized import QuantStore

try:
    from kvlab.kernels.quant_attention import triton as tri

    NO_TRITON = None
except ImportError as err:
    NO_TRITON = f"triton cannot be imported ({err})"


def _case(batch, n_kv, group_q, dim, vdim, tokens, bits, group, residual, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = QuantStore(bits, group, residual)
    keys = torch.randn(batch, n_kv, tokens, dim, generator=g) * 2
    values = torch.randn(batch, n_kv, tokens, vdim, generator=g)
    store.append(keys[:, :, : tokens // 2].to(dtype), values[:, :, : tokens // 2].to(dtype))
    store.append(keys[:, :, tokens // 2:].to(dtype), values[:, :, tokens // 2:].to(dtype))
    query = torch.randn(batch, n_kv * group_q, dim, generator=g).to(dtype)
    empty = lambda *s, dt=torch.uint8: torch.zeros(*s, dtype=dt)
    args = [store.k_codes if store.quantized else empty(batch, n_kv, 0, dim * bits // 8),
            store.k_scale if store.quantized else empty(batch, n_kv, 0, dim, dt=torch.float16),
            store.k_zero if store.quantized else empty(batch, n_kv, 0, dim, dt=torch.float16),
            store.v_codes if store.quantized else empty(batch, n_kv, 0, vdim * bits // 8),
            store.v_scale if store.quantized else empty(batch, n_kv, 0, vdim // group, dt=torch.float16),
            store.v_zero if store.quantized else empty(batch, n_kv, 0, vdim // group, dt=torch.float16),
            store.k_tail, store.v_tail]
    return query, args, store


SHAPES = [  # batch, kv heads, query heads per kv head, D, Dv, tokens, bits, group, residual
    (1, 1, 1, 16, 16, 16, 2, 8, 0),
    (2, 3, 3, 24, 24, 37, 4, 8, 5),
    (3, 2, 4, 64, 64, 70, 2, 32, 32),
    (1, 2, 2, 32, 16, 9, 8, 4, 16),  # everything in the tail
    (2, 1, 5, 16, 32, 51, 8, 16, 0),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_attention_over_the_dequantized_store(shape):
    batch, n_kv, group_q, dim, vdim, tokens, bits, group, residual = shape
    query, args, store = _case(*shape)
    keys, values = store.read(torch.float32)  # (B, H_kv, T, D)
    q = query.reshape(batch, n_kv, group_q, dim)
    probs = torch.softmax(q @ keys.transpose(2, 3) / dim**0.5, -1)
    expected = (probs @ values).reshape(batch, n_kv * group_q, vdim)
    out = ref.quant_decode_attention(query, *args, bits, group)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dispatch.quant_decode_attention(query, *args, bits, group), out)  # CPU: the reference


@pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_the_reference(shape, dtype):
    batch, n_kv, group_q, dim, vdim, tokens, bits, group, residual = shape
    query, args, _ = _case(*shape, dtype=dtype, seed=1)
    expected = ref.quant_decode_attention(query, *args, bits, group, scaling=0.3)
    out = tri.quant_decode_attention(query, *args, bits, group, scaling=0.3)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(out, expected, **tol)


def test_bad_shapes_are_refused():
    query, args, _ = _case(1, 1, 2, 16, 16, 16, 2, 8, 0)
    with pytest.raises(ValueError, match="bits must be one of"):
        ref.quant_decode_attention(query, *args, 3, 8)
    with pytest.raises(ValueError, match="whole blocks of group"):
        ref.quant_decode_attention(query, *args, 2, 5)
    with pytest.raises(ValueError, match="query must be"):
        ref.quant_decode_attention(query[0], *args, 2, 8)
