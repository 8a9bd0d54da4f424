"""Errors that torchslim reports to users.

`InputError` marks bad input (a recipe, a spec, a file, a value): the CLI prints its message on one line and
exits with code 2. Anything else that escapes is an internal failure (exit code 1).
"""


class InputError(ValueError):
    """Bad input from the user; the message names what and where."""


def describe(error: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters of it), for one-line reports."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


class UnsupportedLayerWarning(UserWarning):
    """A layer a method cannot handle was left as it was (it is also listed in the report)."""
