"""Time the head-wise spectra of every (layer, kv head) pair: keys (post- and pre-RoPE) and values, sinks kept apart,
over N x T calibration tokens (default 64 x 512 = 32k wiki tokens, as notebook 01), and print the seconds by phase.

    OMP_NUM_THREADS=1 python benchmarks/spectra_speed.py                 # the 32k-token spectra, one thread
    python benchmarks/spectra_speed.py --chunks 8 --repeats 3            # a shorter run, best of 3

Phases: ``forward`` (the model's forward passes, recorded by kvlab.capture), ``accumulate`` (X^T X per layer and
part, all kv heads at once), ``eigh`` (one stacked torch.linalg.eigh per part). Not a test: numbers depend on the
machine and its load, so compare runs made in the same conditions.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--chunks", type=int, default=64, help="calibration sequences")
    parser.add_argument("--chunk-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sinks", type=int, default=4, help="positions kept apart (spectra with and without them)")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the fastest is reported")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the forward passes (bfloat16: opt-in, faster, bf16 rounding)")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)

    import torch

    import kvlab
    from kvlab.analysis.spectra import PARTS, Spectra, accumulate_moments, combine

    model, tok = kvlab.load_model(args.model)
    spec = kvlab.ModelSpec.from_model(model)
    ids = kvlab.data.text_chunks("wiki", tok, chunk_len=args.chunk_len, n_chunks=args.chunks, split="calib")
    runs = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        moments, seconds = accumulate_moments(model, ids, batch_size=args.batch_size, parts=PARTS,
                                              skip_first=(0, 1, args.sinks), dtype=getattr(torch, args.dtype))
        spectra = Spectra.from_moments(combine(moments, args.sinks), skip_first=args.sinks)
        seconds = {**seconds, "eigh": spectra.seconds["eigh"], "total": time.perf_counter() - tic}
        runs.append(seconds)
    best = min(runs, key=lambda s: s["total"])
    pairs = spec.n_layers * spec.n_kv_heads
    record = {"model": args.model, "dtype": args.dtype, "pairs": pairs, "tokens": ids.numel(), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "seconds": {k: round(v, 2) for k, v in best.items()},
              "rank90_keys": round(float(spectra.rank_for_energy("keys", 0.9).float().mean()), 2),
              "rank90_keys_pre": round(float(spectra.rank_for_energy("keys_pre", 0.9).float().mean()), 2),
              "rank90_values": round(float(spectra.rank_for_energy("values", 0.9).float().mean()), 2)}
    print(f"spectra of {pairs} (layer, kv head) pairs over {ids.shape[0]} x {ids.shape[1]} = {ids.numel():,} tokens, "
          f"{record['threads']} thread(s), {args.dtype}: {best['total']:.1f} s "
          f"(forward {best['forward']:.1f} s, accumulate {best['accumulate']:.1f} s, eigh {best['eigh']:.2f} s)")
    print(json.dumps(record))
    if args.json:
        from kvlab.atomic import write_text

        write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
