"""MkDocs hook: the API reference pages, generated from the public API listed in ``torchslim.__init__._PUBLIC``.

Nothing is imported: the ``_PUBLIC`` map is read from the source with `ast`, each name is followed through
``from ... import`` re-exports to the module that defines it, and one page per concern lists those objects as
mkdocstrings ``:::`` blocks (griffe then reads the same source statically). A name added to ``_PUBLIC`` appears
in the reference without editing any page; a name whose object does not exist fails the strict build.

    python docs/hooks/api_reference.py        # print the generated pages
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "torchslim"
REFERENCE_DIR = "reference"

# Page per concern: the first component after ``torchslim.`` of the defining module picks it. A module not listed
# here gets a page named after that component, so new packages still appear.
PAGES = {
    "recipe": ("recipes", "Recipes and the pipeline"),
    "pipeline": ("recipes", "Recipes and the pipeline"),
    "search": ("search", "Search (torchslim auto)"),
    "zoo": ("specs", "Models, data and export"),
    "data": ("specs", "Models, data and export"),
    "export": ("specs", "Models, data and export"),
    "plugins": ("specs", "Models, data and export"),
    "pruning": ("pruning", "Pruning"),
    "quant": ("quantization", "Quantization"),
    "factorize": ("compact", "Factorization and compact representations"),
    "compact": ("compact", "Factorization and compact representations"),
    "recover": ("recovery", "Recovery and distillation"),
    "measure": ("measurement", "Measurement"),
    "profile": ("measurement", "Measurement"),
    "registry": ("extending", "Registries and errors"),
    "errors": ("extending", "Registries and errors"),
}
PAGE_ORDER = ["recipes", "pruning", "quantization", "compact", "recovery", "measurement", "specs", "search",
              "extending"]


def public_names(init: Path = SRC / PACKAGE / "__init__.py") -> dict[str, str]:
    """``_PUBLIC`` (public name -> module the package imports it from), read without importing."""
    for node in ast.parse(init.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"no _PUBLIC map in {init}")


@functools.lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    # Keyed by modification time, so that `mkdocs serve` sees edits.
    return ast.parse(path.read_text())


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def defining_module(module: str, name: str, depth: int = 0) -> str:
    """The module whose top level defines ``name``, following ``from X import name`` re-exports of ``module``."""
    path = _module_file(module)
    if path is None or depth > 10:
        return module
    for node in _parse(path, path.stat().st_mtime_ns).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return module
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name and alias.name == name:
                    source = _absolute(module, node, path.name == "__init__.py")
                    if source.startswith(PACKAGE + "."):
                        return defining_module(source, name, depth + 1)
    return module


def _page_of(module: str) -> tuple[str, str]:
    part = module.split(".")[1] if "." in module else module
    return PAGES.get(part, (part.strip("_"), part.strip("_").replace("_", " ").capitalize()))


def reference_pages() -> dict[str, str]:
    """Generated pages: path under docs/ -> Markdown. ``reference/index.md`` lists every public name."""
    grouped: dict[str, tuple[str, list[str]]] = {}
    # Classes (configs, results) first, then functions; each alphabetically.
    for name, module in sorted(public_names().items(), key=lambda item: (item[0][0].islower(), item[0].lower())):
        target = f"{defining_module(module, name)}.{name}"
        slug, title = _page_of(target)
        grouped.setdefault(slug, (title, []))[1].append(target)
    order = [s for s in PAGE_ORDER if s in grouped] + sorted(s for s in grouped if s not in PAGE_ORDER)
    pages = {}
    index = ["# API reference", "",
             "Every public name of `torchslim` (`import torchslim; torchslim.NAME`), documented where it is "
             "defined. These pages are generated from `torchslim.__init__._PUBLIC` when the site is built.", ""]
    for slug in order:
        title, targets = grouped[slug]
        index += [f"## [{title}]({slug}.md)", ""]
        index += [f"- [`{t.rsplit('.', 1)[1]}`]({slug}.md#{t}) — `{t.rsplit('.', 1)[0]}`" for t in targets]
        index.append("")
        body = [f"# {title}", ""]
        for target in targets:
            body += [f"::: {target}", ""]
        pages[f"{REFERENCE_DIR}/{slug}.md"] = "\n".join(body)
    pages[f"{REFERENCE_DIR}/index.md"] = "\n".join(index)
    return pages


def reference_nav() -> list[dict[str, str]]:
    """The pages in nav order, as MkDocs nav entries."""
    pages = reference_pages()
    entries = [{"Overview": f"{REFERENCE_DIR}/index.md"}]
    for path, text in pages.items():
        if not path.endswith("index.md"):
            entries.append({text.splitlines()[0].lstrip("# "): path})
    return entries


def on_files(files, config):
    """Add the generated pages to the site's files (MkDocs ``on_files`` event)."""
    from mkdocs.structure.files import File

    for path, text in reference_pages().items():
        files.append(File.generated(config, path, content=text))
    return files


def on_config(config):
    """Fill the nav's "API reference" section with the generated pages (MkDocs ``on_config`` event)."""
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "API reference" in entry:
            entry["API reference"] = reference_nav()
    return config


if __name__ == "__main__":
    for path, text in reference_pages().items():
        print(f"--- {path}\n{text}")
