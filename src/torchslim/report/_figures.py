"""The plots of report.html as plotly figure specifications (plain dicts: the page's inlined plotly.js draws them,
so no plotly Python object is built and the figures stay plain JSON in the page)."""

from __future__ import annotations

from torchslim.report import _format as fmt
from torchslim.report._details import is_number

BASELINE, STAGE, FINAL, FRONT, CHOSEN, LIMIT, MUTED = ("#64748b", "#60a5fa", "#1d4ed8", "#f59e0b", "#dc2626",
                                                       "#dc2626", "#cbd5e1")
# Distinct colours for runs on the comparison page and for several curves in one plot.
SERIES = ("#1d4ed8", "#ea580c", "#059669", "#9333ea", "#db2777", "#0891b2", "#65a30d", "#b45309")
CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
MAX_BARS = 40


def _layout(x_title: str, y_title: str, height: int = 360, **extra) -> dict:
    axis = {"gridcolor": "#e2e8f0", "zerolinecolor": "#cbd5e1", "linecolor": "#94a3b8", "ticks": "outside",
            "tickcolor": "#94a3b8", "automargin": True}
    return {"height": height, "margin": {"l": 60, "r": 20, "t": 16, "b": 60}, "paper_bgcolor": "white",
            "plot_bgcolor": "white", "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
                                              "size": 12, "color": "#1e293b"},
            "xaxis": {**axis, "title": {"text": x_title}}, "yaxis": {**axis, "title": {"text": y_title}},
            "legend": {"orientation": "h", "y": -0.2, "yanchor": "top", "x": 0}, "hoverlabel": {"bgcolor": "white"},
            **extra}


def byte_unit(values) -> tuple[float, str]:
    """(scale, unit) that shows the largest of ``values`` between 1 and 1000: kB for a tiny model, MB, GB."""
    largest = max((v for v in values if is_number(v)), default=0)
    return next(((scale, unit) for scale, unit in ((1e9, "GB"), (1e6, "MB")) if largest >= scale), (1e3, "kB"))


def figure(fig_id: str, title: str, data: list[dict], layout: dict, caption: str = "") -> dict:
    return {"id": fig_id, "title": title, "caption": caption, "data": data, "layout": layout, "config": CONFIG}


def _score_axis(metric: str) -> dict:
    lower = metric in fmt.LOWER_IS_BETTER
    title = f"{metric} ({'lower' if lower else 'higher'} is better)"
    return {"title": {"text": title}, **({"autorange": "reversed"} if lower else {})}


def _stage_trace(stages: list[dict], x_key: str, scale: float, name: str, color: str | None = None) -> dict:
    """The run's path: baseline, every stage in order, the final stage marked."""
    last = len(stages) - 1
    symbols = ["diamond" if i == 0 else "star" if i == last else "circle" for i in range(len(stages))]
    colors = [BASELINE if i == 0 else FINAL if i == last else STAGE for i in range(len(stages))]
    return {"type": "scatter", "mode": "lines+markers+text", "name": name,
            "x": [s.get(x_key) / scale if is_number(s.get(x_key)) else None for s in stages],
            "y": [s.get("score") for s in stages], "text": [s["name"] for s in stages],
            "textposition": "top center", "textfont": {"size": 11}, "cliponaxis": False,
            "line": {"color": color or "#94a3b8", "dash": "dot", "width": 1.5},
            "marker": {"size": [12 if i in (0, last) else 9 for i in range(len(stages))],
                       "symbol": symbols, "color": color or colors, "line": {"width": 1, "color": "white"}},
            "hovertemplate": "%{text}<br>%{x:.4g}<br>score %{y:.4g}<extra></extra>"}


