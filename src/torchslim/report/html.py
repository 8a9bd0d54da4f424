"""report.html: the report as one self-contained page (no network: plotly.js is inlined), written beside
report.json by every run and rebuilt from it by ``torchslim report``.

The page answers first, without scrolling, how much smaller, how much faster and how much of the metric was
lost (the final stage against the baseline); below: the stages side by side with their ratios, score against
latency and size, training curves, per-layer decisions, bytes, the search (for `torchslim auto`), the
environment and the exact recipe. jinja2 renders the templates shipped in ``templates/``; jinja2 and plotly are
optional (``pip install 'torchslim[report]'``): without them a run still writes report.json and report.md,
skips the page and says so.

Example:
    >>> from torchslim.report.html import render_report_html
    >>> page = render_report_html(json.loads(Path("out/demo/report.json").read_text()))
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from torchslim.errors import ArtifactError, InputError, describe, shorten
from torchslim.report import _view

TEMPLATES = Path(__file__).with_name("templates")
REQUIRES = ("jinja2", "plotly")
INSTALL_HINT = "pip install 'torchslim[report]'"
FILE_NAME = "report.html"
COMPARISON_NAME = "comparison.html"
MAX_REPORT_BYTES = 64 << 20


def missing_dependencies() -> list[str]:
    """The packages report.html needs that are not installed."""
    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # blocked (sys.modules[name] = None) or a broken install
            return True

    return [name for name in REQUIRES if missing(name)]


@functools.lru_cache(maxsize=1)
def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@functools.lru_cache(maxsize=1)  # 4.6 MB read once per process, not once per page
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _version() -> str:
    from torchslim._version import __version__

    return __version__


def finite(item):
    """``item`` with every NaN or infinity replaced by None: the page's JSON must parse in a browser (a
    perplexity can be infinite, an SQNR of identical outputs is)."""
    if isinstance(item, float) and not math.isfinite(item):
        return None
    if isinstance(item, dict):
        return {k: finite(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [finite(v) for v in item]
    return item


def render_report_html(report: dict, folder: str | Path | None = None) -> str:
    """The page for one run's ``report`` (a report.json's content). ``folder``: where report.json lies; an auto
    run's trials.json and sensitivity.json there add every trial and the proxy's sensitivities."""
    view = _view.page(report, Path(folder) if folder is not None else None)
    return _templates().get_template("report.html.j2").render(
        page=view, figures=finite(view["figures"]), plotly_js=_plotly_js(), version=_version(),
        title=f"torchslim: {view['model']} on {view['data']}")


def render_comparison_html(runs: Sequence[tuple[str, dict]]) -> str:
    """One page comparing runs, given as (label, report) pairs."""
    view = _view.comparison_page(list(runs))
    return _templates().get_template("compare.html.j2").render(
        page=view, figures=finite(view["figures"]), plotly_js=_plotly_js(), version=_version(),
        title=f"torchslim: {len(runs)} runs compared")


def write_report_html(directory: str | Path, report: dict, log: Callable[[str], None] | None = None) -> Path | None:
    """Write ``directory/report.html`` for ``report``; returns its path, or None when the page was skipped
    (jinja2 or plotly missing, or the page failed): a run's results never depend on its page."""
    log = log or (lambda message: None)
    missing = missing_dependencies()
    if missing:
        log(f"report.html skipped: {' and '.join(missing)} not installed ({INSTALL_HINT})")
        return None
    try:
        text = render_report_html(report, directory)
    except Exception as error:  # a page that fails must not lose a run of hours; the report files are written
        log(f"report.html skipped: {describe(error)}")
        return None
    path = Path(directory) / FILE_NAME
    path.write_text(text, encoding="utf-8")
    return path


