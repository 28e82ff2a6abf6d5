"""Hot paths of compressed caches: each op has ``reference.py`` (plain torch, the truth) and, where written,
``triton.py`` (kernel + host wrapper). The cache calls the dispatcher of each op, which picks Triton on CUDA and
the torch reference elsewhere. Importing this package imports neither triton nor any kernel.

    paged_attention/       decode attention through per-(row, kv head) block tables and lengths
    projected_attention/   decode attention over low-rank K/V codes, a rank per kv head (flat ragged layout)
    rope_attention/        the same over pre-RoPE key codes: keys rebuilt and rotated by their positions in the read
    project_append/        fused project-on-write of new K/V into preallocated code buffers
    dispatch.py            one entry point per op (Triton on CUDA, else the reference)
    bytes_model.py         bytes each op moves per decode step: the memory-bound speed-up bound
    aot.py                 compiles every kernel for a GPU target on a CPU-only machine (a compile check)
"""