def tradeoffs(stages: list[dict], prefix: str = "fig") -> list[dict]:
    """Score against batched latency and against shipped size, the baseline and every stage."""
    if not stages:
        return []
    metric = stages[0].get("metric", "score")
    batch = stages[0].get("batch_size")
    sizes = [s.get("size_bytes") for s in stages if is_number(s.get("size_bytes")) and s.get("size_bytes") > 0]
    log_size = bool(sizes) and max(sizes) / min(sizes) > 20
    latency = _layout(f"batched latency, ms (batch {batch})", metric)
    latency["yaxis"].update(_score_axis(metric))
    scale, unit = byte_unit(sizes)
    size = _layout(f"shipped size, {unit} (deflate-compressed artifact)", metric)
    size["yaxis"].update(_score_axis(metric))
    if log_size:
        size["xaxis"]["type"] = "log"
    for layout in (latency, size):
        layout["showlegend"] = False
    return [figure(f"{prefix}-score-latency", "Score vs latency", [_stage_trace(stages, "latency_ms_batch", 1,
                                                                                 "stages")], latency,
                   "Each stage of the recipe in order; up and to the left is better."),
            figure(f"{prefix}-score-size", "Score vs size", [_stage_trace(stages, "size_bytes", scale, "stages")],
                   size, "Shipped size: the artifact as stored and downloaded (deflate)."
                   + (" Logarithmic axis." if log_size else ""))]


def comparison(runs: list[tuple[str, dict]]) -> list[dict]:
    """Every run's stages in one score-vs-latency and one score-vs-size plot, a colour per run; runs scored with
    different metrics get a pair of plots per metric (their scores share no axis)."""
    metrics: dict[str, list[int]] = {}
    for i, (_, report) in enumerate(runs):
        if report.get("stages"):
            metrics.setdefault(report["stages"][0].get("metric", "score"), []).append(i)
    figures = []
    for metric, members in metrics.items():
        scale, unit = byte_unit([s.get("size_bytes") for i in members for s in runs[i][1]["stages"]])
        for key, scale, title, x_title in (("latency_ms_batch", 1, "latency", "batched latency, ms"),
                                           ("size_bytes", scale, "size", f"shipped size, {unit}")):
            data = []
            for i in members:
                name, report = runs[i]
                trace = _stage_trace(report["stages"], key, scale, name, SERIES[i % len(SERIES)])
                trace.update(mode="lines+markers", text=[f"{name}: {s['name']}" for s in report["stages"]])
                data.append(trace)
            layout = _layout(x_title, metric, height=420, showlegend=True)  # the run's name, even when alone
            layout["yaxis"].update(_score_axis(metric))
            label = f"{metric} vs {title}" if len(metrics) > 1 else f"Score vs {title}"
            figures.append(figure(f"cmp-{len(figures)}", label, data, layout,
                                  "Every run's stages in order (hover for names)."))
    return figures


def training(stage_name: str, index: int, found: list[dict]) -> dict:
    """Loss per epoch of one stage's training (validation metric on a second axis)."""
    data, second = [], False
    for i, curve in enumerate(found):
        on_second = curve["axis"] == "y2"
        second |= on_second
        values = curve["values"]
        data.append({"type": "scatter", "mode": "lines+markers", "name": fmt.label(curve["name"]),
                     "x": list(range(1, len(values) + 1)), "y": values, "yaxis": curve["axis"],
                     "line": {"color": SERIES[i % len(SERIES)], "width": 2, "dash": "dash" if on_second else "solid"},
                     "marker": {"size": 5}})
    layout = _layout("epoch", "loss", height=300)
    if max(len(c["values"]) for c in found) <= 20:
        layout["xaxis"]["dtick"] = 1
    if second:
        layout["yaxis2"] = {"title": {"text": "validation metric"}, "overlaying": "y", "side": "right",
                            "showgrid": False, "zeroline": False, "automargin": True}
        layout["margin"]["r"] = 60
    return figure(f"fig-train-{index}", f"{stage_name}: training", data, layout)


def bars(stage_name: str, fig_id: str, block: dict) -> dict:
    """A horizontal bar per layer (the largest ``MAX_BARS`` when there are more), top to bottom in model order."""
    names = block["names"]
    keep = list(range(len(names)))
    main = block["series"][-1]["values"]
    if len(keep) > MAX_BARS:
        keep = sorted(sorted(keep, key=lambda i: -abs(main[i]))[:MAX_BARS])
    data = []
    for series in block["series"]:
        background = series.get("background", False)
        data.append({"type": "bar", "orientation": "h", "name": series["name"],
                     "y": [names[i] for i in keep], "x": [series["values"][i] for i in keep],
                     "marker": {"color": MUTED if background else FINAL}, "hovertemplate": "%{y}: %{x}<extra></extra>"})
    layout = _layout(block["title"].lower(), "", height=min(90 + 26 * len(keep), 1100), barmode="overlay",
                     showlegend=len(data) > 1)
    layout["yaxis"].update(autorange="reversed", ticks="", title={"text": ""})
    layout["margin"]["l"] = 10
    caption = f"The {MAX_BARS} largest of {len(names)} shown; the table lists all." if len(names) > MAX_BARS else ""
    return figure(fig_id, f"{stage_name}: {block['title'].lower()}", data, layout, caption)


