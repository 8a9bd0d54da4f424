"""report.html in a real browser (Debian's headless chromium, driven by Playwright): every plot drawn, no console
error, nothing fetched, the stage table equal to report.json, the headline within the first screen; the auto
page and the comparison page. Skipped only where no chromium binary is installed."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from torchslim.report import _format as fmt
from torchslim.report.html import render_comparison_html, render_report_html

DATA = Path(__file__).with_name("data")
VIEWPORT = {"width": 1280, "height": 800}
DRAWN = ("() => [...document.querySelectorAll('.plot')].every("
         "p => p.classList.contains('js-plotly-plot') && p.querySelector('svg.main-svg'))")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary,
                                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


class Opened:
    """A page loaded in the browser once all its plots are drawn, with its errors and requested URLs."""

    def __init__(self, browser, path: Path):
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_function(DRAWN, timeout=60_000)

    def plots(self) -> int:
        """Plots drawn: plotly's containers holding an SVG."""
        return self.page.locator(".js-plotly-plot:has(svg.main-svg)").count()

    def traces(self, figure_id: str) -> int:
        return self.page.evaluate(f"document.getElementById('{figure_id}').data.length")

    def offline(self) -> bool:
        return all(url.startswith(("file:", "data:", "blob:", "about:")) for url in self.requests)


@pytest.fixture
def open_page(browser):
    opened = []

    def open_(path: Path) -> Opened:
        opened.append(Opened(browser, path))
        return opened[-1]

    yield open_
    for item in opened:
        item.page.close()


def run_folder(tmp_path: Path, name: str) -> Path:
    """A run's folder made from a report.json that torchslim wrote (tests/report/data), with its report.html."""
    folder = tmp_path / name
    shutil.copytree(DATA / name, folder)
    report = json.loads((folder / "report.json").read_text())
    (folder / "report.html").write_text(render_report_html(report, folder))
    return folder


