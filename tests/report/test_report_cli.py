"""`torchslim report` through the real entry point (exit codes 0 and 2), the manifest kept valid by an in-place
rebuild, and a run that goes on without report.html where jinja2 or plotly is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchslim.integrity import read_manifest, sha256_file, unlisted_files, verify_manifest, write_manifest

DATA = Path(__file__).with_name("data")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchslim.cli", "report", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ))


@pytest.fixture
def auto_run(tmp_path) -> Path:
    """An auto run's folder as torchslim writes it: report.json and its siblings, best/ with its own manifest,
    the outer manifest written last over everything (best/manifest.json included)."""
    folder = tmp_path / "run"
    shutil.copytree(DATA / "auto", folder)
    best = folder / "best"
    best.mkdir()
    report = json.loads((folder / "report.json").read_text())
    (best / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "search"}, indent=2))
    (best / "model.safetensors").write_bytes(b"not really weights")
    write_manifest(best)
    write_manifest(folder)
    return folder


def test_one_folder_is_rebuilt_in_place_and_its_manifests_stay_valid(auto_run):
    best = auto_run / "best"
    result = run_cli(best)
    assert result.returncode == 0 and result.stdout.strip() == f"wrote {best / 'report.html'}"
    page = (best / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "fig-score-latency" in page
    for folder in (best, auto_run):  # the outer manifest lists best/report.html and best/manifest.json
        assert verify_manifest(folder) is not None and unlisted_files(folder, read_manifest(folder)) == []
    assert read_manifest(auto_run)["files"]["best/report.html"]["sha256"] == sha256_file(best / "report.html")
    assert read_manifest(best)["files"]["model.safetensors"]["size"] == len(b"not really weights")


def test_a_rebuild_refreshes_only_the_page_so_a_damaged_file_stays_detected(auto_run):
    from torchslim.errors import ArtifactError

    (auto_run / "best" / "model.safetensors").write_bytes(b"damaged")
    assert run_cli(auto_run / "best").returncode == 0
    with pytest.raises(ArtifactError, match="model.safetensors"):
        verify_manifest(auto_run / "best")


def test_several_folders_make_one_comparison_page(auto_run, tmp_path):
    result = run_cli(auto_run, auto_run / "best", "--quiet", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == ""
    page = (tmp_path / "comparison.html").read_text()
    assert page.count('data-run="') == 2 and "cmp-0" in page
    out = tmp_path / "two.html"
    assert run_cli(auto_run, auto_run / "best", "--out", out).returncode == 0 and out.is_file()
    assert verify_manifest(auto_run) is not None  # the runs' folders are left as they were


@pytest.mark.parametrize("setup, args, message", [
    (None, ["{tmp}/missing"], "{tmp}/missing: no such folder"),
    ("empty", ["{tmp}/empty"], "{tmp}/empty: no report.json (not a torchslim output folder)"),
    ("damaged", ["{tmp}/damaged"], "{tmp}/damaged/report.json: not readable JSON"),
    ("foreign", ["{tmp}/foreign"], "{tmp}/foreign/report.json: not a torchslim report (schema 'other/1')"),
    ("run", ["{tmp}/run", "--out", "{tmp}/nowhere/page.html"], "--out {tmp}/nowhere/page.html: folder"),
    ("run", ["{tmp}/run", "--out", "{tmp}/run/extra.html"], "is inside a torchslim output folder"),
    ("edited", ["{tmp}/run"], "{tmp}/run/report.json: SHA-256 differs from manifest.json"),
])
def test_bad_input_is_one_line_and_exit_2(auto_run, tmp_path, setup, args, message):
    tmp = tmp_path
    before = {p: p.read_bytes() for p in auto_run.rglob("*") if p.is_file()}
    if setup in ("empty", "damaged", "foreign"):
        (tmp / setup).mkdir()
    if setup == "damaged":
        (tmp / setup / "report.json").write_text('{"schema": "torchslim.report/1", "stages": [')
    if setup == "foreign":
        (tmp / setup / "report.json").write_text('{"schema": "other/1"}')
    if setup == "edited":
        text = (auto_run / "report.json").read_text()
        (auto_run / "report.json").write_text(text.replace('"seed": 0', '"seed": 1', 1))  # same size, edited
        before = {p: p.read_bytes() for p in auto_run.rglob("*") if p.is_file()}
    result = run_cli(*[a.format(tmp=tmp) for a in args])
    err = result.stderr.strip()
    assert result.returncode == 2 and err.startswith("torchslim: error: ")
    assert message.format(tmp=tmp) in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in auto_run.rglob("*") if p.is_file()} == before  # nothing written


def test_without_jinja2_or_plotly_a_run_writes_its_reports_and_says_the_page_was_skipped(tmp_path, monkeypatch):
    import copy

    from torchslim.pipeline import compress
    from torchslim.recipe import parse_recipe
    from torchslim.report import html

    from conftest import TINY_RECIPE

    monkeypatch.setattr(html, "missing_dependencies", lambda: ["plotly"])
    raw = copy.deepcopy(TINY_RECIPE)
    raw["steps"] = [{"prune": {"method": "magnitude", "sparsity": 0.3}}]
    lines = []
    compress(parse_recipe(raw), tmp_path / "run", progress=False, log=lines.append)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "report.html" not in files and {"report.json", "report.md", "manifest.json"} <= set(files)
    assert "report.html skipped: plotly not installed (pip install 'torchslim[report]')" in lines
    assert verify_manifest(tmp_path / "run") is not None


def test_torchslim_report_without_jinja2_is_exit_2(auto_run):
    code = ("import sys; sys.modules['jinja2'] = None; from torchslim.cli import main; "
            f"sys.exit(main(['report', {str(auto_run)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr == "torchslim: error: report: report.html needs jinja2 (pip install 'torchslim[report]')\n"
    assert verify_manifest(auto_run) is not None and not (auto_run / "report.html").exists()
