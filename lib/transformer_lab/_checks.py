"""Input checks shared by the library's modules: each error says what was expected and what came."""

from __future__ import annotations

import operator


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; a bool, a float or a non-integer is a TypeError."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value
