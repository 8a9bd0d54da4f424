"""``builtin:sentences``: real English sentences from the documentation strings of Python's standard library.

Assembled offline from this interpreter's own modules, filtered to prose (6-40 words, capitalised, ending in a
full stop, no code), deduplicated, shuffled with a fixed seed and split 80/10/10. Cached after the first build.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings


from torchslim._cache import cache_dir, cached_json
from torchslim.data import DataBundle, register_builtin_data, text_bundle

MODULES = (
    "abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd codecs codeop collections "
    "colorsys concurrent.futures configparser contextlib contextvars copy copyreg csv ctypes dataclasses datetime "
    "decimal difflib dis doctest email email.message email.parser enum filecmp fileinput fnmatch fractions ftplib "
    "functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client http.cookies "
    "http.server imaplib inspect io ipaddress itertools json json.decoder keyword linecache locale logging "
    "logging.handlers lzma mailbox math mimetypes mmap multiprocessing netrc numbers operator optparse os "
    "os.path pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats queue quopri "
    "random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket "
    "socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys sysconfig tabnanny tarfile "
    "tempfile textwrap threading timeit token tokenize tomllib trace traceback tracemalloc types typing "
    "unicodedata unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref webbrowser "
    "xml.dom.minidom xml.etree.ElementTree xml.sax zipfile zipimport zlib zoneinfo"
).split()

_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"[=<>{}\[\]`\\|#@$*~^]|>>>|\.\.\.|\w\(|\w_\w|::|\s-\w|https?:|\.py\b|__")
CORPUS_VERSION = 1


def _docstrings(module) -> list[str]:
    found, seen = [], set()

    def visit(obj, depth: int) -> None:
        if id(obj) in seen or depth > 2:
            return
        seen.add(id(obj))
        doc = inspect.getdoc(obj)
        if doc:
            found.append(doc)
        for name, member in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else []:
            if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(member) or inspect.isfunction(member) or inspect.ismethod(member):
                visit(member, depth + 1)

    visit(module, 0)
    return found


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    return (6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith(".")
            and not _CODE_LIKE.search(sentence) and sum(w.isalpha() for w in words) >= 0.7 * len(words))


def prose_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (one paragraph, whitespace collapsed) that pass the corpus's prose filter:
    6-40 words, capitalised, ending in a full stop, mostly words and nothing code-like."""
    return [s for s in _SENTENCE_END.split(text) if _is_prose(s)]


def build_corpus() -> list[str]:
    """Every prose sentence of the standard library's docstrings, deduplicated, in a stable order."""
    sentences: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # a module missing from this build (e.g. no sqlite3) is simply skipped
                continue
            for doc in _docstrings(module):
                for paragraph in re.split(r"\n\s*\n", doc):
                    text = " ".join(paragraph.split())
                    sentences.update(prose_sentences(text))
    return sorted(sentences)


def load_corpus() -> list[str]:
    """The cached corpus (built on first use for this Python version)."""
    path = cache_dir("data") / f"sentences-v{CORPUS_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}.json"
    return cached_json(path, build_corpus)


@register_builtin_data("sentences")
def load_sentences(seed: int = 0) -> DataBundle:
    """Real English sentences from the docstrings of Python's standard library."""
    corpus = load_corpus()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return text_bundle("builtin:sentences", corpus, (0.8, 0.1, 0.1), seed, lambda digest, n: (
        f"sentences: {len(corpus)} sentences from Python {version} docstrings (sha256 {digest}); "
        f"{n[0]} train / {n[1]} val / {n[2]} test"))
