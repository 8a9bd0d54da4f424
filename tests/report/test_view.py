"""What report.html shows, computed without a browser: number formats, details sorted into charts and tables,
the headline, non-finite numbers, and that the page is one offline file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from torchslim.report import _details, _view
from torchslim.report import _format as fmt
from torchslim.report.html import render_report_html

DATA = Path(__file__).with_name("data")


def report_of(name: str) -> dict:
    return json.loads((DATA / name / "report.json").read_text())


def figures_of(page: str) -> list[dict]:
    block = re.search(r'<script type="application/json" id="torchslim-figures">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


@pytest.mark.parametrize("function, value, shown", [
    (fmt.count, 1_234_567, "1.23 M"), (fmt.count, 842, "842"), (fmt.count, 46_720, "46.7 k"),
    (fmt.size, 7_475, "7.47 kB"), (fmt.size, 123_456_789, "123 MB"), (fmt.size, None, "n/a"),
    (fmt.ms, 0.08771, "0.0877 ms"), (fmt.ms, 93.46, "93.5 ms"), (fmt.ratio, 4.1234, "4.12×"),
])
def test_numbers_are_shown_with_three_significant_digits_and_a_unit(function, value, shown):
    assert function(value) == shown


def test_metric_changes_read_as_points_or_relative_percent():
    assert fmt.score_change("accuracy", 0.98, 0.9763) == ("-0.37 pts", pytest.approx(-0.37))
    assert fmt.score_change("perplexity", 10.0, 10.31) == ("+3.10%", pytest.approx(-3.1))
    assert fmt.score("accuracy", 0.97959) == "97.96%" and fmt.score("perplexity", 12.345) == "12.35"
    assert fmt.label("macs_before") == "MACs before" and fmt.label("val_metric") == "Validation metric"


def test_factorization_details_become_rank_bars_over_the_full_rank_a_table_and_facts():
    details = report_of("svd")["stages"][2]["details"]
    blocks = _details.classify(details)
    assert [b["title"] for b in blocks["bars"]] == ["Rank kept (of the full rank)", "Energy retained"]
    ranks = blocks["bars"][0]
    assert [s["name"] for s in ranks["series"]] == ["Full ranks", "Ranks"] and ranks["names"] == ["fc"]
    assert blocks["tables"][0]["columns"] == ["layer", "Ranks", "Full ranks", "Retained energy"]
    assert blocks["tables"][0]["rows"] == [["fc", "8", "10", "0.9022"]]
    assert ("MACs after", "46,672") in blocks["facts"] and blocks["curves"] == [] and blocks["rest"] == ""


def test_training_curves_are_found_in_a_step_and_in_a_nested_run():
    finetune = _details.classify(report_of("svd")["stages"][3]["details"])
    assert [c["name"] for c in finetune["curves"]] == ["train_loss", "cross_entropy", "kd", "val_metric"]
    assert [c["axis"] for c in finetune["curves"]] == ["y", "y", "y", "y2"]
    assert finetune["curves"][0]["values"] == [0.7033, 0.67671, 0.66845]
    codebook = _details.classify(report_of("codebook")["stages"][2]["details"])
    assert codebook["curves"][0]["name"] == "centroid_finetune: train_loss"
    assert codebook["sizes"][0]["parts"] == {"header": 257, "codebooks": 96, "indices": 436, "positions": 265,
                                             "tensors": 70}


def test_the_headline_compares_the_final_stage_with_the_baseline():
    report = report_of("tiny")
    base, final = report["stages"][0], report["stages"][-1]
    cards = {card["key"]: card for card in _view.headline(report)}
    assert list(cards) == ["size", "speed_batch", "speed_bs1", "metric"]
    assert cards["size"]["value"] == fmt.ratio(final["ratios"]["size_reduction"]) and cards["size"]["tone"] == "good"
    lost = (base["score"] - final["score"]) * 100
    assert cards["metric"]["value"] == f"{abs(lost):.2f} pts"
    assert cards["metric"]["label"] == ("accuracy lost" if lost > 0 else "accuracy gained")


def test_an_auto_run_without_best_takes_its_headline_from_the_chosen_point():
    report = report_of("auto")
    report["stages"] = []
    cards = {card["key"]: card for card in _view.headline(report)}
    chosen = report["search"]["chosen"]
    assert cards["size"]["value"] == fmt.ratio(1 / chosen["size_ratio"])
    assert cards["metric"]["detail"] == f"trial {chosen['trial']} (validation split)"


def test_infinite_scores_leave_the_pages_figures_valid_json():
    report = report_of("tiny")
    report["stages"][1]["score"] = float("inf")
    report["stages"][1]["details"]["layers"]["fc.weight"] = float("nan")
    page = render_report_html(report)
    figures = figures_of(page)  # json.loads refuses NaN/Infinity only with strict parsing; check the text too
    assert "Infinity" not in page.split('id="torchslim-figures">')[1].split("</script>")[0]
    assert figures[0]["data"][0]["y"][1] is None


def test_the_page_is_one_offline_file():
    page = render_report_html(report_of("tiny"))
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=["\']?https?:', page)
    assert "Plotly.newPlot" in page and page.count("<script") == 3  # figures, plotly.js, drawing
    assert len(figures_of(page)) == page.count('class="plot"') == 7


def test_an_auto_run_where_no_point_met_the_constraints_still_gets_its_search_page():
    report = report_of("auto")
    report["stages"], report["search"]["chosen"]["feasible"] = [], False
    page = render_report_html(report, DATA / "auto")
    ids = [figure["id"] for figure in figures_of(page)]
    assert ids == ["fig-search-latency", "fig-search-size", "fig-sensitivity"]
    assert 'id="stage-table"' not in page and 'id="front-table"' in page


def test_an_artifacts_bytes_are_broken_down_by_layer_group_and_kind(tmp_path):
    from safetensors.torch import save_file
    import torch

    from torchslim.report._sizes import artifact_breakdown

    save_file({"blocks.0.conv.weight": torch.zeros(4, 4), "blocks.0.conv.bias": torch.zeros(4),
               "blocks.1.norm.running_mean": torch.zeros(8), "fc.weight": torch.zeros(2, 8, dtype=torch.float16)},
              str(tmp_path / "model.safetensors"))
    breakdown = artifact_breakdown(tmp_path / "model.safetensors")
    assert breakdown["groups"] == {"blocks.0": 80, "blocks.1": 32, "fc": 32}
    assert breakdown["kinds"] == {"float32 weights": 64, "float32 norm statistics": 32, "float16 weights": 32,
                                  "float32 biases": 16}
    assert breakdown["total"] == 144 and artifact_breakdown(tmp_path / "model.tslim") is None
