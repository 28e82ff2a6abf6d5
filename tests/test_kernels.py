import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: kernels run in Triton's interpreter on CPU

import math
import subprocess
import sys

import pytest
import torch

from kvlab.kernels import bytes_model, dispatch
from kvlab.kernels.check import dense_attention
from kvlab.kernels.paged_attention import reference as paged_ref
from kvlab.kernels.project_append import reference as append_ref
from kvlab.kernels.projected_attention import reference as proj_ref

try:
    import triton  # noqa: F401

    from kvlab.kernels.paged_attention import triton as paged_tri
    from kvlab.kernels.project_append import triton as append_tri
    from kvlab.kernels.projected_attention import triton as proj_tri

    NO_TRITON = None
except ImportError as err:  # CPU installs without the dev extra
    NO_TRITON = f"triton cannot be imported ({err}); install kvlab[dev] to run the kernels in the interpreter"

needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


# ---------------------------------------------------------------------------------------------------------- inputs
def paged_case(lengths, group, dim, vdim, block, dtype, index=torch.int32, seed=0):
    """Random pools and shuffled block tables for lengths (B, H_kv); unused table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    batch, n_kv = lengths.shape
    need = (lengths + block - 1) // block
    max_blocks = int(need.max()) + 1
    n_blocks = int(need.sum()) + 3  # a few blocks nobody uses
    ids = torch.randperm(n_blocks, generator=g)
    tables = torch.full((batch, n_kv, max_blocks), -1, dtype=index)
    used = torch.arange(max_blocks) < need[..., None]
    tables[used] = ids[: int(need.sum())].to(index)
    query = torch.randn(batch, n_kv * group, dim, generator=g).to(dtype)
    keys = torch.randn(n_blocks, block, dim, generator=g).to(dtype)
    values = torch.randn(n_blocks, block, vdim, generator=g).to(dtype)
    return query, keys, values, tables, lengths.to(index)


def bases(dim, ranks, g, dtype=torch.float32):
    """Flat (dim, sum ranks) basis of orthonormal per-head blocks and its offsets."""
    parts = [torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:, :r] for r in ranks]
    flat, offsets = proj_ref.pack_ragged(parts)
    return flat.to(dtype), offsets


def projected_case(batch, group, dim, vdim, key_ranks, value_ranks, tokens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, k_off = bases(dim, key_ranks, g)
    w, v_off = bases(vdim, value_ranks, g)
    query = torch.randn(batch, len(key_ranks) * group, dim, generator=g).to(dtype)
    key_codes = torch.randn(batch, tokens, u.shape[1], generator=g).to(dtype)
    value_codes = torch.randn(batch, tokens, w.shape[1], generator=g).to(dtype)
    return query, key_codes, value_codes, u, w, k_off, v_off


# ------------------------------------------------------------------------------------------------ paged attention
PAGED = {  # GQA ratio, D, Dv, S, lengths (B, H_kv): lengths off the block size, zero-length heads, batch > 1
    "g1": (1, 16, 16, 16, [[33, 0]]),
    "g2": (2, 24, 8, 5, [[7, 1, 12], [0, 20, 3]]),
    "g3": (3, 40, 40, 8, [[17], [9], [1]]),
    "g8": (8, 64, 32, 16, [[50, 16]]),
    "s1": (4, 96, 80, 1, [[3, 2], [0, 1]]),  # one token per block
}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PAGED)
def test_paged_kernel_matches_reference(case, dtype):
    group, dim, vdim, block, lengths = PAGED[case]
    index = torch.int64 if group % 2 else torch.int32
    inputs = paged_case(lengths, group, dim, vdim, block, dtype, index=index)
    got = paged_tri.paged_decode_attention(*inputs, scaling=0.3)
    want = paged_ref.paged_decode_attention(*inputs, scaling=0.3)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    empty = torch.tensor(lengths) == 0  # (B, H_kv): the group's query heads give exact zeros
    assert (got.reshape(*empty.shape, group, vdim)[empty] == 0).all()


@needs_triton
def test_paged_kernel_reads_strided_inputs():
    query, keys, values, tables, lengths = paged_case([[9, 30], [14, 0]], 2, 32, 32, 8, torch.float32)
    wide = torch.zeros(*query.shape[:2], 2 * query.shape[2])
    wide[..., ::2] = query
    query = wide[..., ::2]  # stride 2 on the feature axis
    tables = tables.transpose(0, 1).contiguous().transpose(0, 1)  # (B, H_kv, M) stored head-major
    got = paged_tri.paged_decode_attention(query, keys, values, tables, lengths)
    want = paged_ref.paged_decode_attention(query, keys, values, tables, lengths)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_paged_kernel_errors_say_what_is_allowed():
    query, keys, values, tables, lengths = paged_case([[9, 3]], 2, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"query must be \(B, H, D\)"):
        paged_tri.paged_decode_attention(query[0], keys, values, tables, lengths)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_tri.paged_decode_attention(query.half(), keys, values, tables, lengths)
    with pytest.raises(ValueError, match="integer tensors"):
        paged_tri.paged_decode_attention(query, keys, values, tables, lengths.float())
    with pytest.raises(ValueError, match=r"lengths must be in \[0, M x S"):
        paged_tri.paged_decode_attention(query, keys, values, tables, lengths * 100)
    bad = tables.clone()
    bad[0, 0, 0] = keys.shape[0]
    with pytest.raises(ValueError, match=r"block ids in \[0, "):
        paged_tri.paged_decode_attention(query, keys, values, bad, lengths)
    with pytest.raises(ValueError, match="query heads do not split"):
        paged_tri.paged_decode_attention(query[:, :3], keys, values, tables, lengths)


# -------------------------------------------------------------------------------------------- projected attention
PROJECTED = {  # batch, GQA ratio, D, Dv, key ranks, value ranks, T, lengths (None: all T)
    "g1": (1, 1, 16, 16, [1, 16], [16, 1], 17, None),
    "g2": (3, 2, 24, 20, [5, 24, 1], [3, 11, 20], 37, [37, 0, 20]),
    "g3": (2, 3, 32, 32, [7], [32], 33, [1, 33]),
    "g8": (2, 8, 64, 48, [9, 64], [48, 2], 40, [40, 25]),
    "d80": (1, 4, 80, 80, [80, 33], [1, 79], 70, [70]),  # three token tiles
}


def _projected_inputs(case, dtype):
    batch, group, dim, vdim, key_ranks, value_ranks, tokens, lengths = PROJECTED[case]
    inputs = projected_case(batch, group, dim, vdim, key_ranks, value_ranks, tokens, dtype)
    return inputs, (None if lengths is None else torch.tensor(lengths)), group


@pytest.mark.parametrize("case", PROJECTED)
def test_projected_reference_is_attention_over_reconstructed_cache(case):
    (query, key_codes, value_codes, u, w, k_off, v_off), lengths, group = _projected_inputs(case, torch.float32)
    got = proj_ref.projected_decode_attention(query, key_codes, value_codes, u, w, k_off, v_off, lengths, scaling=0.2)
    keys, values = proj_ref.reconstruct(key_codes, u, k_off), proj_ref.reconstruct(value_codes, w, v_off)
    full = torch.full((query.shape[0],), key_codes.shape[1]) if lengths is None else lengths
    torch.testing.assert_close(got, dense_attention(query, keys, values, full, 0.2), atol=1e-5, rtol=1e-4)
    codes = proj_ref.projected_decode_attention(query, key_codes, value_codes, u, w, k_off, v_off, lengths, 0.2,
                                                lift=False)  # (B, H, max r_v): lifting the codes gives the output
    v_ranks = [b - a for a, b in zip(v_off, v_off[1:])]
    for j in range(query.shape[1]):
        h = j // group
        assert (codes[:, j, v_ranks[h]:] == 0).all()
        lifted = codes[:, j, : v_ranks[h]] @ w[:, v_off[h]: v_off[h + 1]].T
        torch.testing.assert_close(lifted, got[:, j], atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("lift", [True, False], ids=["lift", "codes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROJECTED)
def test_projected_kernel_matches_reference(case, dtype, lift):
    inputs, lengths, _ = _projected_inputs(case, dtype)
    got = proj_tri.projected_decode_attention(*inputs, lengths, lift=lift)
    want = proj_ref.projected_decode_attention(*inputs, lengths, lift=lift)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    if lengths is not None:
        assert (got[lengths == 0] == 0).all()


@needs_triton
def test_projected_kernel_reads_strided_inputs_and_half_bases():
    query, key_codes, value_codes, u, w, k_off, v_off = projected_case(2, 2, 24, 24, [3, 24], [24, 5], 29,
                                                                       torch.float32)
    key_codes = key_codes.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, R) stored token-major
    u, w = u.half(), w.bfloat16()
    lengths = torch.tensor([29, 4])
    got = proj_tri.projected_decode_attention(query, key_codes, value_codes, u, w, torch.tensor(k_off), v_off,
                                              lengths, block_tokens=16)
    want = proj_ref.projected_decode_attention(query, key_codes, value_codes, u, w, k_off, v_off, lengths)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_projected_kernel_errors_say_what_is_allowed():
    query, key_codes, value_codes, u, w, k_off, v_off = projected_case(2, 2, 16, 16, [3, 5], [4, 16], 9,
                                                                       torch.float32)
    call = proj_tri.projected_decode_attention
    with pytest.raises(ValueError, match="must rise from 0 to the flat width 8"):
        call(query, key_codes, value_codes, u, w, [0, 3, 9], v_off)
    with pytest.raises(ValueError, match="key_offsets has 2 kv heads but value_offsets 1"):
        call(query, key_codes, value_codes, u, w, k_off, [0, 20])
    with pytest.raises(ValueError, match="query heads do not split"):
        call(query[:, :3], key_codes, value_codes, u, w, k_off, v_off)
    with pytest.raises(ValueError, match=r"key_basis must be \(D=16, R_k=8\)"):
        call(query, key_codes, value_codes, u.T, w, k_off, v_off)
    with pytest.raises(ValueError, match="share one dtype"):
        call(query, key_codes.half(), value_codes, u, w, k_off, v_off)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T = 9\]"):
        call(query, key_codes, value_codes, u, w, k_off, v_off, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor \(B=2,\)"):
        call(query, key_codes, value_codes, u, w, k_off, v_off, torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="block_tokens must be a power of two >= 16"):
        call(query, key_codes, value_codes, u, w, k_off, v_off, block_tokens=24)


# -------------------------------------------------------------------------------------------------- project append
APPEND = {  # batch, H_kv, T_new, T_cap, D, Dv, key ranks, value ranks, positions
    "decode": (1, 1, 1, 4, 16, 16, [3], [16], [3]),
    "ragged": (3, 3, 5, 12, 24, 12, [1, 7, 24], [12, 2, 5], [0, 7, 4]),
    "prefill": (2, 2, 70, 80, 20, 20, [20, 6], [4, 20], [10, 0]),  # more than one tile of tokens
}


def append_case(case, dtype, seed=0):
    batch, n_kv, new, capacity, dim, vdim, key_ranks, value_ranks, positions = APPEND[case]
    g = torch.Generator().manual_seed(seed)
    u, k_off = bases(dim, key_ranks, g)
    w, v_off = bases(vdim, value_ranks, g)
    keys = torch.randn(batch, n_kv, new, dim, generator=g).to(dtype)
    values = torch.randn(batch, n_kv, new, vdim, generator=g).to(dtype)
    key_codes = torch.randn(batch, capacity, u.shape[1], generator=g).to(dtype)
    value_codes = torch.randn(batch, capacity, w.shape[1], generator=g).to(dtype)
    return keys, values, key_codes, value_codes, u, w, k_off, v_off, torch.tensor(positions)


def test_append_reference_writes_codes_in_place():
    keys, values, key_codes, value_codes, u, w, k_off, v_off, positions = append_case("ragged", torch.float32)
    before = key_codes.clone(), value_codes.clone()
    out = append_ref.project_append(keys, values, key_codes, value_codes, u, w, k_off, v_off, positions)
    assert out[0] is key_codes and out[1] is value_codes
    new = keys.shape[2]
    for codes, old, states, basis, offsets in ((key_codes, before[0], keys, u, k_off),
                                               (value_codes, before[1], values, w, v_off)):
        written = torch.zeros(codes.shape[:2], dtype=torch.bool)
        for b, p in enumerate(positions.tolist()):
            written[b, p: p + new] = True
            for h, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
                torch.testing.assert_close(codes[b, p: p + new, lo:hi], states[b, h] @ basis[:, lo:hi])
        assert torch.equal(codes[~written], old[~written])


def test_append_then_projected_read_is_attention_over_projected_cache():
    """Project-on-write of a whole cache, then the projected read == attention over K U U^T, V W W^T."""
    g = torch.Generator().manual_seed(1)
    batch, n_kv, group, tokens, dim = 2, 2, 3, 11, 16
    u, k_off = bases(dim, [4, 16], g)
    w, v_off = bases(dim, [9, 2], g)
    keys, values = torch.randn(2, batch, n_kv, tokens, dim, generator=g)
    query = torch.randn(batch, n_kv * group, dim, generator=g)
    key_codes, value_codes = torch.zeros(batch, tokens + 5, 20), torch.zeros(batch, tokens + 5, 11)
    for t in range(tokens):  # one decode step at a time
        append_ref.project_append(keys[:, :, t: t + 1], values[:, :, t: t + 1], key_codes, value_codes, u, w, k_off,
                                  v_off, torch.full((batch,), t))
    lengths = torch.tensor([tokens, 6])
    got = proj_ref.projected_decode_attention(query, key_codes, value_codes, u, w, k_off, v_off, lengths)
    proj = lambda x, basis, off: torch.stack([x[:, h] @ basis[:, a:b] @ basis[:, a:b].T
                                               for h, (a, b) in enumerate(zip(off, off[1:]))], 1)
    want = dense_attention(query, proj(keys, u, k_off), proj(values, w, v_off), lengths, dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", APPEND)
def test_append_kernel_matches_reference(case, dtype):
    keys, values, key_codes, value_codes, u, w, k_off, v_off, positions = append_case(case, dtype)
    want = append_ref.project_append(keys, values, key_codes.clone(), value_codes.clone(), u, w, k_off, v_off,
                                      positions)
    got = append_tri.project_append(keys, values, key_codes.clone(), value_codes.clone(), u, w, k_off, v_off,
                                    positions)
    slots = torch.arange(key_codes.shape[1])
    untouched = (slots < positions[:, None]) | (slots >= positions[:, None] + keys.shape[2])  # (B, T_cap)
    for g, r, old in zip(got, want, (key_codes, value_codes)):
        torch.testing.assert_close(g, r, **TOL[dtype])
        assert torch.equal(g[untouched], old[untouched])  # slots outside the write stay bit-identical


@needs_triton
def test_append_kernel_reads_and_writes_strided_tensors():
    """States as models hand them over ((B, T, H_kv, D) transposed), buffers that are views of a larger one."""
    keys, values, key_codes, value_codes, u, w, k_off, v_off, positions = append_case("ragged", torch.float32)
    keys, values = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (keys, values))
    store = torch.randn(2, *key_codes.shape)  # key codes live in slice 1 of a (layers, B, T_cap, R_k) store
    store[1] = key_codes
    want = append_ref.project_append(keys, values, key_codes.clone(), value_codes.clone(), u, w, k_off, v_off,
                                     positions)
    got = append_tri.project_append(keys, values, store[1], value_codes.clone(), u.T.contiguous().T, w, k_off, v_off,
                                    positions)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert got[0].data_ptr() == store[1].data_ptr()


@needs_triton
def test_append_kernel_errors_say_what_is_allowed():
    keys, values, key_codes, value_codes, u, w, k_off, v_off, positions = append_case("ragged", torch.float32)
    call = append_tri.project_append
    with pytest.raises(ValueError, match=r"positions must be in \[0, T_cap - T_new = 7\]"):
        call(keys, values, key_codes, value_codes, u, w, k_off, v_off, positions + 1)
    with pytest.raises(ValueError, match=r"offsets must have H_kv \+ 1 = 3 entries, got 4 and 4"):
        call(keys[:, :2], values[:, :2], key_codes, value_codes, u, w, k_off, v_off, positions)
    with pytest.raises(ValueError, match="keys and values must be"):
        call(keys, values[:, :, :2], key_codes, value_codes, u, w, k_off, v_off, positions)
    with pytest.raises(ValueError, match="states, codes and bases must be among"):
        call(keys, values, key_codes.to(torch.float64), value_codes, u, w, k_off, v_off, positions)
    with pytest.raises(ValueError, match=r"positions must be an integer tensor \(B=3,\)"):
        call(keys, values, key_codes, value_codes, u, w, k_off, v_off, positions[:2])


@needs_triton
def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """The interpreter skips Triton's compiler: compile every kernel ahead of time for sm_80 (ptxas ships with
    triton), with TRITON_INTERPRET unset, in a fresh process and cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "kvlab.kernels.aot", "80"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("cubin") == 4, run.stdout


