"""Size estimates: upper bounds of what an operation would build, computed without building it."""

from __future__ import annotations

from itertools import compress, repeat
from typing import Any

from orchestrator.study.constraints._limits import CONTAINERS, MAX_VALUE_SIZE, NESTED, TEXTS


def weight(value: Any, limit: int) -> int:
    """Items and characters reachable from ``value``, counted through nesting, up to ``limit``.

    A repeat or concatenation costs (and later comparisons walk) this many items, so
    ``[[0] * 1000] * 1000`` weighs 1,001,000 although the outer list holds 1,000 references.
    Only nested members are pushed, selected at C speed, so a flat list costs one ``len``.
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, TEXTS):
            total += len(item)
        elif isinstance(item, CONTAINERS):
            total += len(item)
            if total <= limit:
                for members in (item.keys(), item.values()) if isinstance(item, dict) else (item,):
                    stack.extend(compress(members, map(isinstance, members, repeat(NESTED))))
    return total


def str_size(value: Any) -> int:
    """Upper bound of ``len(str(value))``."""
    return len(value) if isinstance(value, str) else repr_size(value, MAX_VALUE_SIZE)


def repr_size(value: Any, limit: int) -> int:
    """Upper bound of ``len(repr(value))`` for plain data, stopping once over ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        kind = type(item)
        if kind in (str, bytes, bytearray):
            total += len(repr(item)) if len(item) <= limit else len(item)
        elif kind is bool or item is None:
            total += 5
        elif kind is int:
            total += item.bit_length() * 30103 // 100000 + 1 + (item < 0)  # digits, sign
        elif kind is float:
            total += 32
        elif kind in (list, tuple, set, frozenset):
            total += 12 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif kind is dict:
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        else:  # dates and other objects: ask them (their repr is theirs, not the expression's)
            total += len(repr(item))
    return total


def format_size(template: str | bytes | bytearray, args: Any) -> int:
    """Upper bound of the length of ``template % args``, parsed the way CPython parses it.

    Widths and precisions (including ``*`` ones taken from ``args``) count in full, since
    ``'%0100000000d' % 1`` is a 100 MB string from a 14-character template.
    """
    text = template if isinstance(template, str) else bytes(template).decode("latin-1")
    positional = list(args) if isinstance(args, tuple) else [args]
    total, index, n = len(text), 0, len(text)
    i = text.find("%")
    while i != -1 and total <= MAX_VALUE_SIZE:
        i += 1
        key: str | None = None
        if i < n and text[i] == "(":
            depth, start = 1, i + 1
            while i + 1 < n and depth:
                i += 1
                depth += {"(": 1, ")": -1}.get(text[i], 0)
            key, i = text[start:i], i + 1
        while i < n and text[i] in "-+ #0":
            i += 1
        width, i, index = _format_number(text, i, positional, index)
        precision = 0
        if i < n and text[i] == ".":
            precision, i, index = _format_number(text, i + 1, positional, index)
        while i < n and text[i] in "hlL":
            i += 1
        if i >= n:
            break  # Python raises "incomplete format"
        conversion, i = text[i], i + 1
        if conversion == "%":
            total += width + 1
        else:
            try:
                if key is None:
                    arg = positional[index]
                    index += 1
                else:
                    arg = args[key if isinstance(template, str) else key.encode("latin-1")]
            except (LookupError, TypeError):
                break  # Python raises its own error for the missing argument
            total += width + precision + _conversion_size(conversion, arg)
        i = text.find("%", i)
    return total


def _format_number(text: str, i: int, positional: list[Any], index: int) -> tuple[int, int, int]:
    """A width or precision at ``text[i]``: digits, or ``*`` taking the next argument."""
    if i < len(text) and text[i] == "*":
        star = positional[index] if index < len(positional) else 0
        return (abs(star) if isinstance(star, int) else 0), i + 1, index + 1
    end = i
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return int(text[i:end] or 0) if end - i <= 18 else 10**18, end, index


def _conversion_size(conversion: str, arg: Any) -> int:
    """Upper bound of one converted argument before padding."""
    if conversion in "sb" and isinstance(arg, TEXTS):
        return len(arg)
    if conversion in "srb":
        return repr_size(arg, MAX_VALUE_SIZE)
    if conversion == "a":
        return 10 * repr_size(arg, MAX_VALUE_SIZE)  # \U0001f600 escapes: 10 per character
    if conversion in "diouxX" and isinstance(arg, int):
        return arg.bit_length() // 3 + 4  # octal is the longest base; sign and 0o prefix
    if conversion in "diouxXeEfFgG":
        return 400  # a float: 309 integer digits at most (1.8e308), plus sign and point
    return 1  # %c, or a bad conversion Python refuses
