"""Errors that torchslim reports to users.

`InputError` marks bad input (a recipe, a spec, a file, a value): the CLI prints its message on one line and
exits with code 2. Anything else that escapes is an internal failure (exit code 1).
"""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """Bad input from the user; the message names what and where."""


class RecipeError(InputError):
    """Every problem found in one recipe, reported together.

    One problem reads as one line, ``SOURCE: field: message``; several read as a first line ``N problems in
    SOURCE:`` and one indented line per problem, each naming the step and the field.

    Attributes:
        source: the recipe file (or "demo", "--set").
        problems: one ``field: message`` text per problem, in the recipe's order.
    """

    MAX_LISTED = 20  # a recipe of 10,000 broken steps must not print 10,000 lines

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, list(problems)
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}")
            return
        listed = [f"  {problem}" for problem in self.problems[:self.MAX_LISTED]]
        if len(self.problems) > self.MAX_LISTED:
            listed.append(f"  ... and {len(self.problems) - self.MAX_LISTED} more")
        super().__init__("\n".join([f"{len(self.problems)} problems in {source}:", *listed]))


class ArtifactError(InputError):
    """A saved model (an output folder or one of its files) that cannot be used as it is: not one, another
    version, truncated, corrupted, or changed since torchslim wrote it. The message names the file."""


def shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to at most about ``limit`` characters, for messages that echo a user's value.

    A recipe value can be arbitrarily large (a megabyte string, a list of a million items, a 4,000-digit int):
    a message must never print it whole.

    Example:
        >>> shorten("x" * 1000, 20)
        "'xxxxxxxxxxxxx... (1002 characters)"
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 1000:
        return f"<{type(value).__name__} of {len(value)} items>"  # repr of a huge container is itself costly
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond Python's repr digit limit, or a self-nesting list
        return f"<{type(value).__name__} of {value.bit_length()} bits>" if isinstance(value, int) else \
            f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 6]}... ({len(text)} characters)"


def key_text(key: Any, limit: int = 60) -> str:
    """A mapping key as a message names it: a short string as it is, anything else through `shorten`."""
    return key if isinstance(key, str) and len(key) <= limit and key.isprintable() else shorten(key, limit)


def describe(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it), for one-line reports."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


class UnsupportedLayerWarning(UserWarning):
    """A layer a method cannot handle was left as it was (it is also listed in the report)."""
