"""A stage's ``details`` (whatever its method recorded) sorted into what report.html can show: facts, per-layer
tables and bar charts, training curves and the artifact's bytes by component.

Methods add details freely, so this reads their shapes rather than a schema: a mapping of layer names to numbers
becomes a bar chart, to short mappings a table row per layer, a list of numbers under a ``loss`` key a training
curve. Nothing is dropped: what fits no shape is shown as JSON.
"""

from __future__ import annotations

import json
import math

from torchslim.report import _format as fmt

# Keys whose mapping is per layer even when it is short (a tiny model has two or three layers).
LAYER_KEYS = ("removed_channels", "ranks", "full_ranks", "retained_energy", "sensitive_float_nodes_db",
              "float_layers", "layers", "bits_per_layer", "embedding_tables", "mixed_dimensions", "lookup_counts")
# Mappings of an artifact's components to their bytes.
SIZE_KEYS = ("bytes",)
# The longest list of scalars shown inline; longer ones go to the JSON block.
INLINE_ITEMS = 12


def is_number(item) -> bool:
    return isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)


def _scalar(item) -> bool:
    return item is None or isinstance(item, (str, bool, int, float))


def _numbers(item) -> bool:
    return isinstance(item, list) and len(item) > 0 and all(is_number(v) for v in item)


def _per_layer(key: str, item: dict) -> bool:
    named = any("." in str(k) or "/" in str(k) for k in item)
    return key in LAYER_KEYS or len(item) >= 6 or named


def curves(details: dict, prefix: str = "") -> list[dict]:
    """Training curves: ``[{"name", "values"}]`` from every list of numbers under a key naming a loss or a
    validation metric, nested mappings (``loss_terms``, ``centroid_finetune``) and lists of runs included."""
    found = []
    for key, item in details.items():
        name = f"{prefix}{key}"
        curve_key = "loss" in key or key in ("val_metric",)
        if curve_key and _numbers(item) and len(item) >= 1:
            found.append({"name": name, "values": item, "axis": "y2" if "metric" in key else "y"})
        elif curve_key and isinstance(item, list) and item and all(_numbers(v) for v in item):
            found += [{"name": f"{name} {i + 1}", "values": v, "axis": "y"} for i, v in enumerate(item)]
        elif isinstance(item, dict) and not prefix:
            if key == "loss_terms":
                found += [{"name": f"{k}", "values": v, "axis": "y"} for k, v in item.items() if _numbers(v)]
            else:
                found += curves(item, prefix=f"{key}: ")
    return found


def _curve_keys(details: dict) -> set[str]:
    used = {k for k, v in details.items() if ("loss" in k or k == "val_metric") and isinstance(v, list)}
    nested = {k for k, v in details.items() if isinstance(v, dict) and k != "loss_terms" and curves(v)
              and all(("loss" in kk or kk == "val_metric" or _scalar(vv)) for kk, vv in v.items())}
    return used | nested | ({"loss_terms"} if "loss_terms" in details else set())


def _table_of_mappings(title: str, item: dict) -> dict:
    columns = []
    for row in item.values():
        columns += [k for k in row if k not in columns]
    rows = [[str(name)] + [fmt.value(row.get(c)) for c in columns] for name, row in item.items()]
    return {"title": title, "columns": ["layer"] + [fmt.label(c) for c in columns], "rows": rows}


# Titles of the per-layer charts whose key alone says too little.
TITLES = {"removed_channels": "Channels removed", "ranks": "Rank kept (of the full rank)",
          "retained_energy": "Energy retained", "sensitive_float_nodes_db": "SQNR lost, layers kept float (dB)"}


def _title(key: str, details: dict) -> str:
    if key == "layers" and "sparsity" in details:  # magnitude pruning: each weight's share of zeros
        return "Sparsity per layer"
    return TITLES.get(key, fmt.label(key))