# ------------------------------------------------------------------------------------------------------- dispatch
def test_importing_the_kernels_package_does_not_import_triton():
    code = ("import sys, kvlab.kernels, kvlab.kernels.dispatch, kvlab.kernels.bytes_model; "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_dispatcher_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_kernel", lambda op: pytest.fail(f"the Triton {op} kernel was picked on CPU"))
    assert not dispatch.use_triton(torch.zeros(1))
    inputs = paged_case([[5, 0]], 2, 16, 16, 4, torch.float32)
    torch.testing.assert_close(dispatch.paged_decode_attention(*inputs), paged_ref.paged_decode_attention(*inputs),
                               atol=0, rtol=0)
    proj, lengths, _ = _projected_inputs("g2", torch.float32)
    torch.testing.assert_close(dispatch.projected_decode_attention(*proj, lengths, None, False),
                               proj_ref.projected_decode_attention(*proj, lengths, None, False), atol=0, rtol=0)
    args = append_case("decode", torch.float32)
    want = append_ref.project_append(*args[:2], args[2].clone(), args[3].clone(), *args[4:])
    got = dispatch.project_append(*args)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_triton
def test_dispatcher_takes_the_triton_path_when_asked(monkeypatch):
    """With the CUDA test forced true, CPU tensors go through the kernels (run by the interpreter)."""
    picked = []
    kernel = dispatch._kernel
    monkeypatch.setattr(dispatch, "use_triton", lambda tensor: True)
    monkeypatch.setattr(dispatch, "_kernel", lambda op: picked.append(op) or kernel(op))
    inputs = paged_case([[5, 0]], 2, 16, 16, 4, torch.float32)
    torch.testing.assert_close(dispatch.paged_decode_attention(*inputs), paged_ref.paged_decode_attention(*inputs))
    proj, lengths, _ = _projected_inputs("g1", torch.float32)
    torch.testing.assert_close(dispatch.projected_decode_attention(*proj, lengths),
                               proj_ref.projected_decode_attention(*proj, lengths))
    args = append_case("decode", torch.float32)
    dispatch.project_append(*args)
    assert picked == ["paged_attention", "projected_attention", "project_append"]


# ---------------------------------------------------------------------------------------------------- bytes model
def test_bytes_model_on_hand_computed_cases():
    # K, V: 2 rows x 2 kv heads x 10 tokens x (8 + 8) x 2 B = 1280; q, o: 2 x 4 heads x 16 x 2 = 256
    assert bytes_model.bytes_moved("attention", batch=2, heads=4, kv_heads=2, head_dim=8, tokens=10) == 1536
    # held K, V: 5 tokens x 8 x 2 = 80; table entries: 2 blocks x 4 = 8; lengths 2 x 4 = 8; q, o: 2 x 8 x 2 = 32
    assert bytes_model.bytes_moved("paged_attention", batch=1, heads=2, kv_heads=2, head_dim=4, tokens=[5, 0],
                                   block_size=4) == 128
    # codes 10 x (4 + 4) x 2 = 160; bases (4 x 4 + 4 x 4) x 4 = 128; q, o 2 x (4 + 4) x 2 = 32; lengths 4;
    # offsets 2 x 3 x 4 = 24
    shapes = dict(batch=1, heads=2, head_dim=4, tokens=10, key_ranks=[1, 3], value_ranks=[2, 2], basis_bytes=4)
    assert bytes_model.bytes_moved("projected_attention", **shapes) == 348
    assert bytes_model.bytes_moved("projected_attention", lift=False, **shapes) == 340  # o is 2 x 2 x 2 = 8
    # new K, V 2 x 2 x 8 x 2 = 64; bases (16 + 16) x 2 = 64; codes written 2 x 8 x 2 = 32; positions 8; offsets 24
    assert bytes_model.bytes_moved("project_append", batch=2, head_dim=4, key_ranks=[1, 3], value_ranks=[2, 2]) == 192
    assert bytes_model.bytes_moved("append", batch=2, kv_heads=2, head_dim=4) == 2 * 64
    full = bytes_model.bytes_moved("attention", batch=1, heads=2, kv_heads=2, head_dim=4, tokens=10)  # 320 + 32
    assert math.isclose(bytes_model.speedup_bound(full, 348), 352 / 348)


def test_bytes_model_errors_name_the_op_and_its_arguments():
    with pytest.raises(ValueError, match="unknown op 'flash'; known:"):
        bytes_model.bytes_moved("flash", batch=1)
    with pytest.raises(ValueError, match="missing a required argument: 'block_size'"):
        bytes_model.bytes_moved("paged_attention", batch=1, heads=2, kv_heads=2, head_dim=4, tokens=3)
    with pytest.raises(ValueError, match="tokens must be an int or 2 per-kv-head counts"):
        bytes_model.bytes_moved("paged_attention", batch=1, heads=2, kv_heads=2, head_dim=4, tokens=[3],
                                block_size=4)


# ------------------------------------------------------------------------------------------ correctness summary
def test_correctness_summary_of_the_references():
    from kvlab.kernels import check

    rows = check.correctness(gpu=False)  # what notebook 06 shows
    assert {r["op"] for r in rows} == {"projected_attention", "paged_attention", "project_append"}
    assert all(r["max_abs_error"] < 1e-5 and r["implementation"] == "torch reference (CPU)" for r in rows)
    assert check.projected_layer_decode_error("llama", sinks=2) < 1e-5
