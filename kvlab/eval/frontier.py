"""Quality against total bytes for single methods and compositions: the grid, its Pareto frontier, the figure.

Every point is one :func:`kvlab.eval.run.evaluate` of a method on the same items (multiple-choice tasks, few-shot so
the compressed context is long, "context" protocol: prefill the prompt, compress it, score the answers), at the
budget the caches *measured* (``kv_bytes`` summed over every cache of the run, answers included). Average accuracy is
the mean over the tasks that separate: those on which the full model is above chance (a one-sided binomial test at
the n used, :func:`separating_tasks`); a task at chance cannot show a method losing anything, so it is reported but
left out of the average (``average_over``), and :func:`chance_table` marks it.

    grid = run_grid(model, tok, {"h2o": [h2o_at_half, ...], "pca x h2o": [...]}, tasks=("arc_easy", "piqa"))
    front = pareto(grid)                       # points no other point beats in both bytes and accuracy
    fig = plot_frontier(grid, full_acc=...)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .run import evaluate


def run_grid(model, tokenizer, families: dict, *, tasks=("arc_easy", "piqa"), limit: int = 100,
             num_fewshot: int = 5, seed: int = 0, progress: bool = True, average_over=None) -> pd.DataFrame:
    """One row per (family, method): nominal and measured budget, accuracy per task, their mean, seconds.

    ``families`` maps a label ("h2o", "pca x h2o", ...) to the prepared methods to evaluate. ``avg_acc`` is the mean
    over ``average_over`` (default: every task; pass :func:`separating_tasks`' list to average only the tasks the
    full model is above chance on); ``avg_tasks`` names them."""
    average_over = list(tasks) if average_over is None else list(average_over)
    if not average_over or any(t not in tasks for t in average_over):
        raise ValueError(f"average_over must be a non-empty subset of the tasks {list(tasks)}, got {average_over}")
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
        row["avg_acc"] = sum(row[t] for t in average_over) / len(average_over)
        row["avg_tasks"] = ",".join(average_over)
        for key in ("feature_budget", "token_budget"):
            value = getattr(method, key, None) if key != "feature_budget" else getattr(method, "split", None)
            if value is not None:
                row[key] = float(value)
        rows.append(row)
    return pd.DataFrame(rows)


def chance_table(full_result: dict) -> pd.DataFrame:
    """Per zero-shot task of an :func:`evaluate` result of the full model: accuracy, its Wilson 95 % interval,
    chance level, p-value against chance, and ``separates`` (above chance); ``mark`` is "" or "at chance" for tables."""
    rows = []
    for task, r in full_result["tasks"].items():
        if "chance" not in r:
            continue  # long-context tasks and continuation perplexity have no chance level
        rows.append(dict(task=task, n=r["n"], acc=r["acc"], ci_low=r["acc_ci95"][0], ci_high=r["acc_ci95"][1],
                         chance=r["chance"], p_vs_chance=r["p_vs_chance"], separates=bool(r["above_chance"]),
                         mark="" if r["above_chance"] else "at chance"))
    return pd.DataFrame(rows)


def separating_tasks(model, tokenizer, tasks, *, limit: int = 100, num_fewshot: int = 0, seed: int = 0,
                     protocol: str = "context") -> tuple[list[str], pd.DataFrame]:
    """Evaluate the full cache on ``tasks`` at this ``limit``; (tasks above chance, :func:`chance_table`). Raises
    ValueError if none separates (no average could show a method losing anything)."""
    from ..methods import Full

    result = evaluate(model, tokenizer, Full(), tasks=tasks, limit=limit, protocol=protocol, seed=seed,
                      progress=False, num_fewshot=num_fewshot)
    table = chance_table(result)
    above = list(table.loc[table["separates"], "task"])
    if not above:
        raise ValueError(f"the full model is at chance on every task of {list(tasks)} at n={limit}: "
                         f"{table[['task', 'acc', 'chance', 'p_vs_chance']].to_dict(orient='records')}")
    return above, table


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


def _points_used(part: pd.DataFrame, budget: float, tolerance: float) -> pd.DataFrame:
    """The rows of one family (sorted by measured bytes) that :func:`accuracy_at` reads at ``budget``: the point
    evaluated within ``tolerance`` of it, else the two around it; empty if the family does not reach that far."""
    x = np.log(part["budget_measured"].to_numpy())
    target = math.log(budget)
    nearest = int(np.abs(x - target).argmin())
    if abs(x[nearest] - target) <= math.log1p(tolerance):
        return part.iloc[[nearest]]
    if x[0] > target or x[-1] < target:
        return part.iloc[[]]
    upper = int(np.searchsorted(x, target))
    return part.iloc[[max(upper - 1, 0), upper]]


def accuracy_at(grid: pd.DataFrame, family: str, budget: float, *, tolerance: float = 0.1) -> float:
    """Average accuracy of ``family`` at measured budget ``budget``: the point evaluated within ``tolerance``
    (relative) of it, else linear in log bytes between the two points around it; NaN if the family's points do not
    reach that far."""
    part = grid[grid["family"] == family].sort_values("budget_measured")
    if part.empty:
        raise ValueError(f"no family {family!r} in the grid; families: {', '.join(dict.fromkeys(grid['family']))}")
    used = _points_used(part, budget, tolerance)
    if used.empty:
        return float("nan")
    if len(used) == 1:
        return float(used["avg_acc"].iloc[0])
    x = np.log(used["budget_measured"].to_numpy())
    return float(np.interp(math.log(budget), x, used["avg_acc"].to_numpy()))


def compare_at(grid: pd.DataFrame, budget: float, *, full_acc: float, share: float = 0.9,
               composed: str = "composed", tolerance: float = 0.1) -> pd.DataFrame:
    """Every family's average accuracy at measured budget ``budget`` (:func:`accuracy_at`), whether it keeps
    ``share`` of ``full_acc``, and for compositions whether the points read keep one axis whole (``single_axis``:
    rank fraction or token fraction 1, i.e. the search chose a single method). Compositions first. A family whose
    points do not reach that budget gets NaN (it cannot hold that few bytes as evaluated)."""
    rows = []
    for family in dict.fromkeys(grid["family"]):
        part = grid[grid["family"] == family].sort_values("budget_measured")
        acc = accuracy_at(grid, family, budget, tolerance=tolerance)
        is_composed = bool((part["method"] == composed).all())
        used = _points_used(part, budget, tolerance)
        single_axis = bool(is_composed and not used.empty and (
            (used.get("feature_budget", pd.Series(dtype=float)) >= 1 - 1e-9)
            | (used.get("token_budget", pd.Series(dtype=float)) >= 1 - 1e-9)).all())
        rows.append(dict(family=family, composed=is_composed, acc_at_budget=acc,
                         keeps_share=bool(acc >= share * full_acc) if acc == acc else False, single_axis=single_axis,
                         measured_range=f"{part.budget_measured.min():.3f}-{part.budget_measured.max():.3f}"))
    return pd.DataFrame(rows).sort_values(["composed", "acc_at_budget"], ascending=False, ignore_index=True)


def target_met(table: pd.DataFrame, *, n: int | None = None) -> dict:
    """From :func:`compare_at`'s table: the best composition that uses both axes (else the best one), the best single
    method reaching the budget, and whether the composition keeps the share and beats every single method there.
    A composition that keeps one axis whole *is* a single method, so it cannot beat one. With ``n`` (items per task
    mean), the binomial standard error of the difference is given to judge the margin."""
    comps, singles = table[table["composed"]], table[~table["composed"]]
    if comps.empty or singles.empty:
        raise ValueError("the table needs both compositions and single methods")
    both = comps[~comps["single_axis"]].dropna(subset=["acc_at_budget"])
    pool = both if not both.empty else comps
    best = pool.loc[pool["acc_at_budget"].idxmax()]
    reached = singles.dropna(subset=["acc_at_budget"])
    rival = reached.loc[reached["acc_at_budget"].idxmax()] if not reached.empty else None
    margin = float("nan") if rival is None else float(best["acc_at_budget"] - rival["acc_at_budget"])
    out = {"composition": best["family"], "composition_acc": float(best["acc_at_budget"]),
           "single_axis": bool(best["single_axis"]), "keeps_share": bool(best["keeps_share"]),
           "best_single": None if rival is None else rival["family"],
           "best_single_acc": float("nan") if rival is None else float(rival["acc_at_budget"]),
           "margin": margin,
           "beats_every_single": bool(not best["single_axis"] and (rival is None or margin > 0)),
           "singles_not_reaching": list(singles.loc[singles["acc_at_budget"].isna(), "family"])}
    if n:
        p = float(best["acc_at_budget"])
        out["stderr_of_margin"] = math.sqrt(2 * p * (1 - p) / n)
    return out


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
    ax.set_xlabel("KV cache bytes held (% of the full cache, measured; log scale)")
    ax.set_ylabel("average accuracy")
    low, high = 100 * grid["budget_measured"].min(), 100 * grid["budget_measured"].max()
    ticks = [t for t in (3.125, 6.25, 12.5, 25, 50, 100) if low / 1.5 <= t <= high * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.figure.tight_layout()
    return ax.figure