def load_report(folder: str | Path) -> dict:
    """``folder/report.json``, checked to be a torchslim report (and against the folder's manifest).

    Raises:
        InputError: no such folder, no report.json, unreadable or damaged JSON, or not a torchslim report.
    """
    from torchslim.integrity import verify_manifest

    folder = Path(folder)
    path = folder / "report.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if not path.is_file():
        raise InputError(f"{folder}: no report.json (not a torchslim output folder)")
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise InputError(f"{path}: larger than {MAX_REPORT_BYTES:,} bytes; not a torchslim report")
    try:
        verify_manifest(folder, ["report.json"])
    except ArtifactError as error:
        raise InputError(str(error)) from None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({shorten(str(error), 120)})") from None
    _check_report(path, report)
    return report


def _check_report(path: Path, report) -> None:
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("torchslim.report/"):
        stamp = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise InputError(f"{path}: not a torchslim report (schema {shorten(stamp)})")
    stages = report.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise InputError(f"{path}: 'stages' must be a list of stage records")
    for index, stage in enumerate(stages):
        missing = [k for k in ("name", "metric", "score") if k not in stage]
        if missing:
            raise InputError(f"{path}: stages[{index}] has no {', '.join(missing)}")
    if not stages and not isinstance(report.get("search"), dict):
        raise InputError(f"{path}: no stages and no search: nothing to show")


def _write_atomically(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it: it appears complete or not at all."""
    from torchslim.integrity import current_umask

    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", suffix=".tmp",
                                         delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, 0o666 & ~current_umask())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _check_out(out: Path) -> None:
    from torchslim.integrity import MANIFEST_NAME

    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give the HTML file to write")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    if (out.parent / MANIFEST_NAME).is_file() or out.suffix.lower() not in (".html", ".htm"):
        hint = ("is inside a torchslim output folder; leave --out out to rebuild that folder's report.html with "
                "its manifest" if (out.parent / MANIFEST_NAME).is_file() else "must end in .html")
        raise InputError(f"--out {out}: {hint}")


def _labels(folders: list[Path]) -> list[str]:
    """Each run's name on the comparison page: its folder's name, or its path where names repeat."""
    names = [f.resolve().name or str(f) for f in folders]
    return [str(f) if names.count(n) > 1 else n for f, n in zip(folders, names)]


def rebuild(folders: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``torchslim report``: one folder -> its report.html rebuilt in place (its manifest entry refreshed, see
    `refresh_in_place`) or written to ``out``; several -> one comparison page at ``out`` (default
    ``comparison.html`` in the working folder). Returns the page's path.

    Raises:
        InputError: a folder, its report.json or ``out`` is unusable; jinja2 or plotly is missing.
    """
    folders = [Path(f) for f in folders]
    reports = [load_report(folder) for folder in folders]  # every input checked before anything is written
    missing = missing_dependencies()
    if missing:
        raise InputError(f"report: report.html needs {' and '.join(missing)} ({INSTALL_HINT})")
    target = Path(out) if out is not None else (folders[0] / FILE_NAME if len(folders) == 1 else
                                                Path(COMPARISON_NAME))
    if out is not None or len(folders) > 1:
        _check_out(target)
    if len(folders) == 1:
        text = render_report_html(reports[0], folders[0])
    else:
        text = render_comparison_html(list(zip(_labels(folders), reports)))
    if out is None and len(folders) == 1:
        refresh_in_place(folders[0], text)
    else:
        _write_atomically(target, text)
    return target


def refresh_in_place(folder: Path, text: str) -> None:
    """Replace ``folder/report.html`` and its manifest entry, and the entries of a run folder holding this one
    (an auto run's best/), so that loading and checking the folder keep working. Only these entries change: a
    damaged or altered file stays detected."""
    from torchslim.integrity import MANIFEST_NAME, read_manifest, refresh_manifest

    parent = folder.resolve().parent
    inner = [f"{folder.resolve().name}/{name}" for name in (FILE_NAME, MANIFEST_NAME)]
    own = read_manifest(folder)  # both manifests read (and checked) before anything is written
    outer = read_manifest(parent) if own is not None else None
    _write_atomically(folder / FILE_NAME, text)
    if own is None:
        return
    refresh_manifest(folder, [FILE_NAME])
    if outer is not None and any(name in outer["files"] for name in inner):
        refresh_manifest(parent, inner)