def stage_sizes(stages: list[dict]) -> dict | None:
    """Bytes per stage: shipped (deflate), the artifact file, and parameters resident in memory."""
    kinds = (("size_bytes", "shipped (deflate)", FINAL), ("size_bytes_raw", "artifact file", STAGE),
             ("resident_param_bytes", "parameters in memory", MUTED))
    scale, unit = byte_unit([s.get(key) for s in stages for key, _, _ in kinds])
    data = [{"type": "bar", "name": name, "x": [s["name"] for s in stages],
             "y": [s.get(key) / scale if is_number(s.get(key)) else None for s in stages], "marker": {"color": color},
             "hovertemplate": "%{x}: %{y:.4g} " + unit + "<extra>" + name + "</extra>"}
            for key, name, color in kinds if any(is_number(s.get(key)) for s in stages)]
    if not data:
        return None
    layout = _layout("", unit, height=320, barmode="group")
    return figure("fig-sizes", "Bytes per stage", data, layout,
                  "Shipped: what is stored and downloaded; file: the artifact as written; in memory: the "
                  "parameters a loaded torch model holds (the file for other runtimes).")


def components(stage_name: str, fig_id: str, block: dict) -> dict:
    """An artifact's bytes by component (codebooks, indices, ...) as one stacked bar."""
    parts = block["parts"]
    data = [{"type": "bar", "orientation": "h", "name": fmt.label(name), "y": [stage_name], "x": [value / 1e3],
             "marker": {"color": SERIES[i % len(SERIES)]},
             "hovertemplate": f"{fmt.label(name)}: {fmt.size(value)}<extra></extra>"}
            for i, (name, value) in enumerate(parts.items())]
    layout = _layout("kB", "", height=200, barmode="stack")
    layout["yaxis"]["showticklabels"] = False
    layout["legend"].update(y=-0.55, traceorder="normal")
    layout["margin"]["b"] = 70
    total = f"; total {fmt.size(block['total'])}" if is_number(block.get("total")) else ""
    return figure(fig_id, f"{stage_name}: bytes by component", data, layout,
                  f"The artifact's parts as stored{total}.")


def _point_trace(points: list[dict], x_key: str, name: str, color: str, size: int, symbol: str = "circle",
                 line: bool = False) -> dict:
    points = sorted(points, key=lambda p: p.get(x_key) or 0) if line else points
    trace = {"type": "scatter", "mode": "lines+markers" if line else "markers", "name": name,
             "x": [p.get(x_key) for p in points], "y": [p.get("drop") for p in points],
             "text": [f"trial {p.get('trial')}" for p in points],
             "marker": {"size": size, "color": color, "symbol": symbol, "line": {"width": 1, "color": "white"}},
             "hovertemplate": "%{text}<br>" + x_key + " %{x:.4g}<br>drop %{y:.4g}<extra></extra>"}
    if line:  # the front as a staircase: what each level of cost buys
        trace["line"] = {"color": color, "width": 1.5, "shape": "hv"}
    return trace


