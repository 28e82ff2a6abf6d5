"""The ``kvlab`` command line: fetch, info, eval, fit, bench, report, lab. Bad input -> a message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import atomic
from .cliargs import Float, Int, IntList, Model, Names, Options, OutDir, OutFile


class UsageError(Exception):
    """Wrong names, budgets or options given on the command line."""


def parse_options(pairs: list[str]) -> dict:
    """``["rank=16", "sinks=true", "name=x"]`` -> {"rank": 16, "sinks": True, "name": "x"}."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--opt takes key=value, got {pair!r}")
        try:
            value = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            value = raw
        options[key] = value
    return options


def _split(csv: str | None) -> list[str]:
    return [x.strip() for x in csv.split(",") if x.strip()] if csv else []


def cmd_fetch(args) -> int:
    from .data import fetch

    paths = fetch(args.names or None)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if not args.names or "smollm2" in args.names:
        from .models import converted_model_dir

        print(f"smollm2 (safetensors): {converted_model_dir('smollm2')}")
    return 0


def cmd_info(args) -> int:
    from .models import load_spec, resolve_model

    spec = load_spec(resolve_model(args.model))
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
    else:
        for key, value in spec.to_dict().items():
            print(f"{key:15} {value}")
    return 0


def cmd_eval(args) -> int:
    from .eval.run import CONTINUATION, LONG_TASKS, allowed_tasks

    tasks, corpora = _split(args.tasks), _split(args.ppl)
    bad = [t for t in tasks if t not in allowed_tasks()]
    if bad:
        raise UsageError(f"unknown task(s) {bad}; choose from {', '.join(allowed_tasks())}")
    bad = [c for c in corpora if c not in ("wiki", "c4")]
    if bad:
        raise UsageError(f"unknown corpus {bad}; choose from wiki, c4")
    if not tasks and not corpora:
        raise UsageError("nothing to evaluate: give --tasks and/or --ppl")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise UsageError(f"--budget must be in (0, 1] (fraction of the full cache's bytes), got {args.budget}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.fewshot < 0:
        raise UsageError(f"--fewshot must be >= 0 (solved examples before each item), got {args.fewshot}")
    method = _method(args)
    from .eval.perplexity import PROTOCOLS

    supported = getattr(method, "protocols", PROTOCOLS)
    protocol = args.protocol or supported[0]
    if protocol not in supported:
        raise UsageError(f"method {method.name!r} supports --protocol {' or '.join(supported)}, not {protocol!r}")

    from . import models
    from .eval.run import evaluate
    from .models import load_model

    try:
        model, tokenizer = load_model(args.model)
        method.check(models.ModelSpec.from_model(model))  # options that depend on the geometry (head_dim, ...)
    except ValueError as e:
        raise UsageError(str(e)) from e
    from .models import check_window

    try:  # refuse a context longer than the model's window before any work, naming the limit
        if CONTINUATION in tasks:
            check_window(model, args.context_len + 256, f"continuation at --context-len {args.context_len} + 256")
        if any(t in LONG_TASKS for t in tasks):
            check_window(model, args.context_len, f"--context-len {args.context_len}")
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:  # options that only meet the data here (e.g. an observation window longer than the context)
        result = evaluate(model, tokenizer, method, tasks=tasks, ppl=corpora, limit=args.limit,
                          context_len=args.context_len, seed=args.seed, protocol=protocol, num_fewshot=args.fewshot)
    except ValueError as e:
        raise UsageError(str(e)) from e
    result["model"] = args.model
    text = json.dumps(result, indent=2)
    if args.json:
        atomic.write_text(args.json, text + "\n")
    print(text)
    return 0


def _method(args, **forced):
    from . import methods
    from .methods import options as method_options

    if args.method not in methods.REGISTRY:
        methods.get(args.method)  # the unknown-method message
    # `--opt from=DIR`: where a fitted method's tensors come from; values typed and checked against the fields
    options = method_options.parse(methods.REGISTRY[args.method], args.opt, aliases={"from": "source"})
    return methods.get(args.method, args.budget, **{**options, **forced})


def cmd_fit(args) -> int:
    import time

    from .eval.perplexity import perplexity
    from .models import load_model

    if args.budget is not None and not 0 < args.budget <= 1:
        raise UsageError(f"--budget must be in (0, 1], got {args.budget}")
    from . import methods

    fittable = sorted(n for n, cls in methods.REGISTRY.items() if hasattr(cls, "save"))
    if args.method not in fittable:
        what = "has nothing to fit" if args.method in methods.REGISTRY else "is not a method"
        raise UsageError(f"method {args.method!r} {what}; fittable methods: {', '.join(fittable)}")
    method = _method(args, **({"source": None} if "source" in _fields(method_cls := methods.REGISTRY[args.method])
                              else {}))
    if args.search and not hasattr(method_cls, "search"):
        raise UsageError(f"--search measures rank sensitivity; method {args.method!r} has no rank search")
    out = Path(args.out)
    if out.suffix == ".safetensors":
        raise UsageError(f"--out is a directory (the artefact is written as DIR/<model>.safetensors), got {out}")
    try:
        model, tokenizer = load_model(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from e
    tic = time.perf_counter()
    method.prepare(model, tokenizer)
    if args.search:
        method.search(model, tokenizer)
    seconds = time.perf_counter() - tic
    metrics = {"fit_seconds": round(seconds, 1)}
    if args.eval_chunks:
        from .methods import Full

        def wiki(m) -> float:
            return perplexity(model, tokenizer, m, "wiki", n_chunks=args.eval_chunks, progress=False)["ppl"]

        ppl = {"full": wiki(Full()), f"{method.name}@{method.budget}": wiki(method)}
        if "allocation" in _fields(method_cls):  # feature-axis bases serve every budget: uniform ranks at three
            for budget in (0.75, 0.5, 0.25):
                ppl[f"uniform@{budget}"] = wiki(dataclasses.replace(method, budget=budget, allocation="uniform",
                                                                    key_ranks=None, value_ranks=None))
        metrics["wiki_ppl"] = {k: round(v, 4) for k, v in ppl.items()}
        metrics["wiki_ppl_chunks"] = f"{args.eval_chunks} x 512 tokens, eval split"
    name = args.model if args.model in _bundled() else Path(args.model).name
    path = method.save(out / f"{name}.safetensors", model=model, metrics=metrics)
    print(json.dumps({"artefact": str(path), "record": str(path.with_suffix(".json")), **metrics}, indent=2))
    return 0


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _bundled():
    from .models import BUNDLED

    return BUNDLED


def cmd_bench_decode(args) -> int:
    from . import methods as registry

    contexts = list(args.contexts)  # cliargs.IntList: integers >= 2
    if any(c < 2 for c in contexts):
        raise UsageError(f"--contexts must be token counts >= 2, got {contexts}")
    names = _split(args.methods)  # name or name@key=value;key=value (e.g. pca@keys=pre_rope)
    bad = [n for n in names if n.partition("@")[0] not in registry.REGISTRY]
    if bad or not names:
        raise UsageError(f"unknown method(s) {bad or names}; choose from {', '.join(sorted(registry.REGISTRY))}")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods lists a method twice: {names}")
    if not 0 < args.budget <= 1:
        raise UsageError(f"--budget must be in (0, 1] (fraction of the full cache's bytes), got {args.budget}")
    for what, value in (("--new-tokens", args.new_tokens), ("--repeats", args.repeats)):
        if value < 1:
            raise UsageError(f"{what} must be a positive integer, got {value}")
    built = []
    for spec in names:  # check options before loading the model
        name, _, raw = spec.partition("@")
        options = parse_options([p for p in raw.split(";") if p]) if raw else {}
        try:
            method = registry.get(name, None if name in ("none", "full") else args.budget, **options)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        if raw:
            method.bench_label = spec
        built.append(method)

    from .eval import bench
    from . import models

    try:
        model, tokenizer = models.load_model(args.model)
        for method in built:
            method.check(models.ModelSpec.from_model(model))
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        table = bench.decode_speed(model, tokenizer, built, contexts, budget=args.budget, new_tokens=args.new_tokens,
                                   repeats=args.repeats, progress=not args.no_progress)
    except ValueError as e:  # e.g. a context longer than the corpus' eval split
        raise UsageError(str(e)) from e
    name = args.model if args.model in _bundled() else Path(args.model).name
    csv = bench.results_path(name, args.budget, contexts, args.new_tokens, args.out)
    with atomic.atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    if args.json:
        record = {"conditions": bench.conditions(name), "rows": table.to_dict(orient="records")}
        atomic.write_text(args.json, json.dumps(record, indent=2) + "\n")
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.round(3).to_string(index=False))
    print(f"written: {csv}")
    return 0


def cmd_report(args) -> int:
    from .report import ReportError, build_report, discover_notebooks, repo_root

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    root = repo_root()
    # Quick runs keep their figures apart so they never overwrite the full-mode figures under figures/.
    figures = root / "reports" / "figures-quick" if args.quick else root / "figures"
    if args.only is not None:
        try:
            discover_notebooks(root / "notebooks", args.only)
        except ValueError as e:  # names no notebook
            raise UsageError(str(e)) from e
    try:
        index = build_report(root / "notebooks", root / "reports", quick=args.quick, figures_dir=figures,
                             jobs=args.jobs, only=args.only)
    except ReportError as e:
        print(f"kvlab report: {e}", file=sys.stderr)
        return 1
    print(index)
    return 0


FRACTION = Float(0.0, 1.0, low_open=True)


def _artifacts() -> tuple[str, ...]:
    from .data.fetch import artifact_names

    return artifact_names()


def _method_names() -> list[str]:
    from .methods import REGISTRY

    return sorted(REGISTRY)


def _task_names() -> tuple[str, ...]:
    from .eval.run import allowed_tasks

    return tuple(allowed_tasks())


def _notebook_names() -> list[str]:
    from .report import discover_notebooks, repo_root

    stems = [p.stem for p in discover_notebooks(repo_root() / "notebooks")]
    return stems + [s.split("_", 1)[0] for s in stems]


def cmd_lab(args) -> int:
    from .lab import run

    try:
        return run(args.port, open_browser=not args.no_browser)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlab", description="KV-cache compression laboratory")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and verify the bundled model and data (idempotent)")
    p.add_argument("names", nargs="*", type=Names(_artifacts, "artifact", many=False),
                   help="artifacts to fetch (default: smollm2 tasks text longctx)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("info", help="print a model's attention geometry (ModelSpec)")
    p.add_argument("--model", default="smollm2", type=Model())
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="evaluate a method: zero-shot tasks, long-context tasks, perplexity, bytes")
    p.set_defaults(example=["--ppl", "wiki", "--limit", "1"])  # a valid minimal command (tests/test_cli_matrix.py)
    p.add_argument("--model", default="smollm2", type=Model())
    p.add_argument("--method", default="full", type=Names(_method_names, "method", many=False),
                   help="none (plain HF model), full (kvlab cache at 100%%), ...")
    p.add_argument("--budget", type=FRACTION, default=None, help="fraction of the full cache's bytes kept, in (0, 1]")
    p.add_argument("--opt", action="append", default=[], type=Options(), metavar="KEY=VALUE",
                   help="method option (repeatable)")
    p.add_argument("--tasks", type=Names(_task_names, "task"), help="comma-separated: piqa,winogrande,...,needle,longqa,continuation")
    p.add_argument("--ppl", type=Names(lambda: ("wiki", "c4"), "corpus"), help="comma-separated corpora: wiki,c4")
    p.add_argument("--limit", type=Int(1), help="items per task / perplexity chunks (seeded subset)")
    p.add_argument("--context-len", type=Int(16, 1 << 20, example=512), default=2048,
                   help="tokens of context for needle/longqa/continuation (continuation scores the next 256)")
    p.add_argument("--protocol", choices=("throughout", "context"), default=None,
                   help="perplexity/zero-shot protocol: compressed attention throughout, or compress the context then "
                        "continue (default: the method's first supported; token eviction supports only context)")
    p.add_argument("--seed", type=Int(0, 2**32 - 1), default=0)
    p.add_argument("--fewshot", type=Int(0, 64), default=0,
                   help="solved examples before each zero-shot item (drawn from validation items not evaluated)")
    p.add_argument("--json", type=OutFile(), help="also write the result JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fit", help="fit a method (PCA bases, MatryoshkaKV, KV-CAR, reuse, Attention-Gate) and save it as safetensors + JSON")
    p.add_argument("--model", default="smollm2", type=Model())
    p.add_argument("--method", required=True, type=Names(_method_names, "method", many=False, example="pca"),
                   help="a method with save(); a wrong name lists them")
    p.add_argument("--budget", type=FRACTION, default=None, help="the method's budget (ranks for schedule=fixed)")
    p.add_argument("--opt", action="append", default=[], type=Options(), metavar="KEY=VALUE",
                   help="method option (repeatable)")
    p.add_argument("--search", action="store_true", help="also measure the rank sensitivity for allocation=searched")
    p.add_argument("--eval-chunks", type=Int(0, 10_000), default=8,
                   help="wiki eval chunks for the record's perplexities (0: none)")
    p.add_argument("--out", required=True, type=OutDir(forbid_suffix=".safetensors"),
                   help="directory; writes DIR/<model>.safetensors and DIR/<model>.json")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("bench", help="benchmarks (decode: CPU decode speed of each method's cache)")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("decode", help="tokens/s of greedy decoding after a prefill, ratio to 'none', bytes bound")
    p.add_argument("--model", default="smollm2", type=Model())
    p.add_argument("--contexts", default="512,4096", type=IntList(2, 1 << 20),
                   help="comma-separated context lengths (tokens of wiki text)")
    p.add_argument("--methods", default="none,full,streaming,pca",
                   type=Names(_method_names, "method", name_of=lambda item: item.partition("@")[0]),
                   help="comma-separated methods, each name or name@key=value;key=value (e.g. pca@keys=pre_rope); "
                        "'none' (the plain model, every ratio's baseline) is added if missing")
    p.add_argument("--budget", type=FRACTION, default=0.5, help="budget of the compressing methods, in (0, 1]")
    p.add_argument("--new-tokens", type=Int(1, 1 << 16), default=32, help="tokens decoded (timed) per run")
    p.add_argument("--repeats", type=Int(1, 1000), default=3, help="runs per method, interleaved; medians are reported")
    p.add_argument("--out", default=None, type=OutDir(), help="folder of the CSV (default data/results/decode/)")
    p.add_argument("--json", type=OutFile(), help="also write the rows and the conditions here")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_bench_decode)

    p = sub.add_parser("report", help="execute every notebook and write reports/index.html")
    p.add_argument("--quick", action="store_true", help="notebooks in QUICK mode")
    p.add_argument("--jobs", type=Int(1, 256), default=None,
                   help="notebooks run at a time, each kernel with cpu_count // jobs threads (default: min(2, cpu count))")
    p.add_argument("--only", default=None, metavar="NAMES", type=Names(_notebook_names, "notebook"),
                   help="comma-separated notebooks to run, by stem or number, e.g. 01,03_layer_similarity_reuse")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("lab", help="set up if needed (kvlab kernel, jupytext viewer), then JupyterLab in notebooks/")
    p.add_argument("--port", type=Int(1, 65535), default=8888, help="a busy port is replaced by a free one (and named)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.set_defaults(func=cmd_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: exit 2 with its message on bad usage (0 for --help)
        if e.code == 2:
            return 2
        raise
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # the Python API raises ValueError / FileNotFoundError with messages that say what is allowed: exit 2
        command = " ".join(filter(None, (args.command, getattr(args, "bench", None))))
        print(f"kvlab {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
