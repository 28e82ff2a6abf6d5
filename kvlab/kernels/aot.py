"""Compile every kernel for a GPU target without a GPU (``python -m kvlab.kernels.aot [sm]``).

The interpreter runs the kernels' arithmetic but not Triton's compiler: type errors in loops, constexpr branches or
shapes ``tl.dot`` refuses only show up when compiling. Triton compiles ahead of time from a signature (argument
types) and constexpr values to a cubin with the ptxas it ships, so this runs on CPU-only machines. It must run
with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions); it imports triton.
"""

from __future__ import annotations

import os
import sys


def _signature(fn, constexprs: dict, pointers: dict, floats=("scale",)) -> dict:
    """Argument types by name: pointers as given (default *bf16), ``floats`` fp32, other scalars i32."""
    kinds = {}
    for name in fn.arg_names:
        if name in constexprs:
            kinds[name] = "constexpr"
        elif name.endswith("_ptr"):
            kinds[name] = pointers.get(name, "*bf16")
        else:
            kinds[name] = "fp32" if name in floats else "i32"
    return kinds


def cases():
    """(kernel, constexprs, pointer types): head_dim 128, GQA 4, ranks up to 64, both branches of each switch."""
    from .paged_attention.triton import _paged_decode_kernel
    from .project_append.triton import _project_write_kernel
    from .projected_attention.triton import _projected_decode_kernel

    index = {"tables_ptr": "*i32", "lengths_ptr": "*i64", "k_off_ptr": "*i32", "v_off_ptr": "*i32",
             "off_ptr": "*i32", "pos_ptr": "*i64", "u_ptr": "*fp32", "w_ptr": "*fp32"}
    tiles = dict(BLOCK_G=16, BLOCK_D=128, BLOCK_DV=128)
    yield _paged_decode_kernel, dict(GROUP=4, BLOCK_SIZE=16, DIM=128, VDIM=128, BLOCK_S=16, **tiles), index
    for lift in (True, False):
        yield _projected_decode_kernel, dict(GROUP=4, DIM=128, VDIM=128, HAS_LENGTHS=lift, LIFT=lift, BLOCK_T=32,
                                             BLOCK_R=64, BLOCK_RV=64, **tiles), index
    yield _project_write_kernel, dict(DIM=128, BLOCK_T=16, BLOCK_D=128, BLOCK_R=64), index


def compile_all(arch: int = 80) -> list[str]:
    """Compiles every case for CUDA sm_``arch``; returns one line per kernel. Raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels, nothing would compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []
    for fn, constexprs, pointers in cases():
        source = ASTSource(fn=fn, signature=_signature(fn, constexprs, pointers), constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        lines.append(f"{fn.__name__}: {len(kernel.asm['cubin'])} bytes of sm_{arch} cubin")
    return lines


if __name__ == "__main__":
    print("\n".join(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 80)))
