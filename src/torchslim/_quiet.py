"""Third-party messages that tell a torchslim user nothing they can act on, silenced where torchslim makes the
call that triggers them: each filter names the exact message (and category or logger), never a whole library.

- torch's Adagrad on sparse gradients (recommenders' embedding tables): "Sparse invariant checks are implicitly
  disabled", once per run; torchslim builds those gradients itself, and they hold the invariants.
- torch's ``register_constant`` deprecation for an enum torchao registers (logged when torchao is imported).
- torch's "No CUDA runtime is found" when torch.compile builds CPU kernels (torchslim's int8 runtime is CPU-only).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

SPARSE_INVARIANTS = "Sparse invariant checks are implicitly disabled"
_LOG_MESSAGES = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}


@contextlib.contextmanager
def sparse_invariants_warning_silenced() -> Iterator[None]:
    """Around an optimiser step: drop torch's sparse-invariant UserWarning, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SPARSE_INVARIANTS, category=UserWarning)
        yield


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_torch_compile_logs() -> None:
    """Drop the two torch log lines above (each on its own logger, by its text); idempotent."""
    for name, text in _LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
