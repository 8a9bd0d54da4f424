"""Third-party chatter filtered at the source (and only it), and the progress bars' on/off rules."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torchslim import _progress
from torchslim._quiet import quiet_torch_compile_logs, sparse_invariants_warning_silenced


def test_image_preprocessing_of_a_read_only_array_warns_nothing():
    from torchslim.zoo.preprocess import ImagePreprocess

    image = np.full((20, 24, 3), 255, dtype=np.uint8)
    image.setflags(write=False)  # as np.asarray(PIL image) gives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = ImagePreprocess(size=16, resize=18, mean=(0.5,) * 3, std=(0.5,) * 3)([image])
    assert [str(w.message)[:60] for w in caught] == []
    assert batch.shape == (1, 3, 16, 16) and torch.allclose(batch, torch.ones_like(batch))


def test_adagrad_on_sparse_gradients_steps_without_the_invariant_warning_and_others_still_show():
    table = nn.Embedding(50, 4, sparse=True)
    optimizer = torch.optim.Adagrad(table.parameters(), lr=0.1)
    table(torch.tensor([1, 2, 2])).sum().backward()
    before = table.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sparse_invariants_warning_silenced():
            optimizer.step()
            warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    changed = (table.weight.detach() != before).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [1, 2]  # the looked-up rows only


def test_torch_log_lines_are_dropped_by_exact_text_only():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("torch.utils._pytree")
    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_torch_compile_logs()
        quiet_torch_compile_logs()  # idempotent: one filter
        logger.warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                       "torch.compile as an opaque value type.")
        logger.warning("a pytree message that matters")
    finally:
        logger.removeHandler(handler)
    assert records == ["a pytree message that matters"]
    assert len(logger.filters) == 1


def test_bars_follow_the_switches():
    assert _progress.bar(range(3), desc="x", show=False).disable is True
    previous = _progress.set_enabled(False)
    try:
        assert _progress.bar(range(3), desc="x").disable is True
        with _progress.enabled(True):  # a run cannot turn on what --quiet turned off
            assert _progress.bar(range(3), desc="x").disable is True
    finally:
        _progress.set_enabled(previous)
    with _progress.enabled(False):
        assert _progress.bar(range(3), desc="x").disable is True
    with _progress.ticking("exporting", show=False):
        pass


@pytest.mark.slow
def test_a_run_in_a_terminal_draws_bars_with_eta_and_quiet_draws_none(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-test-cnn\ndata: builtin:digits\nsteps:\n"
                      "  - prune: {method: magnitude, sparsity: 0.5}\n"
                      "measure: {batch_size: 16, warmup: 0, repeats: 1, max_eval_samples: 256}\n")
    plugin = os.path.join(os.path.dirname(__file__), "conftest.py")
    seen = {}
    for flag in ("-v", "--quiet"):
        leader, follower = pty.openpty()  # stderr is a terminal: tqdm draws
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 wide
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(leader, chunks))  # a full pty buffer would block the run
        reader.start()
        result = subprocess.run([sys.executable, "-m", "torchslim.cli", "compress", str(recipe), "--out",
                                 str(tmp_path / flag.strip("-")), "--import", plugin, flag], stdout=subprocess.PIPE,
                                stderr=follower, timeout=600)
        os.close(follower)
        reader.join()
        os.close(leader)
        assert result.returncode == 0
        seen[flag] = b"".join(chunks).decode(errors="replace")
    assert re.search(r"torchslim: evaluating baseline: +\d+%.*\d+/8 \[\d\d:\d\d<\d\d:\d\d", seen["-v"]), seen["-v"]
    assert "evaluating" not in seen["--quiet"] and seen["--quiet"].strip() == ""


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the terminal's other end is closed
            return
        if not chunk:
            return
        chunks.append(chunk)
