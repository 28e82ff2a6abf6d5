"""Feature-axis table (MatryoshkaKV issue): six zero-shot tasks + wiki perplexity for PCA and MatryoshkaKV per budget.

Each configuration is one ``kvlab.eval.run.evaluate`` call (compressed attention throughout), written as JSON under
``--out`` (skipped when the file exists, so the run resumes). ``--table`` prints the markdown table of what is there,
with the paper's LLaMA2-7B numbers beside it.

    python benchmarks/feature_axis.py --limit 500 --configs full matryoshka-searched@0.5 pca@0.5
    python benchmarks/feature_axis.py --table

Ablation of the levers (issue 19), perplexity only (wiki + c4, compressed attention throughout), one JSON per row
under ``--out``/ablation: ``variant@budget`` with optional ``:k<r>v<r>`` uniform key/value ranks (the split at that
average budget), e.g.

    python benchmarks/feature_axis.py --ablation pca@0.5 pca-pre@0.5 pca-pre@0.5:k16v48 --ppl-chunks 12
    python benchmarks/feature_axis.py --ablation-table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIX = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "csqa")
# MatryoshkaKV (Lin et al., ICLR 2025), LLaMA2-7B, average of the six tasks: budget -> (PCA, MatryoshkaKV)
PAPER = {0.875: (61.25, 61.74), 0.75: (60.67, 61.55), 0.625: (58.31, 60.49), 0.5: (43.07, 59.11),
         0.375: (33.14, 56.94), 0.25: (32.92, 48.73)}
PAPER_FULL = 61.16
VARIANTS = {  # label -> (method, options)
    "full": ("full", {}),
    "pca": ("pca", {}),  # sinks 4 + attention-weighted moments: the best training-free variant
    "pca-searched": ("pca", {"allocation": "searched"}),
    # pre-RoPE fits on 16 x 512 calibration tokens (what the shared 2-core CPU allowed; the shipped post-RoPE PCA
    # used 64 x 512); output-aware values reuse the pre-RoPE fit's value moments (same data)
    "pca-pre": ("pca", {"keys": "pre_rope", "calib_chunks": 16}),
    "pca-pre-split": ("pca", {"keys": "pre_rope", "calib_chunks": 16, "allocation": "split"}),
    "pca-pre-oa": ("pca", {"keys": "pre_rope", "calib_chunks": 16, "values": "output_aware"}),
    "pca-pre-oa-split": ("pca", {"keys": "pre_rope", "calib_chunks": 16, "values": "output_aware",
                                 "allocation": "split"}),
    "matryoshka": ("matryoshka", {}),
    "matryoshka-searched": ("matryoshka", {"allocation": "searched"}),
}


def parse(config: str) -> tuple[str, float]:
    label, _, budget = config.partition("@")
    if label not in VARIANTS:
        raise SystemExit(f"unknown variant {label!r}; choose from {', '.join(VARIANTS)} (as name@budget)")
    return label, float(budget) if budget else 1.0


def parse_split(config: str) -> tuple[str, float, tuple[int, int] | None]:
    """``variant@budget[:k<r>v<r>]`` -> label, budget, (key rank, value rank) or None (the method's own ranks)."""
    head, _, split = config.partition(":")
    label, budget = parse(head)
    if not split:
        return label, budget, None
    k, _, v = split.lstrip("k").partition("v")
    if not (k.isdigit() and v.isdigit()):
        raise SystemExit(f"bad split {split!r}: write k<key rank>v<value rank>, e.g. k16v48")
    return label, budget, (int(k), int(v))


def ablation(configs: list[str], out: Path, ppl_chunks: int, corpora: list[str]) -> None:
    """Perplexity rows (one JSON each, resumable) for the lever ablation; fitted methods are reused across rows."""
    import kvlab
    from kvlab.eval.run import evaluate

    model, tok = kvlab.load_model("smollm2")
    spec = kvlab.ModelSpec.from_model(model)
    out = out / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    fitted = {}
    for config in configs:
        label, budget, split = parse_split(config)
        path = out / f"{config.replace(':', '_')}-c{ppl_chunks}.json"
        if path.exists():
            print(f"skip {path} (exists)")
            continue
        name, options = VARIANTS[label]
        if name == "full":
            method = kvlab.methods.get("full")
        else:
            root = label.removesuffix("-split")  # a split variant reuses its root's fit
            base = fitted.get(root) or _fit(model, tok, root, fitted)
            extra = {}
            if split is not None:
                extra = {"key_ranks": [[split[0]] * spec.n_kv_heads] * spec.n_layers,
                         "value_ranks": [[split[1]] * spec.n_kv_heads] * spec.n_layers}
            allocation = "split" if label.endswith("-split") else base.allocation
            method = type(base)(**{**base.options(), "budget": budget, "allocation": allocation, **extra},
                                key_bases=base.key_bases, value_bases=base.value_bases,
                                value_decoders=base.value_decoders)
            method.sensitivity = base.sensitivity
            if allocation == "split":
                method.search_split(model, tok, progress=False)
                print(f"{config}: split search {method.provenance['search']}", flush=True)
        result = evaluate(model, tok, method, ppl=corpora, limit=ppl_chunks, progress=False)
        result.update(label=label, config=config, split=list(split) if split else None,
                      search=getattr(method, "provenance", {}).get("search"))
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"{config}: " + ", ".join(f"{c} ppl {result['ppl'][c]['ppl']:.3f}" for c in corpora)
              + f", measured budget {result['budget']:.4f}, {result['seconds']:.0f} s", flush=True)