def search(section: dict, trials: list[dict]) -> list[dict]:
    """The search in ratio space: every measured trial, the Pareto front, the chosen point, the baseline at
    (1, 0) and the constraints as lines (drop <= max_drop; the target's ratio <= budget)."""
    metric = section.get("baseline", {}).get("metric", "score")
    front, chosen = section.get("front") or [], section.get("chosen")
    relative = any(c.get("relative") for c in section.get("constraints", []))
    figures = []
    for x_key, title in (("latency_ratio", "latency"), ("size_ratio", "size")):
        data = []
        if trials:
            data.append(_point_trace(trials, x_key, "measured trials", MUTED, 7))
        data.append(_point_trace(front, x_key, "Pareto front", FRONT, 10, line=True))
        if chosen:
            data.append(_point_trace([chosen], x_key, f"chosen (trial {chosen.get('trial')})", CHOSEN, 18, "star"))
        data.append({"type": "scatter", "mode": "markers", "name": "baseline", "x": [1.0], "y": [0.0],
                     "marker": {"size": 12, "symbol": "diamond", "color": BASELINE},
                     "hovertemplate": "baseline<extra></extra>"})
        layout = _layout(f"{title} ratio to the baseline (lower is better)",
                         f"{metric} drop{' (relative)' if relative else ''} (lower is better)", height=380)
        shapes, notes = [], []
        for c in section.get("constraints", []):
            if c.get("key") == "drop" and is_number(c.get("limit")):
                shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": c["limit"], "y1": c["limit"],
                               "line": {"color": LIMIT, "dash": "dash", "width": 1.5}})
                notes.append({"xref": "paper", "x": 1, "y": c["limit"], "text": f"max_drop {c['limit']}",
                              "showarrow": False, "xanchor": "right", "yanchor": "bottom",
                              "font": {"color": LIMIT, "size": 11}})
            elif c.get("key") == x_key and is_number(c.get("limit")):
                shapes.append({"type": "line", "yref": "paper", "y0": 0, "y1": 1, "x0": c["limit"], "x1": c["limit"],
                               "line": {"color": LIMIT, "dash": "dash", "width": 1.5}})
                notes.append({"yref": "paper", "y": 1, "x": c["limit"], "text": f"budget {c['limit']}",
                              "showarrow": False, "xanchor": "left", "yanchor": "top",
                              "font": {"color": LIMIT, "size": 11}})
        layout.update(shapes=shapes, annotations=notes)
        figures.append(figure(f"fig-search-{title}", f"Search: {metric} drop vs {title}", data, layout,
                              "Validation split; the front's latencies re-measured after the search. Dashed: "
                              "the constraints."))
    return figures


def sensitivity(scores: list[dict]) -> dict | None:
    """The proxy pass: each option's output loss measured alone (no training), largest first."""
    if not scores:
        return None
    scores = sorted(scores, key=lambda s: -s["loss"])[:MAX_BARS]
    data = [{"type": "bar", "orientation": "h", "name": "output loss", "y": [s["name"] for s in scores],
             "x": [s["loss"] for s in scores], "marker": {"color": FRONT},
             "hovertemplate": "%{y}: %{x:.4g}<extra></extra>"}]
    layout = _layout("output loss against the untouched model (no training)", "",
                     height=min(90 + 24 * len(scores), 1100), showlegend=False)
    layout["yaxis"].update(autorange="reversed", ticks="", title={"text": ""})
    layout["margin"]["l"] = 10
    return figure("fig-sensitivity", "Sensitivity of each option", data, layout,
                  f"The {len(scores)} most damaging options applied alone (sensitivity.json has all).")


def breakdown(block: dict, artifact: str) -> list[dict]:
    """The final artifact's bytes by layer group (model order) and by kind of tensor (largest first)."""
    figures = []
    for key, title, fig_id in (("groups", "by layer group", "fig-size-groups"), ("kinds", "by kind", "fig-size-kinds")):
        parts = block.get(key) or {}
        if not parts:
            continue
        scale, unit = byte_unit(parts.values())
        data = [{"type": "bar", "orientation": "h", "y": list(parts), "x": [v / scale for v in parts.values()],
                 "marker": {"color": FINAL if key == "groups" else STAGE},
                 "hovertemplate": "%{y}: %{x:.4g} " + unit + "<extra></extra>"}]
        layout = _layout(unit, "", height=min(90 + 24 * len(parts), 900), showlegend=False)
        layout["yaxis"].update(autorange="reversed", ticks="", title={"text": ""})
        layout["margin"]["l"] = 10
        figures.append(figure(fig_id, f"{artifact}: bytes {title}", data, layout,
                              "Tensor bytes as stored in the file, before compression." if key == "kinds" else
                              "Module paths cut to two parts; graph constants without a module are 'other'."))
    return figures
