"""Argument kinds of the ``kvlab`` command line: argparse ``type=`` callables that check a value when it is parsed.

Each kind says what it allows (``describe``) and gives a valid ``example`` so that tests can build a command line
from the parser alone (tests/test_cli_matrix.py derives every subcommand and option from ``build_parser()``). A bad
value raises ``argparse.ArgumentTypeError``: argparse prints ``argument --x: <message>`` and exits 2, before any
model is loaded. Give every new option one of these kinds (or argparse ``choices=`` / a flag).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Iterable


class Kind:
    """Base: ``__call__`` turns the text into the value or raises ArgumentTypeError."""

    def describe(self) -> str:
        raise NotImplementedError

    def example(self, tmp: Path) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:  # argparse shows repr(type) in some messages
        return f"{type(self).__name__}({self.describe()})"

    def fail(self, raw: str, why: str = ""):
        shown = repr(raw) if raw != "" else "an empty value"
        raise argparse.ArgumentTypeError(f"{why or 'expected ' + self.describe()}, got {shown}")


class Int(Kind):
    """An integer in [low, high]."""

    def __init__(self, low: int | None = None, high: int | None = 2**31 - 1, example: int | None = None):
        self.low, self.high = low, high
        self._example = example if example is not None else (low if low is not None else 0)

    def describe(self) -> str:
        parts = ["an integer"]
        if self.low is not None:
            parts.append(f">= {self.low}")
        if self.high is not None:
            parts.append(f"<= {self.high}")
        return " ".join([parts[0], " and ".join(parts[1:])]).strip()

    def example(self, tmp: Path) -> str:
        return str(self._example)

    def __call__(self, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            self.fail(raw)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            self.fail(raw)
        return value


class Float(Kind):
    """A finite number in [low, high] (``low_open``: low excluded)."""

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 example: float = 0.5):
        self.low, self.high, self.low_open, self._example = low, high, low_open, example

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"

    def example(self, tmp: Path) -> str:
        return str(self._example)

    def __call__(self, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            self.fail(raw)
        if not math.isfinite(value):
            self.fail(raw)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            self.fail(raw)
        if self.high is not None and value > self.high:
            self.fail(raw)
        return value


class Names(Kind):
    """One name (``many=False``) or a comma-separated list of names from ``choices()`` (called when parsing, so
    importing the CLI stays cheap). The value keeps its text form; commands split it."""

    def __init__(self, choices: Callable[[], Iterable[str]], what: str, many: bool = True, example: str | None = None,
                 name_of: Callable[[str], str] = str.strip):
        """``name_of`` picks the name out of an item (e.g. ``pca@keys=pre_rope`` -> ``pca``)."""
        self.choices, self.what, self.many, self._example, self.name_of = choices, what, many, example, name_of

    def describe(self) -> str:
        return f"{'comma-separated ' if self.many else ''}{self.what} from: {', '.join(self.choices())}"

    def example(self, tmp: Path) -> str:
        return self._example or next(iter(self.choices()))

    def __call__(self, raw: str) -> str:
        items = [x.strip() for x in raw.split(",")] if self.many else [raw.strip()]
        allowed = list(self.choices())
        if not items or any(not x for x in items):
            self.fail(raw, f"expected {self.describe()} (no empty item)")
        bad = [x for x in items if self.name_of(x) not in allowed]
        if bad:
            self.fail(raw, f"unknown {self.what} {', '.join(map(repr, bad))}; choose {self.describe()}")
        if len(set(items)) != len(items):
            self.fail(raw, f"a {self.what} is listed twice")
        return raw.strip() if self.many else items[0]


class Model(Kind):
    """A model: a bundled name, a local Hugging Face folder or a hub id. Checked by ``kvlab.models.resolve_model``
    in the command (it may need the data folder); here only emptiness."""

    def describe(self) -> str:
        from .models import BUNDLED

        return f"a bundled model ({', '.join(BUNDLED)}), a local model folder or a hub id 'org/name'"

    def example(self, tmp: Path) -> str:
        return "smollm2"

    def __call__(self, raw: str) -> str:
        if not raw.strip():
            self.fail(raw)
        return raw


class OutFile(Kind):
    """A file to write (JSON): not a directory, and its parent, if it exists, is a directory."""

    def describe(self) -> str:
        return "a file path to write (not a directory)"

    def example(self, tmp: Path) -> str:
        return str(tmp / "out.json")

    def __call__(self, raw: str) -> str:
        path = Path(raw)
        if not raw.strip() or raw.endswith(("/", "\\")) or path.is_dir():
            self.fail(raw)
        if any(p.exists() and not p.is_dir() for p in path.parents):
            self.fail(raw, f"expected {self.describe()}: a parent of it is a file")
        return raw


class OutDir(Kind):
    """A folder to write into (created if missing): not an existing file, no parent that is a file."""

    def __init__(self, forbid_suffix: str | None = None):
        self.forbid_suffix = forbid_suffix

    def describe(self) -> str:
        return "a folder to write into (not a file)"

    def example(self, tmp: Path) -> str:
        return str(tmp / "out")

    def __call__(self, raw: str) -> str:
        path = Path(raw)
        if not raw.strip() or (path.exists() and not path.is_dir()):
            self.fail(raw)
        if self.forbid_suffix and path.suffix == self.forbid_suffix:
            self.fail(raw, f"expected {self.describe()} (the artefact is written as DIR/<model>{self.forbid_suffix})")
        if any(p.exists() and not p.is_dir() for p in path.parents):
            self.fail(raw, f"expected {self.describe()}: a parent of it is a file")
        return raw


class Options(Kind):
    """``--opt KEY=VALUE``: the pair's shape here; the value is typed and checked against the method's fields by
    :func:`kvlab.methods.options.parse` in the command."""

    def describe(self) -> str:
        return "KEY=VALUE (a field of the method)"

    def example(self, tmp: Path) -> str:
        return "sinks=4"

    def __call__(self, raw: str) -> str:
        key, sep, _ = raw.partition("=")
        if not sep or not key.strip():
            self.fail(raw, "--opt takes key=value")
        return raw


class IntList(Kind):
    """Comma-separated integers, each in [low, high]."""

    def __init__(self, low: int | None = None, high: int | None = 2**31 - 1, example: str = "512"):
        self.item, self._example = Int(low, high), example

    def describe(self) -> str:
        return f"comma-separated integers, each {self.item.describe().removeprefix('an integer ')}"

    def example(self, tmp: Path) -> str:
        return self._example

    def __call__(self, raw: str) -> list[int]:
        items = [x.strip() for x in raw.split(",")]
        try:
            return [self.item(x) for x in items]
        except argparse.ArgumentTypeError:
            self.fail(raw)