def _fit(model, tok, label: str, fitted: dict):
    """Fit (or load) the root variant ``label``; output-aware values come from the pca-pre fit's moments when
    that fit ran in this process. Fitted artefacts are saved under data/pca/."""
    import dataclasses

    import kvlab
    from kvlab.methods.artefacts import shipped_dir

    name, options = VARIANTS[label]
    plain = fitted.get("pca-pre")
    if options.get("values") == "output_aware" and getattr(plain, "value_moments", None) is not None:
        base = dataclasses.replace(plain, values="plain", allocation="uniform", key_ranks=None, value_ranks=None)
        base.value_moments, base.provenance = plain.value_moments, dict(plain.provenance)
        base.make_output_aware(model)
        print(f"{label}: output-aware values from the pca-pre fit", flush=True)
    else:
        base = kvlab.methods.get(name, 0.5, **options).prepare(model, tok)
    fitted[label] = base
    if "loaded_from" not in base.provenance:
        stem = f"smollm2-{base.keys}" + ("-output_aware" if base.values == "output_aware" else "")
        print(f"saved {base.save(shipped_dir() / name / f'{stem}.safetensors', model)}", flush=True)
    return base


def ablation_table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "ablation").glob("*.json"))]
    full = {r["ppl"]["wiki"]["tokens"]: r for r in rows if r["label"] == "full"}
    corpora = [c for c in ("wiki", "c4") if rows and c in rows[0]["ppl"]]
    lines = ["| config | keys | values | K rank / V rank | measured budget | " + " | ".join(
        f"{c} ppl (x full, tokens)" for c in corpora) + " |", "|" + "---|" * (5 + len(corpora))]
    for r in sorted(rows, key=lambda r: (-(r["budget_nominal"] or 1.0), r["config"])):
        ref = full.get(r["ppl"]["wiki"]["tokens"])
        opts = r.get("options", {})
        split = r.get("split")
        search = r.get("search") or {}
        if split:
            ranks = f"{split[0]} / {split[1]}"
        elif search.get("kind") == "split":
            ranks = f"{search['key_rank']} / {search['value_rank']} (split search)"
        else:
            ranks = "searched" if opts.get("allocation") == "searched" else "uniform"
        cells = []
        for c in corpora:
            ppl = r["ppl"][c]["ppl"]
            rel = f" ({ppl / ref['ppl'][c]['ppl']:.2f}x" if ref else " ("
            cells.append(f"{ppl:.2f}{rel}, {r['ppl'][c]['tokens']})")
        keys = opts.get("keys", "post_rope") if r["label"] != "full" else "-"  # rows before key modes: post-RoPE
        values = opts.get("values", "plain") if r["label"] != "full" else "-"
        lines.append(f"| {r['config']} | {keys} | {values} | {ranks} | {r['budget']:.3f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def run(configs: list[str], out: Path, limit: int, ppl_chunks: int, seed: int) -> None:
    import kvlab
    from kvlab.eval.run import evaluate

    model, tok = kvlab.load_model("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    for config in configs:
        label, budget = parse(config)
        path = out / f"{label}@{budget}-n{limit}.json"
        if path.exists():
            print(f"skip {path} (exists)")
            continue
        name, options = VARIANTS[label]
        method = kvlab.methods.get(name, None if name == "full" else budget, **options)
        tasks = evaluate(model, tok, method, tasks=SIX, limit=limit, seed=seed)
        ppl = evaluate(model, tok, method, ppl=["wiki"], limit=ppl_chunks, seed=seed)
        result = {**tasks, "ppl": ppl["ppl"], "seconds": tasks["seconds"] + ppl["seconds"], "label": label,
                  "avg_acc": sum(tasks["tasks"][t]["acc"] for t in SIX) / len(SIX)}
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{label}@{budget}: avg acc {result['avg_acc']:.4f}, wiki ppl {ppl['ppl']['wiki']['ppl']:.3f}, "
              f"measured budget {tasks['budget']:.4f}, {result['seconds']:.0f} s")


def table(out: Path) -> str:
    rows = {}
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        rows[(r["label"], r["budget_nominal"] or 1.0, r["settings"]["limit"])] = r
    full = {n: r for (label, _, n), r in rows.items() if label == "full"}
    lines = ["| variant | budget | measured budget | n/task | " + " | ".join(SIX) + " | avg | % of full | wiki ppl "
             "(x full) | paper PCA -> MatryoshkaKV (LLaMA2-7B avg) |",
             "|" + "---|" * (len(SIX) + 8)]
    for (label, budget, n), r in sorted(rows.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        ref = full.get(n)
        share = f"{100 * r['avg_acc'] / ref['avg_acc']:.1f}" if ref else "-"
        ppl = r["ppl"]["wiki"]["ppl"]
        rel = f"{ppl:.2f} ({ppl / ref['ppl']['wiki']['ppl']:.2f}x)" if ref else f"{ppl:.2f}"
        paper = PAPER.get(budget)
        paper_text = f"{paper[0]:.2f} -> {paper[1]:.2f}" if paper else (f"full {PAPER_FULL}" if label == "full" else "")
        accs = " | ".join(f"{100 * r['tasks'][t]['acc']:.1f}" for t in SIX)
        lines.append(f"| {label} | {budget:.3f} | {r['budget']:.3f} | {n} | {accs} | {100 * r['avg_acc']:.2f} | "
                     f"{share} | {rel} | {paper_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=[], help="variant@budget, e.g. matryoshka-searched@0.5")
    parser.add_argument("--limit", type=int, default=500, help="items per task (seeded subset)")
    parser.add_argument("--ppl-chunks", type=int, default=40, help="wiki eval chunks of 512 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "results" / "feature_axis")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--ablation", nargs="*", default=[], help="perplexity-only rows: variant@budget[:k<r>v<r>]")
    parser.add_argument("--corpora", nargs="*", default=["wiki", "c4"])
    parser.add_argument("--ablation-table", action="store_true")
    args = parser.parse_args()
    if args.ablation:
        ablation(args.ablation, args.out, args.ppl_chunks, args.corpora)
    if args.ablation_table:
        print(ablation_table(args.out))
    if args.configs:
        run(args.configs, args.out, args.limit, args.ppl_chunks, args.seed)
    if args.table:
        print(table(args.out))


if __name__ == "__main__":
    main()
