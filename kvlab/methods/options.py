"""Method options: one place that parses and validates them against each method's declared dataclass fields.

Every ``init`` field shown in ``repr`` of a method dataclass is an option. Its type comes from the annotation
(``int``, ``float``, ``bool``, ``str``, ``list``, ``dict`` and unions with ``None`` such as ``int | float | None``);
its range and allowed values are declared once, either next to the field::

    sinks: int = option(4, low=0)                        # dataclasses.field(default=4, metadata={"kvlab": Rule(low=0)})

or in a per-class table that subclasses inherit (merged along the MRO, the most derived class wins)::

    OPTION_RULES: ClassVar[dict] = {"pooling": Rule(choices=("max", "avg"))}

:func:`check` runs from ``Method.__post_init__`` before a method's own checks, so a wrong type never reaches a
comparison; :func:`parse` turns ``--opt key=value`` strings into typed values for a given method class. Both raise
ValueError (FileNotFoundError for a missing artefact) naming the option, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from pathlib import Path

KEY = "kvlab"  # dataclasses.field(metadata={KEY: Rule(...)})


@dataclass(frozen=True)
class Rule:
    """What an option allows beyond its type: a range ``[low, high]`` (ends open with ``low_open`` / ``high_open``),
    a tuple of ``choices``, or ``artefact=True``: a path to an existing artefact (file or folder) unless the value is
    one of ``special`` (e.g. "shipped", None)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    artefact: bool = False
    special: tuple = ()
    help: str = ""

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if self.artefact:
            parts.append("a path to an existing artefact" + (f" or {', '.join(map(repr, self.special))}"
                                                             if self.special else ""))
        return " and ".join(parts)


def option(default=dataclasses.MISSING, *, low=None, high=None, low_open=False, high_open=False, choices=None,
           artefact=False, special=(), help="", **field_kwargs):
    """``dataclasses.field`` with the option's rule in its metadata."""
    rule = Rule(low, high, low_open, high_open, tuple(choices) if choices is not None else None, artefact,
                tuple(special), help)
    return dataclasses.field(default=default, metadata={KEY: rule}, **field_kwargs)


def option_fields(cls) -> dict[str, dataclasses.Field]:
    """name -> field of every user-facing option of method class ``cls`` (init fields shown in repr)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.repr}


@functools.cache
def rules(cls) -> dict[str, Rule]:
    """name -> Rule of ``cls``'s options: OPTION_RULES tables along the MRO, then field metadata."""
    out: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get("OPTION_RULES", {}) or {})
    fields = option_fields(cls)
    for name, f in fields.items():
        if KEY in f.metadata:
            out[name] = f.metadata[KEY]
    return {k: v for k, v in out.items() if k in fields}


