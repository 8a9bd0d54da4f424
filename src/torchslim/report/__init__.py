"""The report: ``report.json`` (schema ``torchslim.report/1``), ``report.md`` and the table printed at the end.

Contract (later versions extend it, never break it): top level ``{"schema", "recipe", "stages", ...}``; each
stage has ``name, params, macs, size_bytes, latency_ms_bs1, latency_ms_batch, batch_size, runtime, metric,
score``; the first stage is ``baseline`` and the last is the final artifact.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import yaml

from torchslim.measure.stage import LOWER_IS_BETTER

SCHEMA = "torchslim.report/1"


def _ratios(stage: dict, base: dict) -> dict:
    def div(a, b):
        return round(a / b, 4) if a and b else None

    return {
        "params": div(stage["params"], base["params"]),
        "params_nonzero": div(stage["params_nonzero"], base["params_nonzero"]),
        "macs": div(stage["macs"], base["macs"]),
        "size_reduction": div(base["size_bytes"], stage["size_bytes"]),
        "size_reduction_raw": div(base["size_bytes_raw"], stage["size_bytes_raw"]),
        "speedup_bs1": div(base["latency_ms_bs1"], stage["latency_ms_bs1"]),
        "speedup_batch": div(base["latency_ms_batch"], stage["latency_ms_batch"]),
        "score_delta": round(stage["score"] - base["score"], 6),
        "score_ratio": div(stage["score"], base["score"]),
    }




def _score_change(stage: dict) -> str:
    metric, ratios = stage["metric"], stage["ratios"]
    if metric in LOWER_IS_BETTER:
        return f"{metric} {(ratios['score_ratio'] - 1) * 100:+.2f}%" if ratios["score_ratio"] else f"{metric} n/a"
    points = metric in ("accuracy", "agreement")
    return f"{metric} {ratios['score_delta'] * (100 if points else 1):+.2f}{' pts' if points else ''}"


def git_commit() -> str | None:
    """The commit of the torchslim source that runs (``-dirty`` when tracked files differ from it), or None for
    an installed package or where git is missing."""
    import subprocess

    source = Path(__file__).resolve().parents[1]
    if not any((folder / ".git").exists() for folder in source.parents):
        return None
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=5)

        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("-dirty" if git("diff", "--quiet", "HEAD", "--", ".").returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


# Packages whose version can move a figure, recorded where installed (read from their metadata, not imported).
VERSIONED_PACKAGES = ("torchvision", "torchao", "transformers", "onnx", "timm", "optuna", "safetensors", "numpy")


def environment(threads: int) -> dict:
    """The machine and software a figure was measured with: CPU model and ISA flags, threads, OS, and the versions
    of Python, torch, torchslim and the installed packages of `VERSIONED_PACKAGES` and ONNX Runtime."""
    from importlib import metadata

    import torch

    from torchslim._version import __version__
    from torchslim.core.cpu import cpu_model, int8_features, isa_flags

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "cpu": cpu_model(), "cpu_int8_features": int8_features(),
           "isa_flags": isa_flags(), "os": platform.platform(), "torchslim": __version__}
    for package in VERSIONED_PACKAGES:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        env["git_commit"] = commit
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


def build_report(recipe, stages: list[dict], context) -> dict:
    """Assemble the report dict from measured stage records (dropping their live outputs)."""
    clean = [{k: v for k, v in stage.items() if not k.startswith("_")} for stage in stages]
    for stage in clean:
        stage["ratios"] = _ratios(stage, clean[0])
    return {
        "schema": SCHEMA,
        "recipe": recipe.to_dict(),
        "stages": clean,
        "skipped": dict(context.skipped),
        "notes": list(context.bundle.notes) + list(context.data.notes),
        "data": context.data.describe(),
        "environment": environment(context.threads),
    }


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


COLUMNS = ("stage", "runtime", "params", "MACs", "size", "size raw", "lat bs1", "lat batch", "peak mem", "metric",
           "vs baseline")


def table_rows(report: dict) -> list[list[str]]:
    """One row of formatted cells per stage (shared by the markdown and the terminal table)."""
    rows = []
    for s in report["stages"]:
        r = s["ratios"]
        nonzero = f" ({s['params_nonzero'] / 1e6:.3f} M nz)" if s["params_nonzero"] != s["params"] else ""
        rows.append([
            s["name"], s["runtime"], f"{s['params'] / 1e6:.3f} M{nonzero}", f"{s['macs'] / 1e6:.1f} M",
            _mb(s["size_bytes"]), _mb(s["size_bytes_raw"]), f"{s['latency_ms_bs1']:.3f} ms",
            f"{s['latency_ms_batch']:.2f} ms @{s['batch_size']}", _mb(s["peak_memory_bytes"]),
            f"{s['metric']} {s['score']:.4f}",
            f"size {_x(r['size_reduction'])}, bs1 {_x(r['speedup_bs1'])}, batch {_x(r['speedup_batch'])}, "
            f"{_score_change(s)}",
        ])
    return rows


def spec_of(entry) -> str:
    """The spec of a recipe's model/data entry (a spec string, or a mapping with ``spec``)."""
    return entry.get("spec", "?") if isinstance(entry, dict) else str(entry)