@pytest.fixture
def tiny_run(tmp_path):
    """The tests' tiny recipe (magnitude pruning, distillation, int8 static on ONNX Runtime)."""
    folder = run_folder(tmp_path, "tiny")
    return folder, json.loads((folder / "report.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_the_run_page_draws_every_plot_offline_without_errors(tiny_run, open_page, tmp_path):
    out, report = tiny_run
    opened = open_page(out / "report.html")
    # score-vs-latency, score-vs-size, the finetune step's loss curve, sparsity per layer, bytes per stage, the
    # model.onnx's bytes by layer group and by kind
    assert opened.plots() == 7 and opened.errors == [] and opened.offline()
    assert opened.traces("fig-score-latency") == 1
    points = opened.page.evaluate("document.getElementById('fig-score-latency').data[0].x.length")
    assert points == len(report["stages"]) == 4
    groups = opened.page.evaluate("document.getElementById('fig-size-groups').data[0].y")
    assert groups == list(report["size_breakdown"]["groups"]) and "conv2" in groups
    layers = opened.page.locator("#skipped-table tbody tr").count()
    assert layers == len(report["skipped"])
    opened.page.screenshot(path=str(tmp_path / "full.png"), full_page=True)
    width, height = png_size(tmp_path / "full.png")
    assert width == 1280 and height > 1600  # every section below the first screen


def test_the_stage_table_shows_report_jsons_numbers(tiny_run, open_page):
    out, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    page = open_page(out / "report.html").page
    rows = page.locator("#stage-table tbody tr")
    assert rows.count() == len(report["stages"])
    shown = {"params": fmt.count, "macs": fmt.count, "size_bytes": fmt.size, "size_bytes_raw": fmt.size,
             "latency_ms_bs1": fmt.ms, "latency_ms_batch": fmt.ms, "peak_memory_bytes": fmt.size}
    for index, stage in enumerate(report["stages"]):
        row = rows.nth(index)
        assert row.get_attribute("data-stage") == stage["name"]
        for field, formatter in shown.items():
            cell = row.locator(f"td[data-field='{field}']")
            assert json.loads(cell.get_attribute("data-value")) == stage[field], (stage["name"], field)
            assert cell.locator(".v").inner_text() == formatter(stage[field])
        score = row.locator("td[data-field='score']")
        assert json.loads(score.get_attribute("data-value")) == stage["score"]
        assert score.locator(".v").inner_text() == f"{stage['score'] * 100:.2f}%"


def test_the_headline_answers_within_the_first_screen(tiny_run, open_page, tmp_path):
    out, report = tiny_run
    page = open_page(out / "report.html").page
    final = report["stages"][-1]["ratios"]
    cards = page.locator("#headline .card")
    assert cards.count() == 4
    for index in range(4):
        box = cards.nth(index).bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], index
    size = page.locator(".card[data-key='size']")
    expected = final["size_reduction"] if final["size_reduction"] >= 1 else 1 / final["size_reduction"]
    assert size.locator(".value").inner_text() == fmt.ratio(expected)
    assert size.locator(".label").inner_text() in ("smaller", "larger")
    batch = page.locator(".card[data-key='speed_batch'] .label").inner_text()
    assert batch.endswith(f"at batch {report['stages'][-1]['batch_size']}") and batch.split()[0] in ("faster", "slower")
    metric = page.locator(".card[data-key='metric']")
    points = (report["stages"][-1]["score"] - report["stages"][0]["score"]) * 100
    assert metric.locator(".value").inner_text() == f"{abs(points):.2f} pts"
    page.screenshot(path=str(tmp_path / "first-screen.png"))
    assert png_size(tmp_path / "first-screen.png") == (1280, 800)


@pytest.mark.parametrize("name, plots, bars", [
    ("svd", 7, ["fig-layers-1-0", "fig-layers-2-0", "fig-layers-2-1"]),  # channels removed, ranks, energy
    ("codebook", 6, ["fig-layers-1-0", "fig-bytes-2-0"]),  # sparsity per layer, the .tslim's bytes by part
])
def test_per_layer_decisions_are_drawn_as_bars(tmp_path, open_page, name, plots, bars):
    folder = run_folder(tmp_path, name)
    report = json.loads((folder / "report.json").read_text())
    opened = open_page(folder / "report.html")
    assert opened.plots() == plots and opened.errors == [] and opened.offline()
    for figure_id in bars:
        assert opened.page.locator(f"#{figure_id} .barlayer .point").count() >= 1, figure_id
    if name == "svd":  # the rank kept drawn over the full rank, per factorized layer
        assert opened.traces("fig-layers-2-0") == 2
        assert opened.page.evaluate("document.getElementById('fig-layers-2-0').data[1].x") == \
            list(report["stages"][2]["details"]["ranks"].values())
        assert opened.page.locator("#skipped-table tbody tr").count() == len(report["skipped"]) == 2


def test_the_auto_page_shows_the_front_the_constraint_and_the_chosen_point(tmp_path, open_page):
    folder = run_folder(tmp_path, "auto")
    report = json.loads((folder / "report.json").read_text())
    opened = open_page(folder / "report.html")
    # 2 trade-offs, 1 loss curve, removed channels, bytes per stage, 2 search plots, sensitivity
    assert opened.plots() == 8 and opened.errors == [] and opened.offline()
    figure = "document.getElementById('fig-search-latency')"
    names = opened.page.evaluate(f"{figure}.data.map(t => t.name)")
    assert names == ["measured trials", "Pareto front", "chosen (trial 0)", "baseline"]
    assert opened.page.evaluate(f"{figure}.data[0].x.length") == 3  # every trial of trials.json
    shapes = opened.page.evaluate(f"{figure}.layout.shapes.map(s => s.y0)")
    assert shapes == [0.5]  # max_drop: 0.5
    assert opened.page.locator("#front-table tbody tr").count() == len(report["search"]["front"])


def test_names_from_the_report_are_shown_as_text_never_run(tmp_path, open_page):
    folder = run_folder(tmp_path, "auto")
    report = json.loads((folder / "report.json").read_text())
    hostile = "</script><script>window.injected = 1</script><img src=x onerror='window.injected = 2'>"
    report["skipped"] = {hostile: "kept " + hostile}
    report["stages"][1]["details"]["removed_channels"] = {hostile: 3, "conv2": 4}
    (folder / "report.html").write_text(render_report_html(report, folder))
    opened = open_page(folder / "report.html")
    assert opened.page.evaluate("window.injected === undefined") and opened.errors == []
    assert opened.page.locator("#skipped-table td").first.inner_text() == hostile


def test_the_comparison_page_puts_every_run_in_one_scatter(tiny_run, tmp_path, open_page):
    runs = [("tiny", tiny_run[1]), ("auto", json.loads((DATA / "auto" / "report.json").read_text()))]
    page_path = tmp_path / "comparison.html"
    page_path.write_text(render_comparison_html(runs))
    opened = open_page(page_path)
    assert opened.plots() == 2 and opened.errors == [] and opened.offline()
    assert opened.traces("cmp-0") == 2 and opened.traces("cmp-1") == 2  # one trace per run, same metric
    assert opened.page.locator("#runs-table tbody tr").count() == 2
    assert opened.page.locator("table.stages").count() == 2
    opened.page.screenshot(path=str(tmp_path / "comparison.png"))
    assert png_size(tmp_path / "comparison.png") == (1280, 800)
