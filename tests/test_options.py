"""kvlab.methods.options: one parser/validator of method options, from each method's declared fields."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab import methods
from kvlab.methods import options
from kvlab.methods.base import Method
from kvlab.methods.options import Rule, option

ALLOWED_ERRORS = (ValueError, FileNotFoundError)
FIELDS = [(name, field) for name, cls in sorted(methods.REGISTRY.items()) for field in options.option_fields(cls)]  # names


@dataclasses.dataclass
class Toy(Method):
    """A method declared as a new one would be: rules on fields and in a table."""

    name: ClassVar[str] = "toy"
    OPTION_RULES: ClassVar[dict] = {"mode": Rule(choices=("a", "b"))}
    budget: float = 0.5
    rank: int = option(8, low=1, high=64)
    ratio: float | None = option(None, low=0.0, high=1.0, low_open=True)
    mode: str = "a"
    layers: list | None = None


def test_types_come_from_the_annotations():
    assert options.types_of(Toy) == {"budget": (float,), "rank": (int,), "ratio": (float, type(None)),
                                     "mode": (str,), "layers": (list, type(None))}
    assert set(options.rules(Toy)) == {"rank", "ratio", "mode", "source"} - {"source"}


@pytest.mark.parametrize("pairs, expected", [
    (["rank=16"], {"rank": 16}),
    (["ratio=null"], {"ratio": None}),
    (["ratio=0.25", "mode=b"], {"ratio": 0.25, "mode": "b"}),
    (["layers=[0, 2]"], {"layers": [0, 2]}),
    (["layers=none"], {"layers": None}),
])
def test_parse_typed_values(pairs, expected):
    assert options.parse(Toy, pairs) == expected


@pytest.mark.parametrize("pairs, message", [
    (["rank=abc"], "rank takes an integer (>= 1 and <= 64), got 'abc' (option of method 'toy')"),
    (["rank=0"], "rank must be >= 1 and <= 64, got 0"),
    (["rank=65"], "rank must be >= 1 and <= 64, got 65"),
    (["rank=1.5"], "rank takes an integer"),
    (["rank="], "rank takes an integer (>= 1 and <= 64), got an empty value"),
    (["ratio=0"], "ratio must be > 0 and <= 1, got 0.0"),
    (["ratio=nan"], "ratio must be a finite number"),
    (["ratio=1e400"], "ratio must be a finite number"),
    (["mode=c"], "mode must be one of 'a', 'b', got 'c'"),
    (["layers=[1"], "layers takes a JSON list or null"),
    (["rnak=3"], "unknown option(s) rnak for method 'toy' (did you mean rank?)"),
    (["rank=3", "rank=4"], "option rank given twice"),
    (["rank"], "--opt takes key=value"),
])
def test_parse_errors_name_option_value_and_what_is_allowed(pairs, message):
    with pytest.raises(ValueError) as e:
        options.parse(Toy, pairs)
    assert message in str(e.value)


def test_python_api_checks_the_same_rules():
    with pytest.raises(ValueError, match=r"rank must be >= 1 and <= 64, got 0"):
        Toy(rank=0)
    with pytest.raises(ValueError, match="rank takes an integer"):
        Toy(rank="8")
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b'"):
        Toy(mode="z")
    with pytest.raises(FileNotFoundError, match="no artefact at /nonexistent"):
        methods.get("pca", source="/nonexistent")
    with pytest.raises(ValueError, match="sinks takes an integer"):
        methods.get("pca", sinks="abc")
    assert Toy(rank=64, ratio=1.0).rank == 64


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), st.text(max_size=30))
def test_any_text_parses_or_raises_a_clear_error(field, raw):
    """Whatever a user types after --opt KEY=, the parser returns a valid value or raises ValueError/FileNotFound."""
    name, f = field
    cls = methods.REGISTRY[name]
    try:
        value = options.parse_value(cls, f, raw)
    except ALLOWED_ERRORS as e:
        assert f in str(e)
        return
    options.check_value(cls, f, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                                          st.booleans(), st.none(), st.text(max_size=10),
                                          st.lists(st.integers(-3, 70), max_size=4)))
def test_building_a_method_raises_only_value_errors(field, value):
    """Any value for any option through the Python API: the method is built, or ValueError / FileNotFoundError."""
    name, f = field
    try:
        methods.get(name, **({} if f == "budget" else {f: value}),
                    **({"budget": value} if f == "budget" else {}))
    except ALLOWED_ERRORS:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.floats(0.001, 1.0), st.sampled_from(["a", "b"]))
def test_round_trip(rank, ratio, mode):
    parsed = options.parse(Toy, [f"rank={rank}", f"ratio={ratio!r}", f"mode={mode}"])
    assert parsed == {"rank": rank, "ratio": ratio, "mode": mode} and math.isfinite(parsed["ratio"])
    assert Toy(**parsed).rank == rank
