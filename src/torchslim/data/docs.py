"""``builtin:docs``: about a million words of real English technical prose, for training and measuring language
models offline.

Assembled the way ``builtin:sentences`` is, but from far more text: the documentation strings of Python's whole
standard library, the language reference shipped with Python (``pydoc_data.topics``), and the docstrings of
numpy, scipy, scikit-learn and the documented parts of PyTorch (``torch.nn``, ``torch.optim``,
``torch.distributions``, ``torch.utils.data``). Paragraphs that are mostly words (no doctest prompts) are cut at
sentence ends into passages of at most ``PASSAGE_WORDS`` words, deduplicated, and split 90/5/5 with a fixed seed.
The text depends on the installed versions of those packages (pinned in constraints.txt); the notes give its
sha256, and the cache is keyed by it so that a different environment never reuses another corpus's split.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import warnings


from torchslim._cache import cache_dir, cached_json
from torchslim.data import DataBundle, register_builtin_data, text_bundle

CORPUS_VERSION = 1
PASSAGE_WORDS = 80
PACKAGES = ("numpy", "scipy", "sklearn", "torch.nn", "torch.optim", "torch.distributions", "torch.utils.data")
# Standard-library modules that open windows, print on import or only re-export others.
_STDLIB_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "__hello__",
                "__phello__", "pydoc_data"}
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")


def _module_names() -> list[str]:
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _STDLIB_SKIP)
    for root in PACKAGES:
        try:
            package = importlib.import_module(root)
        except Exception:  # a package missing here is simply not part of this corpus (its sha256 says so)
            continue
        names.append(root)
        names += sorted(m.name for m in pkgutil.walk_packages(package.__path__, root + ".", onerror=lambda _: None)
                        if "test" not in m.name and "._" not in m.name)
    return names


def _docstrings(module) -> list[str]:
    """Docstrings of a module and of the classes, functions and properties it defines (three levels deep)."""
    found, seen = [], set()
    package = module.__name__.split(".")[0]

    def visit(obj, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            doc = None
        if doc:
            found.append(doc)
        for name, member in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else []:
            if name.startswith("_"):
                continue
            owner = str(getattr(member, "__module__", package) or "").split(".")[0]
            if isinstance(member, property) or (
                    (inspect.isclass(member) or inspect.isfunction(member)) and owner == package):
                visit(member, depth + 1)

    visit(module, 0)
    return found


def _is_prose(passage: str) -> bool:
    words = passage.split()
    return (len(words) >= 5 and ">>>" not in passage
            and sum(w.strip(".,;:()'\"").isalpha() for w in words) >= 0.6 * len(words))


def _passages(paragraph: str) -> list[str]:
    """A paragraph cut at sentence ends into passages of at most PASSAGE_WORDS words (longer sentences alone)."""
    passages, current = [], []
    for sentence in _SENTENCE_END.split(paragraph):
        if current and len(" ".join(current + [sentence]).split()) > PASSAGE_WORDS:
            passages.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        passages.append(" ".join(current))
    return passages


def build_corpus() -> list[str]:
    """Every prose passage of the sources above, deduplicated, in a stable (sorted) order."""
    import pydoc_data.topics

    documents = list(pydoc_data.topics.topics.values())
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for name in _module_names():
            try:
                module = importlib.import_module(name)
            except BaseException:  # modules that need a display, a platform or optional dependencies
                continue
            documents += _docstrings(module)
    passages: set[str] = set()
    for document in documents:
        for paragraph in re.split(r"\n\s*\n", document):
            text = " ".join(paragraph.split())
            passages.update(p for p in _passages(text) if _is_prose(p))
    return sorted(passages)


def load_corpus() -> list[str]:
    """The cached corpus (built on first use for this Python and these package versions, ~10 s)."""
    import numpy
    import torch

    key = hashlib.sha256(f"{sys.version_info[:2]} {numpy.__version__} {torch.__version__} "
                         f"{_versions()}".encode()).hexdigest()[:10]
    path = cache_dir("data") / f"docs-v{CORPUS_VERSION}-{key}.json"
    return cached_json(path, build_corpus)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("scipy", "scikit-learn"):
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=absent")
    return " ".join(found)


@register_builtin_data("docs")
def load_docs(seed: int = 0) -> DataBundle:
    """About a million words of English technical prose, for training and measuring language models."""
    corpus = load_corpus()
    words = sum(len(p.split()) for p in corpus)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return text_bundle("builtin:docs", corpus, (0.9, 0.05, 0.05), seed, lambda digest, n: (
        f"docs: {len(corpus)} passages, {words} words of documentation prose (Python {version} standard library "
        f"and language reference, numpy, scipy, scikit-learn, torch.nn/optim; sha256 {digest}); "
        f"{n[0]} train / {n[1]} val / {n[2]} test"))
