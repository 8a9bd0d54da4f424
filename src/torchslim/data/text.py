"""``text:PATH``: your own text for language models: a UTF-8 ``.txt``/``.md`` file, or a folder of them.

Paragraphs (separated by blank lines) become passages; longer ones are cut into passages of at most
``passage_words`` words, so that calibration and evaluation see whole sentences of your domain. Passages are split
by ``split.fractions`` with ``split.seed``; calibration draws from train. How many tokens of each passage a model
sees is the model's context length (``model: {spec: hf:PATH, max_length: 512}``).

Example:
    >>> data = resolve_data(DataConfig(spec="text:notes.txt", passage_words=120))
    >>> data.modality, len(data.splits["test"]) > 0
    ('text', True)
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from torchslim.data import DataBundle, assign_splits, register_data_prefix
from torchslim.data.config import DataConfig
from torchslim.errors import InputError

SUFFIXES = (".txt", ".md", ".text")


def passages(text: str, max_words: int) -> list[str]:
    """The paragraphs of ``text`` (whitespace collapsed), each cut into pieces of at most ``max_words`` words."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        found += [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]
    return found


def _files(root: Path, where: str) -> list[Path]:
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if files:
            return files
        raise InputError(f"{where}: {root} holds no {'/'.join(SUFFIXES)} files")
    raise InputError(f"{where}: {root} not found")


@register_data_prefix("text")
def load_text(path: str, seed: int = 0, config: DataConfig | None = None) -> DataBundle:
    """``text:PATH``: a UTF-8 .txt/.md file, or a folder of them, for language models."""
    config = config or DataConfig(spec=f"text:{path}")
    where = f"data: text:{path}"
    corpus: list[str] = []
    for file in _files(Path(path), where):
        try:
            corpus += passages(file.read_text(encoding="utf-8"), config.passage_words)
        except UnicodeDecodeError as error:
            raise InputError(f"{where}: {file}: not UTF-8 text (byte {error.start})") from None
    if not corpus:
        raise InputError(f"{where}: no text found")
    parts, split_info = assign_splits({"all": np.arange(len(corpus))}, config.split, seed, where)
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
    words = sum(len(p.split()) for p in corpus)
    sizes = " / ".join(f"{len(parts[n])} {n}" for n in ("train", "val", "test"))
    return DataBundle(spec=config.spec, modality="text",
                      splits={name: [corpus[i] for i in index] for name, index in parts.items()},
                      labels={name: None for name in parts},
                      notes=[f"text: {len(corpus)} passages ({words} words, at most {config.passage_words} each, "
                             f"sha256 {digest}) of {path}; {sizes}"],
                      split_info={**split_info, "sha256": digest})
