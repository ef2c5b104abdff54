"""Valid ranges of settings, written once beside each field (``TrainConfig``, ``MCSettings``) and checked generically.

A ``Valid`` holds the test and the words a message uses for it, so the library (``center_weight must be in (0, 1]``)
and the CLI (``--center-weight must be in (0, 1]``) say the same thing about the same range.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from mcc_serve.runtime.choices import one_of


@dataclass(frozen=True)
class Valid:
    """What a setting's value must be: ``test(value)`` holds inside the range, ``text`` says it in words."""

    test: Callable[[object], bool]
    text: str
    allowed: Collection[str] | None = None  # a choice among names: the message lists them

    def message(self, name: str, value) -> str:
        """``{name} must be {text}, got {value!r}``: the one line naming a value out of range."""
        if self.allowed is not None:
            return one_of(name, value, self.allowed)
        return f"{name} must be {self.text}, got {value!r}"


def choice(allowed: Collection[str]) -> Valid:
    """One of the names ``allowed`` (a tuple, or a registry dict's keys)."""
    return Valid(lambda value: value in allowed, f"one of {', '.join(allowed)}", allowed)


POSITIVE = Valid(lambda v: v > 0, "> 0")
NON_NEGATIVE = Valid(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Valid(lambda v: v >= 1, ">= 1")
UNIT = Valid(lambda v: 0 < v <= 1, "in (0, 1]")  # a fraction that cannot be 0
OPEN_UNIT = Valid(lambda v: 0 < v < 1, "in (0, 1)")
BELOW_ONE = Valid(lambda v: 0 <= v < 1, "in [0, 1)")  # a rate that cannot be 1
PROBABILITY = Valid(lambda v: 0 <= v <= 1, "in [0, 1]")
