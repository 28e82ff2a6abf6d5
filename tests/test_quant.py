"""The precision axis (kvlab.cache.quantize, kvlab.methods.quant): packing round-trips, quantization error within half a
step, measured bytes = packed codes + float16 scales + tail exactly (every view), 8 bits within 1e-2 of the full
logits, a residual window longer than the sequence is exact, decoding keeps the window, bad options are refused."""

import pytest
import torch

import kvlab
from kvlab.cli import main
from kvlab.methods import Quant, get
from kvlab.cache.quantized import QuantLayer, QuantStore
from kvlab.cache.quantize import (dequantize_blocks, dequantize_groups, pack, quantize_blocks, quantize_groups, unpack)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (conftest)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 24), (1, 1, 1, 4)])
def test_pack_round_trips(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == shape[-1] * bits // 8
    assert torch.equal(unpack(packed, bits), codes.to(torch.uint8))


def test_pack_needs_whole_bytes():
    with pytest.raises(ValueError, match="whole bytes"):
        pack(torch.zeros(2, 6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_within_half_a_step(bits):
    x = torch.randn(2, 3, 24, 16, generator=torch.Generator().manual_seed(0)) * 3
    for quant, dequant, axis in ((quantize_blocks, dequantize_blocks, 2), (quantize_groups, dequantize_groups, 3)):
        packed, scale, zero = quant(x, bits, 8)
        y = dequant(packed, scale, zero, bits, torch.float32)
        assert y.shape == x.shape
        # step per element, broadcast from its group's scale; + float16 rounding of the zero point
        step = scale.float().repeat_interleave(8, dim=axis)
        bound = step / 2 + zero.float().abs().repeat_interleave(8, dim=axis) * 2**-10 + 1e-6
        assert bool(((x - y).abs() <= bound).all())


def _bytes_case(arch, bits, group, residual, tokens, batch=2, decode=0):
    model = kvlab.tiny_model(arch)
    method = get("quant", bits=bits, group_size=group, residual=residual)
    ids = torch.randint(3, 97, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad(), method.apply(model) as cache:
        model(ids, past_key_values=cache, use_cache=True)
        for _ in range(decode):
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    return model, cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("bits, group, residual, tokens, decode", [(2, 8, 4, 37, 0), (4, 4, 0, 13, 5),
                                                                  (8, 16, 3, 50, 9), (2, 16, 64, 20, 0)])
def test_measured_bytes_equal_theoretical_in_every_view(arch, bits, group, residual, tokens, decode):
    model, cache = _bytes_case(arch, bits, group, residual, tokens, decode=decode)
    spec = kvlab.ModelSpec.from_model(model)
    seen = tokens + decode
    for view, size in (("bf16", 2), ("fp32", 4), ("native", 4)):
        b = cache.kv_bytes(view)
        assert b.measured == b.theoretical
        assert b.full == 2 * seen * spec.kv_bytes_per_token() * size // 4
    layer = cache.layers[0]
    store = layer.store
    q = group * max(0, (seen - residual) // group)
    assert store.quantized == q and store.tail == seen - q and store.tail < max(residual, 0) + group
    # the count by hand: codes + 2 float16 parameters per group + the tail in the cache dtype (bf16 view: 2 bytes)
    d, h, n = spec.head_dim, spec.n_kv_heads, spec.n_layers
    codes = 2 * q * d * bits // 8
    params = 2 * 2 * (q // group) * d + 2 * 2 * q * (d // group)
    assert cache.kv_bytes("bf16").measured == 2 * h * n * (codes + params + 2 * (seen - q) * d * 2)


def test_eight_bits_within_1e2_of_the_full_logits(tiny):
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny(ids).logits
        with get("quant", bits=8, group_size=8, residual=0).apply(tiny) as cache:
            out = tiny(ids, past_key_values=cache, use_cache=True).logits
    assert cache.layers[0].store.quantized == 40  # every token quantized
    assert (out - full).abs().max() < 1e-2


def test_error_grows_as_bits_shrink():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (2, 48), generator=torch.Generator().manual_seed(2))
    errors = []
    with torch.no_grad():
        full = model(ids).logits
        for bits in (8, 4, 2):
            with get("quant", bits=bits, group_size=8, residual=0).apply(model) as cache:
                errors.append(float((model(ids, past_key_values=cache, use_cache=True).logits - full).abs().max()))
    assert errors[0] < errors[1] < errors[2]


def test_a_window_longer_than_the_sequence_is_exact(tiny):
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tiny(ids).logits
        with get("quant", bits=2, group_size=4, residual=16).apply(tiny) as cache:
            out = tiny(ids, past_key_values=cache, use_cache=True).logits
    assert cache.layers[0].store.quantized == 0
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)


def test_generate_decodes_with_the_window_at_full_precision():
    model = kvlab.tiny_model("llama")
    ids = torch.randint(3, 97, (1, 21), generator=torch.Generator().manual_seed(4))
    method = get("quant", bits=4, group_size=8, residual=8)
    with torch.no_grad(), method.apply(model) as cache:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
    store = cache.layers[1].store
    assert out.shape[1] == 33 and store.length == 32  # the last generated token is never written
    assert store.quantized == 24 and 8 <= store.tail < 16
    assert all(isinstance(layer, QuantLayer) for layer in cache.layers)


def test_batch_select_keeps_rows():
    model, cache = _bytes_case("llama", 4, 8, 4, 30, batch=3)
    layer = cache.layers[0]
    before = layer.store.read(torch.float32)
    layer.batch_select_indices(torch.tensor([2, 0]))
    after = layer.store.read(torch.float32)
    torch.testing.assert_close(after[0], before[0][[2, 0]])
    assert layer.batch_size == 2 and cache.kv_bytes().measured == cache.kv_bytes().theoretical


def test_nominal_budget_and_bits_from_budget():
    assert Quant(bits=2, group_size=32).budget == pytest.approx(0.1875)
    assert Quant(budget=0.3, group_size=32).bits == 2
    assert Quant(budget=0.5, group_size=64).bits == 4
    assert Quant(budget=1.0).bits == 8
    with pytest.raises(ValueError, match="below the smallest quantized cache"):
        Quant(budget=0.125, group_size=32)


@pytest.mark.parametrize("options, message", [
    (dict(bits=3), "bits must be one of (2, 4, 8)"),
    (dict(bits=2, residual=-1), "residual (the full-precision window of recent tokens) must be an int >= 0"),
    (dict(bits=2, group_size=0), "group_size must be an int >= 1"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get("quant", **options)


def test_group_size_must_divide_head_dim():
    model = kvlab.tiny_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="group_size 5 does not divide head_dim 16"):
        get("quant", bits=4, group_size=5).new_cache(model)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--method", "quant", "--opt", "bits=3", "--ppl", "wiki"], "bits must be one of (2, 4, 8)"),
    (["eval", "--method", "quant", "--opt", "residual=-2", "--ppl", "wiki"], "residual"),
    (["eval", "--method", "quant", "--opt", "group_size=48", "--ppl", "wiki", "--limit", "1"],
     "group_size 48 does not divide head_dim 64"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_store_refuses_values_the_group_does_not_divide():
    store = QuantStore(2, 8, 0)
    with pytest.raises(ValueError, match="does not divide the value size 12"):
        store.append(torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 12))


def test_bench_decode_runs_quant_and_bounds_its_reads():
    from kvlab.eval import bench

    model = kvlab.tiny_model("llama")
    method = get("quant", bits=4, group_size=8, residual=4)
    table = bench.decode_speed(model, None, ["full", method], contexts=[40], budget=0.5, new_tokens=3, repeats=1,
                               progress=False)
    row = table.set_index("method").loc["quant"]
    assert row.tokens_per_s > 0 and row.kv_budget < 0.7  # nominal 4 / 16 + 2 / 8 = 0.5, plus the window
    assert row.attn_bound > 1.5  # 4-bit codes + parameters: the read is a fraction of the full cache's