def _bars(key: str, item: dict, details: dict) -> dict:
    series = [{"name": fmt.label(key), "values": [item[n] for n in item]}]
    full = details.get(f"full_{key}")
    if isinstance(full, dict) and set(full) == set(item) and all(is_number(v) for v in full.values()):
        series.insert(0, {"name": fmt.label(f"full_{key}"), "values": [full[n] for n in item], "background": True})
    return {"title": _title(key, details), "key": key, "names": [str(n) for n in item], "series": series}


def _merge_tables(numeric: dict[str, dict]) -> list[dict]:
    """Numeric per-layer mappings over the same layers as one table (ranks, full ranks and energy side by side)."""
    groups: dict[tuple, list[str]] = {}
    for key, item in numeric.items():
        groups.setdefault(tuple(item), []).append(key)
    tables = []
    for names, keys in groups.items():
        rows = [[str(n)] + [fmt.value(numeric[k][n]) for k in keys] for n in names]
        tables.append({"title": " · ".join(fmt.label(k) for k in keys), "columns": ["layer"] +
                       [fmt.label(k) for k in keys], "rows": rows})
    return tables


def classify(details: dict | None) -> dict:
    """Sort ``details`` into ``facts`` ([(label, text)]), ``bars``, ``tables``, ``sizes`` (component -> bytes),
    ``curves`` and ``rest`` (JSON text of what fits none, or "")."""
    details = details if isinstance(details, dict) else {}
    out = {"facts": [], "bars": [], "tables": [], "sizes": [], "curves": curves(details), "rest": ""}
    skip, numeric, rest = _curve_keys(details), {}, {}
    for key, item in details.items():
        if key in skip:
            scalars = {k: v for k, v in item.items() if _scalar(v)} if isinstance(item, dict) else {}
            if scalars and key != "loss_terms":  # a nested training run's own facts (steps, seconds)
                out["facts"].append((fmt.label(key), " · ".join(f"{k} {fmt.value(v)}" for k, v in scalars.items())))
            continue
        if _scalar(item):
            out["facts"].append((fmt.label(key), fmt.value(item)))
        elif isinstance(item, (dict, list)) and not item:
            out["facts"].append((fmt.label(key), "none"))
        elif isinstance(item, list) and all(_scalar(v) for v in item) and len(item) <= INLINE_ITEMS:
            out["facts"].append((fmt.label(key), ", ".join(fmt.value(v) for v in item) or "none"))
        elif isinstance(item, dict) and item and key in SIZE_KEYS and all(is_number(v) for v in item.values()):
            out["sizes"].append({"title": fmt.label(key), "parts": {k: v for k, v in item.items() if k != "total"},
                                 "total": item.get("total")})
        elif isinstance(item, dict) and item and all(is_number(v) for v in item.values()) and _per_layer(key, item):
            numeric[key] = item
        elif isinstance(item, dict) and item and all(_scalar(v) for v in item.values()) and _per_layer(key, item):
            out["tables"].append({"title": fmt.label(key), "columns": ["layer", fmt.label(key)],
                                  "rows": [[str(k), fmt.value(v)] for k, v in item.items()]})
        elif isinstance(item, dict) and item and all(_scalar(v) for v in item.values()):
            out["facts"].append((fmt.label(key), " · ".join(f"{k} {fmt.value(v)}" for k, v in item.items())))
        elif isinstance(item, dict) and item and all(isinstance(v, dict) and all(_scalar(x) for x in v.values())
                                                     for v in item.values()):
            out["tables"].append(_table_of_mappings(fmt.label(key), item))
        elif isinstance(item, list) and item and all(isinstance(v, dict) and all(_scalar(x) for x in v.values())
                                                     for v in item):
            out["tables"].append(_table_of_mappings(fmt.label(key), {i + 1: v for i, v in enumerate(item)}))
        else:
            rest[key] = item
    out["bars"] = [_bars(k, v, details) for k, v in numeric.items()
                   if not (k.startswith("full_") and k[5:] in numeric)]
    out["tables"] = _merge_tables(numeric) + out["tables"]
    out["rest"] = json.dumps(rest, indent=1, sort_keys=True, default=str) if rest else ""
    return out
