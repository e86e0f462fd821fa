"""The schema's building blocks: a recipe key (`Field`), a validated recipe (`Config`), a payload (`Tensors`).

This module imports nothing of pfl but its error types, so that the methods (which declare their own keys)
and the recipe reader (which needs the methods' keys) can both import it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pfl.errors import ConfigError

# What travels between clients and server and what a state file holds: named tensors.
Tensors = dict[str, torch.Tensor]

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fmnist": 10, "bbc-news": 5, "agnews": 4}
IMAGE_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "fmnist": (1, 28, 28)}
# data sets of token ids (N, max_len) rather than images (pfl.data.text)
TEXT_DATASETS = ("bbc-news", "agnews", "synthetic_text")


class FrozenTable(dict):
    """A read-only dict: the value of a table setting in a method's frozen `Settings` (a recipe's
    `Config` holds plain dicts). Hashable, so the `Settings` stays hashable; equal to a plain dict with the
    same items; pickles and copies as itself."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a recipe table is read-only")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (dict(self),)


TABLE_KINDS = ("table[int]",)  # the kinds whose value is a TOML table (one key, not flattened into dotted keys)


@dataclass(frozen=True)
class Field:
    """One recipe key: its type ('int', 'float', 'str', 'bool', 'list[str]', 'list[int]', or 'table[int]':
    a table of names to integers, possibly empty), default, an optional check returning an error text (None
    when fine; a table's check gets the whole table, e.g. to check its names), and a one-line help. `low` and
    `high` bound a number, or every value of a table."""

    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low instead of >= low
    high_open: bool = False  # True: value must be < high instead of <= high
    check: Callable[[Any], str | None] | None = None
    named: Mapping[str, Any] | None = None  # names that stand for a value (a zoo name for its list of models)

    def describe(self) -> str:
        if self.named:
            return f"a list of strings or one of {', '.join(self.named)}"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        bounds = []
        if self.low is not None:
            bounds.append(("> " if self.low_open else ">= ") + _fmt(self.low))
        if self.high is not None:
            bounds.append(("< " if self.high_open else "<= ") + _fmt(self.high))
        what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "list[str]": "a list of strings", "list[int]": "a list of integers",
                "table[int]": "a table of names to integers"}[self.kind]
        return what + (" " + " and ".join(bounds) if bounds else "")

    def coerce(self, key: str, value: Any) -> Any:
        def bad(reason: str | None = None) -> ConfigError:
            got = reason or f"got {value!r}"
            return ConfigError(f"recipe key '{key}': must be {self.describe()}, {got}")

        if self.named and isinstance(value, str):
            if value not in self.named:
                raise bad()
            value = list(self.named[value])
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad()
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        elif self.kind == "str":
            if not isinstance(value, str):
                raise bad()
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise bad()
        elif self.kind in ("list[str]", "list[int]"):
            item = str if self.kind == "list[str]" else int
            if not isinstance(value, list) or not value or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value
            ):
                raise bad()
        elif self.kind == "table[int]":
            return self._coerce_table(value, bad)
        if self.choices is not None:
            items = value if isinstance(value, list) else [value]
            for v in items:
                if v not in self.choices:
                    raise bad()
        if self._out_of_bounds(value):
            raise bad()
        if self.check is not None:
            reason = self.check(value)
            if reason:
                raise bad(reason)
        return value

    def _out_of_bounds(self, x: float) -> bool:
        return ((self.low is not None and (x <= self.low if self.low_open else x < self.low))
                or (self.high is not None and (x >= self.high if self.high_open else x > self.high)))

    def _coerce_table(self, value: Any, bad: Callable[..., ConfigError]) -> dict[str, int]:
        """A 'table[int]' value: a plain dict in the given order, every value an integer within the bounds."""
        if not isinstance(value, Mapping):
            raise bad()
        table = {}
        for name, v in value.items():
            if not isinstance(name, str):
                raise bad(f"got the name {name!r}")
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or self._out_of_bounds(v):
                raise bad(f"got {name} = {v!r}")
            table[name] = v
        if self.check is not None:
            reason = self.check(table)
            if reason:
                raise bad(reason)
        return table


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)



class Config:
    """A validated recipe: flat dotted keys; attribute access for top-level keys."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def table(self, prefix: str) -> dict[str, Any]:
        """The settings under `prefix.` (e.g. a method's own settings) without the prefix."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self._values.items() if k.startswith(p)}

    @property
    def num_classes(self) -> int:
        if self.dataset in ("synthetic", "synthetic_text"):
            return self._values["synthetic.num_classes"]
        return NUM_CLASSES[self.dataset]

    @property
    def is_text(self) -> bool:
        """Whether the data set is text (token ids of length max_len) rather than images."""
        return self.dataset in TEXT_DATASETS

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W), or (max_len,) token ids for text."""
        if self.is_text:
            return (self._values["max_len"],)
        if self.dataset == "synthetic":
            return tuple(self._values["synthetic.image_shape"])
        return IMAGE_SHAPES[self.dataset]

    def as_flat(self) -> dict[str, Any]:
        return dict(self._values)

    def as_nested(self) -> dict[str, Any]:
        """Nested form for writing TOML: dotted keys become tables."""
        out: dict[str, Any] = {}
        for key, value in self._values.items():
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return out
