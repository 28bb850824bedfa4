"""The caps of the constraint language, the kinds of value they count, and its one error."""

from __future__ import annotations

import datetime
from typing import Final

from orchestrator.contracts.errors import StudyError

MAX_EXPRESSION_CHARS: Final = 2_000
MAX_NESTING: Final = 50
MAX_VALUE_SIZE: Final = 100_000
MAX_TOTAL_SIZE: Final = 1_000_000
MAX_INT_DIGITS: Final = 4_000
MAX_INT_BITS: Final = 13_288  # 4,000 decimal digits
MAX_LITERAL_BITS: Final = 1_000  # about 300 decimal digits

SEQUENCES: Final = (str, bytes, bytearray, list, tuple)
TEXTS: Final = (str, bytes, bytearray)
CONTAINERS: Final = (list, tuple, set, frozenset, dict)
NESTED: Final = (*TEXTS, *CONTAINERS)
PLAIN_TYPES: Final = frozenset(
    {
        type(None), bool, int, float, complex, str, bytes, list, tuple,
        datetime.date, datetime.datetime, datetime.time, datetime.timedelta,
    }
)  # fmt: skip
# Python errors a constraint can raise on bad data; wrapped so a bad study never shows a traceback.
WRAPPED: Final = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError,
                  RecursionError)  # fmt: skip


Problem = tuple[str, str]  # (what is wrong, how to fix it)


class ConstraintExpressionError(StudyError):
    """A constraint expression is invalid, refused for safety, or failed on a condition.

    ``str(error)`` says what is wrong (upstream's exact text where upstream has one); ``fix``
    says what to change, or is empty when the message says it already.
    """

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix
