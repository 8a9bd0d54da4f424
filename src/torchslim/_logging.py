"""torchslim's messages go through the ``torchslim`` logger (`logging`); the CLI decides how many are shown.

Library code logs with ``logging.getLogger(__name__)`` (a child of ``torchslim``) and never configures handlers:
a program that imports torchslim keeps control of its own logging. The command line calls `configure_logging`:
``--quiet`` shows warnings only, the default adds progress lines (INFO), ``-v`` adds details (DEBUG).
"""

from __future__ import annotations

import logging
import sys

LOGGER = "torchslim"


class _StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (a test may have replaced it since the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:  # a progress bar may be on screen: tqdm clears it, prints, then redraws it
                tqdm.tqdm.write(self.format(record), file=sys.stderr)
                sys.stderr.flush()
            else:
                print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # logging must never end a run
            self.handleError(record)


def configure_logging(verbose: int = 0, quiet: bool = False) -> logging.Logger:
    """Show the ``torchslim`` logger's messages on stderr as ``torchslim: message`` lines.

    Args:
        verbose: 0 shows progress lines (INFO), 1 or more also details (DEBUG).
        quiet: warnings and errors only (wins over ``verbose``).

    Returns:
        The ``torchslim`` logger.
    """
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)  # main() may run more than once in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("torchslim: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # a root handler set up elsewhere would print every line twice
    return logger


def get_logger(name: str = LOGGER) -> logging.Logger:
    """The logger of torchslim module ``name`` (``__name__``)."""
    return logging.getLogger(name)
