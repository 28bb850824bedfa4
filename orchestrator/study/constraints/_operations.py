"""Bounded operations: arithmetic, calls and attributes that size a value before building it."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any, Final

from orchestrator.study.constraints._limits import (
    MAX_INT_BITS,
    MAX_INT_DIGITS,
    MAX_TOTAL_SIZE,
    MAX_VALUE_SIZE,
    PLAIN_TYPES,
    SEQUENCES,
    TEXTS,
    ConstraintExpressionError,
)
from orchestrator.study.constraints._sizes import format_size, str_size, weight

_SMALLER: Final = "compare lengths or counts instead of building large values"


class Budget:
    """Items one evaluation may still build; shared by every operation of that evaluation."""

    __slots__ = ("remaining",)

    def __init__(self) -> None:
        self.remaining = MAX_TOTAL_SIZE

    def charge(self, size: int, what: str) -> None:
        """Refuse a value over the per-value cap, or one that exhausts the evaluation's total."""
        if size > MAX_VALUE_SIZE:
            raise ConstraintExpressionError(
                f"{what} would build a value of at least {size:,} items or characters, which "
                f"is too large for a constraint expression (the limit is {MAX_VALUE_SIZE:,})",
                _SMALLER,
            )
        self.remaining -= size
        if self.remaining < 0:
            raise ConstraintExpressionError(
                f"constraint expression builds more than {MAX_TOTAL_SIZE:,} items in total, "
                "which is too large",
                _SMALLER,
            )


def _too_large_int(what: str, bits: int) -> ConstraintExpressionError:
    return ConstraintExpressionError(
        f"{what} would give an integer of about {bits:,} bits, which is too large for a "
        f"constraint expression (the limit is {MAX_INT_BITS:,} bits, {MAX_INT_DIGITS:,} digits)",
        "compare smaller numbers",
    )


def _add(left: Any, right: Any, budget: Budget) -> Any:
    if isinstance(left, SEQUENCES) and isinstance(right, SEQUENCES):
        size = weight(left, MAX_VALUE_SIZE) + weight(right, MAX_VALUE_SIZE)
        budget.charge(size, f"{type(left).__name__} + {type(right).__name__}")
    return left + right


def _sub(left: Any, right: Any, budget: Budget) -> Any:
    return left - right


def _div(left: Any, right: Any, budget: Budget) -> Any:
    return left / right


def _mul(left: Any, right: Any, budget: Budget) -> Any:
    """Products are sized before they are computed: repeats by item count, ints by bits."""
    if isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
        if bits > MAX_INT_BITS:
            raise _too_large_int("int * int", bits)
    elif isinstance(left, SEQUENCES):
        _charge_repeat(left, right, budget)
    elif isinstance(right, SEQUENCES):
        _charge_repeat(right, left, budget)
    return left * right


def _charge_repeat(sequence: Any, count: Any, budget: Budget) -> None:
    try:
        times = operator.index(count)
    except TypeError:
        return  # not a repeat; Python raises its own TypeError
    if times > 0:
        size = weight(sequence, MAX_VALUE_SIZE) * times
        budget.charge(size, f"{type(sequence).__name__} * {times}")


def _mod(left: Any, right: Any, budget: Budget) -> Any:
    if isinstance(left, TEXTS):
        budget.charge(format_size(left, right), f"'%' formatting of a {type(left).__name__}")
    return left % right


BINARY_OPERATIONS: Final[dict[type[ast.operator], Callable[[Any, Any, Budget], Any]]] = {
    ast.Add: _add, ast.Sub: _sub, ast.Mult: _mul, ast.Div: _div, ast.Mod: _mod,
}  # fmt: skip


def _call_len(args: list[Any], budget: Budget) -> Any:
    return len(*args)


def _call_bool(args: list[Any], budget: Budget) -> Any:
    return bool(*args)


def _call_float(args: list[Any], budget: Budget) -> Any:
    return float(*args)


def _call_int(args: list[Any], budget: Budget) -> Any:
    """``int(text)`` is quadratic in the text's length, so the text is capped first."""
    if args and isinstance(args[0], TEXTS) and len(args[0]) > MAX_INT_DIGITS:
        raise ConstraintExpressionError(
            f"int() of a {len(args[0]):,}-character text is too large for a constraint "
            f"expression (the limit is {MAX_INT_DIGITS:,} characters)",
            "compare the text itself, or convert a shorter one",
        )
    result = int(*args)
    if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
        raise _too_large_int("int()", result.bit_length())
    return result


def _call_str(args: list[Any], budget: Budget) -> Any:
    if len(args) == 1:
        budget.charge(str_size(args[0]), "str()")
    elif args and isinstance(args[0], TEXTS):  # decoding: at most 4 characters a byte
        budget.charge(4 * len(args[0]), "str()")
    return str(*args)


CALLS: Final[dict[str, Callable[[list[Any], Budget], Any]]] = {
    "len": _call_len, "int": _call_int, "float": _call_float, "str": _call_str,
    "bool": _call_bool,
}  # fmt: skip


def attribute(base: Any, attr: str) -> Any:
    """Mappings answer ``.get(attr)`` (upstream); plain data only non-callable attributes."""
    if isinstance(base, Mapping):
        return base.get(attr)
    kind = type(base).__name__
    if type(base) not in PLAIN_TYPES:
        raise ConstraintExpressionError(
            f"attribute '{attr}' of a value of type {kind} is not allowed in constraint "
            "expressions",
            "read attributes of mappings (factors.x, blocks.x), numbers and dates only",
        )
    value = getattr(base, attr)
    if callable(value):
        raise ConstraintExpressionError(
            f"attribute '{attr}' of a value of type {kind} is a method, and constraint "
            "expressions cannot call methods",
            "compare the value itself, or use len, int, float, str or bool",
        )
    return value
