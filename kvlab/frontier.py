"""Quality against total bytes for single methods and compositions: the grid, its Pareto frontier, the figure.

Every point is one :func:`kvlab.eval.run.evaluate` of a method on the same items (multiple-choice tasks, few-shot so
the compressed context is long, "context" protocol: prefill the prompt, compress it, score the answers), at the
budget the caches *measured* (``kv_bytes`` summed over every cache of the run, answers included). Average accuracy is
the mean over tasks.

    grid = run_grid(model, tok, {"h2o": [h2o_at_half, ...], "pca x h2o": [...]}, tasks=("arc_easy", "piqa"))
    front = pareto(grid)                       # points no other point beats in both bytes and accuracy
    fig = plot_frontier(grid, full_acc=...)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .eval.run import evaluate


def run_grid(model, tokenizer, families: dict, *, tasks=("arc_easy", "piqa"), limit: int = 100,
             num_fewshot: int = 5, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """One row per (family, method): nominal and measured budget, accuracy per task, their mean, seconds.

    ``families`` maps a label ("h2o", "pca x h2o", ...) to the prepared methods to evaluate."""
    from tqdm.auto import tqdm

    todo = [(family, method) for family, methods in families.items() for method in methods]
    rows = []
    for family, method in tqdm(todo, desc="grid", disable=not progress):
        result = evaluate(model, tokenizer, method, tasks=tasks, limit=limit, protocol="context", seed=seed,
                          progress=False, num_fewshot=num_fewshot)
        row = dict(family=family, method=method.name, budget_nominal=float(method.budget),
                   budget_measured=result["budget"], seconds=result["seconds"])
        for task in tasks:
            row[task] = result["tasks"][task]["acc"]
            row[f"n_{task}"] = result["tasks"][task]["n"]
        row["avg_acc"] = sum(row[t] for t in tasks) / len(tasks)
        for key in ("feature_budget", "token_budget"):
            value = getattr(method, key, None) if key != "feature_budget" else getattr(method, "split", None)
            if value is not None:
                row[key] = float(value)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto(grid: pd.DataFrame, x: str = "budget_measured", y: str = "avg_acc") -> pd.DataFrame:
    """The rows no other row dominates (fewer or equal bytes and higher or equal accuracy, one strictly)."""
    if grid.empty:
        raise ValueError("the grid is empty")
    keep = []
    for i, row in grid.iterrows():
        dominated = ((grid[x] <= row[x]) & (grid[y] >= row[y]) & ((grid[x] < row[x]) | (grid[y] > row[y]))).any()
        if not dominated:
            keep.append(i)
    return grid.loc[keep].sort_values(x)


def accuracy_at(grid: pd.DataFrame, family: str, budget: float, *, tolerance: float = 0.1) -> float:
    """Average accuracy of ``family`` at measured budget ``budget``: linear in log bytes between the two evaluated
    points around it, or the nearest point if one is within ``tolerance`` (relative) of it; NaN if the family's
    points do not reach that far."""
    part = grid[grid["family"] == family].sort_values("budget_measured")
    x, y = np.log(part["budget_measured"].to_numpy()), part["avg_acc"].to_numpy()
    if not len(x):
        raise ValueError(f"no family {family!r} in the grid; families: {', '.join(dict.fromkeys(grid['family']))}")
    target = math.log(budget)
    nearest = int(np.abs(x - target).argmin())
    if abs(x[nearest] - target) <= math.log1p(tolerance):
        if len(x) == 1 or x[0] > target or x[-1] < target:
            return float(y[nearest])
    if x[0] > target or x[-1] < target:
        return float("nan")
    return float(np.interp(target, x, y))


def compare_at(grid: pd.DataFrame, budget: float, *, full_acc: float, share: float = 0.9,
               composed: str = "composed") -> pd.DataFrame:
    """Every family's average accuracy at measured budget ``budget`` (:func:`accuracy_at`), with whether it keeps
    ``share`` of ``full_acc``; compositions first. A single method whose points do not reach that budget gets NaN
    (it cannot hold that few bytes as evaluated)."""
    rows = []
    for family in dict.fromkeys(grid["family"]):
        part = grid[grid["family"] == family]
        acc = accuracy_at(grid, family, budget)
        rows.append(dict(family=family, composed=bool((part["method"] == composed).all()), acc_at_budget=acc,
                         keeps_share=bool(acc >= share * full_acc) if acc == acc else False,
                         measured_range=f"{part.budget_measured.min():.3f}-{part.budget_measured.max():.3f}"))
    return pd.DataFrame(rows).sort_values(["composed", "acc_at_budget"], ascending=False, ignore_index=True)


def target_met(table: pd.DataFrame) -> dict:
    """From :func:`compare_at`'s table: the best composition, the best single method reaching the budget, and
    whether the composition keeps the share and beats every single method there."""
    comps, singles = table[table["composed"]], table[~table["composed"]]
    if comps.empty or singles.empty:
        raise ValueError("the table needs both compositions and single methods")
    best = comps.loc[comps["acc_at_budget"].idxmax()]
    reached = singles.dropna(subset=["acc_at_budget"])
    rival = reached.loc[reached["acc_at_budget"].idxmax()] if not reached.empty else None
    return {"composition": best["family"], "composition_acc": float(best["acc_at_budget"]),
            "keeps_share": bool(best["keeps_share"]),
            "best_single": None if rival is None else rival["family"],
            "best_single_acc": float("nan") if rival is None else float(rival["acc_at_budget"]),
            "beats_every_single": bool(rival is None or best["acc_at_budget"] > rival["acc_at_budget"]),
            "singles_not_reaching": list(singles.loc[singles["acc_at_budget"].isna(), "family"])}


def plot_frontier(grid: pd.DataFrame, *, full_acc: float, share: float = 0.9, ax=None):
    """Average accuracy vs measured budget (log x), one line per family, compositions drawn bold; the full cache
    and ``share`` of it as horizontal lines. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.8))
    families = list(dict.fromkeys(grid["family"]))
    colours = dict(zip(families, sns.color_palette("colorblind", len(families))))
    for family in families:
        part = grid[grid["family"] == family].sort_values("budget_measured")
        composed = (part["method"] == "composed").all()
        ax.plot(100 * part["budget_measured"], part["avg_acc"], marker="o" if composed else "s",
                lw=2.6 if composed else 1.2, ls="-" if composed else "--", color=colours[family], label=family)
    ax.axhline(full_acc, color="black", lw=1, label=f"full cache ({full_acc:.3f})")
    ax.axhline(share * full_acc, color="grey", lw=1, ls=":", label=f"{share:.0%} of full")
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes held (% of the full cache, measured)")
    ax.set_ylabel("average accuracy")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    return ax.figure