def _fidelity(stage: dict) -> str:
    """Agreement with the baseline beyond the headline (classification stages): on confident samples, top-5, KL."""
    m = stage.get("metrics") or {}
    if "top5_agreement" not in m:
        return ""
    confident = (f"{m['confident_agreement']:.4f} on the {int(m['confident_samples'])} samples where the baseline's "
                 f"top-1 leads its top-2 by more than {m['confident_margin']}" if "confident_agreement" in m
                 else f"no sample with a baseline margin above {m['confident_margin']}")
    return f" agreement {m['agreement']:.4f}, {confident}, top-5 {m['top5_agreement']:.4f}, KL {m['kl']:.4g} nats;"


def to_markdown(report: dict) -> str:
    lines = ["# torchslim report", "", f"model `{spec_of(report['recipe']['model'])}` on data `{spec_of(report['recipe']['data'])}`, "
             f"{report['environment']['threads']} threads, {report['environment']['cpu']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += ["", "size: the artifact deflate-compressed (what is stored and shipped); size raw: the file as written.",
              "Latency: median of repeated runs after warm-up; MACs per sample; ratios against the baseline."]
    lines += ["", "## Stages in detail", ""]
    for stage in report["stages"]:
        resident = stage.get("resident_param_bytes")
        facts = json.dumps(stage.get("details") or {}, sort_keys=True, default=str)
        facts = facts if len(facts) <= 800 else facts[:800] + " ...(report.json has all)"
        lines.append(f"- **{stage['name']}**: parameters resident {_mb(resident)};{_fidelity(stage)} details `{facts}`")
    if report["skipped"]:
        lines += ["", "## Left as they were", ""] + [f"- `{k}`: {v}" for k, v in report["skipped"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def print_table(report: dict, console=None) -> None:
    """Print the stage table to the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"torchslim: {spec_of(report['recipe']['model'])} on {spec_of(report['recipe']['data'])}")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)


def write_outputs(directory: Path, report: dict, recipe, final, context=None, log=None) -> None:
    """report.json, report.md, report.html (`torchslim.report.html`; skipped with a ``log`` line where jinja2 or
    plotly is missing), recipe.yaml (as resolved), the final artifact and the artifacts other tools load
    (`torchslim.export.write_exports`, with the run's ``context``) into ``directory``."""
    from torchslim.report.html import write_report_html

    artifact = final.save(directory)
    umask = os.umask(0)
    os.umask(umask)
    artifact.chmod(0o666 & ~umask)  # some writers create private files; the artifact is an ordinary output
    report["artifact"] = artifact.name
    try:
        from torchslim.report._sizes import artifact_breakdown

        breakdown = artifact_breakdown(artifact)
    except Exception:  # report.html's size chart only: an unreadable header must not fail the run
        breakdown = None
    if breakdown:
        report["size_breakdown"] = breakdown
    if context is not None:
        from torchslim.export import write_exports

        report["exports"] = write_exports(directory, final, context, recipe.export, report)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(to_markdown(report))
    write_report_html(directory, report, log)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
