"""The documentation's links and pages, checked without building the site (`make docs` builds it strictly)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@functools.cache
def _hook():
    spec = importlib.util.spec_from_file_location("api_reference", DOCS / "hooks" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def generated_pages() -> frozenset[Path]:
    """The API reference pages: the site build generates them (docs/hooks/api_reference.py), so no file exists."""
    return frozenset(DOCS / name for name in _hook().reference_pages())


def relative_links(path: Path) -> list[str]:
    """Link targets of a Markdown file outside code, without web links and same-page anchors."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def test_link_parser_ignores_code_and_web_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](one.md#x) ![b](img/two.png) [w](https://example.org/x.md) [s](#here)\n"
                    "`[c](inline.md)`\n```\n[d](fenced.md)\n```\n")
    assert relative_links(page) == ["one.md#x", "img/two.png"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(path):
    generated = generated_pages()
    broken = []
    for target in relative_links(path):
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not (file.exists() or file in generated):
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)} links to missing files: {broken}"


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_site_nav_and_every_nav_page_exists():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # plain strings, no tags
    nav = set(_nav_pages(config["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.glob("*.md")}
    assert sorted(pages - nav) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(nav - pages) == [], "nav entries without a page"


def _top_level_names(module: str) -> set[str]:
    base = ROOT / "src" / Path(*module.split("."))
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_api_reference_documents_every_public_name_where_it_is_defined():
    hook = _hook()
    public = hook.public_names()
    text = "\n".join(hook.reference_pages().values())  # parses each module once (the hook caches its trees)
    for name, module in public.items():
        where = hook.defining_module(module, name)
        assert name in _top_level_names(where), f"{name}: not defined at the top of {where}"
        assert f"::: {where}.{name}\n" in text
    assert hook.defining_module("torchslim.measure", "count_macs") == "torchslim.measure.macs"
    assert len(public) >= 20
