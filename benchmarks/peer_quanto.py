"""The peer on the precision axis (issue 21): transformers' ``QuantizedCache`` with the optimum-quanto backend, on
this CPU, beside kvlab's ``quant`` at (nearly) equal bytes: continuation perplexity in the protocol of
``benchmarks/precision.py`` (SmolLM2, wiki eval text, 4 chunks of 1,024 tokens, the first 768 prefilled, the last
256 scored), the model's own attention (``--method none``'s path) with the peer's cache.

Bytes: transformers' ``kv_bytes`` accounting does not know quanto's tensors, so they are counted here from what each
layer holds after the last forward: the packed codes (``_data``, uint8), the per-group scale and shift (the model's
dtype, counted at bf16 size as kvlab's bf16 view does) and the full-precision residual; over a bf16 full cache of the
same tokens. quanto groups ``q_group_size`` consecutive numbers along the head dimension (axis 0: per token, for keys
too), and re-quantizes the whole cache from its dequantized form every ``residual_length`` tokens.

    python benchmarks/peer_quanto.py                     # 2 and 4 bits, groups of 32 and 64, residual 32
"""

from __future__ import annotations

import json
import time
from pathlib import Path

OUT = Path("data/results/precision")
CONFIGS = {"quanto-2b-g32": (2, 32), "quanto-2b-g64": (2, 64), "quanto-4b-g32": (4, 32)}


def peer_bytes(cache, model) -> dict:
    import torch

    measured = full = 0
    size = torch.empty((), dtype=torch.bfloat16).element_size()
    for layer in cache.layers:
        for q, residual in ((layer._quantized_keys, layer.keys), (layer._quantized_values, layer.values)):
            data = q._data._data if hasattr(q._data, "_data") else q._data
            measured += data.numel() * data.element_size() + (q._scale.numel() + q._shift.numel()) * size
            measured += residual.numel() * size
            full += q.numel() * size + residual.numel() * size
    return {"measured": measured, "full": full, "budget": measured / full, "dtype": "bf16"}


def main() -> None:
    import torch
    from transformers import QuantizedCache

    import kvlab
    from kvlab.eval.perplexity import perplexity
    from kvlab.methods.base import NoCompression

    model, tok = kvlab.load_model("smollm2")
    OUT.mkdir(parents=True, exist_ok=True)
    for label, (bits, group) in CONFIGS.items():
        path = OUT / f"{label}.json"
        if path.exists():
            continue
        caches = []

        class Peer(NoCompression):
            def new_cache(self, model):
                cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=group,
                                       residual_length=32, axis_key=0, axis_value=0)
                caches.append(cache)
                return cache

        tic = time.perf_counter()
        r = perplexity(model, tok, Peer(), "wiki", chunk_len=1024, n_chunks=4, protocol="context", context_frac=0.75,
                       batch_size=4, progress=False)
        kv = peer_bytes(caches[-1], model)
        record = {"label": label, "method": "transformers QuantizedCache (optimum-quanto 0.2.7)",
                  "options": {"nbits": bits, "q_group_size": group, "residual_length": 32, "axis_key": 0,
                              "axis_value": 0},
                  "ppl": r["ppl"], "tokens": r["tokens"], "chunks": 4, "chunk_len": 1024, "context_frac": 0.75,
                  "kv_bytes": kv, "budget_bf16": kv["budget"], "seconds": time.perf_counter() - tic,
                  "threads": torch.get_num_threads()}
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{label}: ppl {r['ppl']:.3f}  budget(bf16) {kv['budget']:.4f}  {record['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