@functools.cache
def types_of(cls) -> dict[str, tuple[type, ...]]:
    """name -> the types an option's annotation allows (NoneType included for ``X | None``)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name in option_fields(cls):
        hint = hints.get(name, object)
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        out[name] = tuple(typing.get_origin(a) or a for a in args)
    return out


_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a JSON list",
          tuple: "a JSON list", dict: "a JSON object", type(None): "null"}


def describe(allowed: tuple[type, ...], rule: Rule | None = None) -> str:
    what = " or ".join(_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    extra = rule.describe() if rule else ""
    return f"{what} ({extra})" if extra else what


def _method_name(cls) -> str:
    return getattr(cls, "name", "") or cls.__name__


def _fits(value, t: type) -> bool:
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if t is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if t in (list, tuple):  # per-head ranks may also come as tensors or arrays
        return isinstance(value, (list, tuple)) or hasattr(value, "tolist")
    if t is dict:
        return isinstance(value, typing.Mapping)
    if t is str:
        return isinstance(value, (str, os.PathLike))
    if t is object or not isinstance(t, type):
        return True
    return isinstance(value, t)


def check_value(cls, name: str, value, allowed: tuple[type, ...] | None = None, rule: Rule | None = None) -> None:
    """Raise ValueError (FileNotFoundError for a missing artefact) unless ``value`` is allowed for option ``name``."""
    allowed = allowed if allowed is not None else types_of(cls)[name]
    rule = rule if rule is not None else rules(cls).get(name)
    where = f"option of method {_method_name(cls)!r}"
    if not any(_fits(value, t) for t in allowed):
        raise ValueError(f"{name} takes {describe(allowed, rule)}, got {value!r} ({type(value).__name__}; {where})")
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number ({describe(allowed, rule)}), got {value!r} ({where})")
    if rule is None or value is None or (isinstance(value, str) and value in rule.special):
        return
    if rule.choices is not None and value not in rule.choices:
        raise ValueError(f"{name} must be {rule.describe()}, got {value!r} ({where})")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        too_low = rule.low is not None and (v <= rule.low if rule.low_open else v < rule.low)
        too_high = rule.high is not None and (v >= rule.high if rule.high_open else v > rule.high)
        if too_low or too_high:
            raise ValueError(f"{name} must be {rule.describe()}, got {value!r} ({where})")
    if rule.artefact and isinstance(value, (str, Path)):
        _check_artefact(name, where, Path(value), rule)


def _check_artefact(name: str, where: str, path: Path, rule: Rule) -> None:
    if str(path) == "":
        raise ValueError(f"{name} is empty; give {rule.describe()} ({where})")
    if not path.exists():
        raise FileNotFoundError(f"{name}: no artefact at {path} (allowed: {rule.describe()}; {where})")
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(f"{name}: folder {path} must hold exactly one .safetensors artefact, "
                                    f"found {len(found)} ({where})")
        path = found[0]
    if path.suffix != ".safetensors":
        raise ValueError(f"{name}: {path} is not a .safetensors artefact ({where})")
    from .artefacts import header

    header(path)  # unreadable or corrupt files fail here, before any model is loaded


def check(method) -> None:
    """Validate every option of a method instance (types, then declared ranges and choices)."""
    cls = type(method)
    allowed, declared = types_of(cls), rules(cls)
    for name in option_fields(cls):
        check_value(cls, name, getattr(method, name), allowed[name], declared.get(name))


def _convert(raw: str, t: type):
    """One string -> a value of type ``t``; raises ValueError if it is not one."""
    low = raw.strip().lower()
    if t is type(None):
        if low in ("none", "null"):
            return None
    elif t is bool:
        if low in ("true", "false"):
            return low == "true"
    elif t is int:
        return int(raw.strip())
    elif t is float:
        return float(raw.strip())
    elif t is str:
        if raw != "" and low not in ("none", "null"):
            return raw
    elif t in (list, tuple, dict):
        value = json.loads(raw)
        if isinstance(value, list if t is not dict else dict):
            return value
    raise ValueError(raw)


def parse_value(cls, name: str, raw: str):
    """``raw`` (the text after ``--opt name=``) -> the value option ``name`` of ``cls`` takes, validated."""
    allowed = types_of(cls)[name]
    rule = rules(cls).get(name)
    order = sorted(allowed, key=lambda t: (bool, int, float, type(None), list, tuple, dict, str).index(t)
                   if t in (bool, int, float, type(None), list, tuple, dict, str) else 99)
    for t in order:
        try:
            value = _convert(raw, t)
        except (ValueError, TypeError, OverflowError):
            continue
        check_value(cls, name, value, allowed, rule)
        return value
    if any(t not in _NAMES for t in allowed):  # an annotation we cannot parse from text: JSON, else the string
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    shown = repr(raw) if raw != "" else "an empty value"
    raise ValueError(f"{name} takes {describe(allowed, rule)}, got {shown} (option of method {_method_name(cls)!r})")


def unknown(cls, names) -> None:
    """Raise ValueError listing the options ``names`` that ``cls`` does not have (with a close match if any)."""
    allowed = sorted(set(option_fields(cls)) - {"budget"})
    bad = sorted(set(names) - set(allowed))
    if bad:
        close = [m for b in bad for m in difflib.get_close_matches(b, allowed, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown option(s) {', '.join(bad)} for method {_method_name(cls)!r}{hint}; "
                         f"allowed: {', '.join(allowed) or 'none'}")


def parse(cls, pairs: list[str], aliases: dict[str, str] | None = None) -> dict:
    """``["sinks=8", "from=dir"]`` -> {"sinks": 8, "source": "dir"} for method class ``cls``, every value validated."""
    aliases = aliases or {}
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--opt takes key=value, got {pair!r}")
        key = aliases.get(key, key)
        if key in raw:
            raise ValueError(f"option {key} given twice")
        raw[key] = value
    unknown(cls, raw)
    return {key: parse_value(cls, key, value) for key, value in raw.items()}
