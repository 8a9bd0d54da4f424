"""Benchmark JSON to markdown: `python benchmarks/render.py JSON [JSON ...] [--out PATH] [--columns a,b]`.

Each file (written by a benchmark's ``--json``, in the layout of `_common.py`) becomes a section headed with the
benchmark's name, the date and the machine (CPU model, ISA flags, threads, torch version), the command that
reproduces it, a table of its rows (one table per ``part`` where rows carry one) and its goals. Without
``--out`` the page is printed. The documentation's results page is generated this way::

    python benchmarks/render.py bench-results/*.json --out docs/benchmark-results.md
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ArgumentParser, comma_list, layout_problems  # noqa: E402

TITLE = "Benchmark results"
# Flags that do not change what is measured, left out of the reproducing command.
NOT_REPRODUCED = ("json",)


def cell(value) -> str:
    """A value as a table cell: floats to 4 significant digits, counts grouped by thousands, lists joined."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def isa_summary(flags: list[str]) -> str:
    """``["avx2", "avx512f", "avx512_vnni", "amx_int8"]`` -> ``"AVX2, AVX-512 F/VNNI, AMX INT8"``."""
    if not flags:
        return "no AVX2/AVX-512/AMX"
    groups: dict[str, list[str]] = {}
    for flag in flags:
        if flag.startswith("avx512"):
            groups.setdefault("AVX-512", []).append(flag[6:].lstrip("_").upper())
        elif flag.startswith("amx"):
            groups.setdefault("AMX", []).append(flag[3:].lstrip("_").upper())
        else:
            groups.setdefault({"avx2": "AVX2", "avx_vnni": "AVX-VNNI"}.get(flag, flag.upper()), [])
    first = {"AVX-512": "F", "AMX": "INT8"}  # the foundation first, then the rest as sorted
    rank = ["AVX2", "AVX-VNNI", "AVX-512", "AMX"]
    names = sorted(groups, key=lambda name: (rank.index(name) if name in rank else len(rank), name))
    return ", ".join(name + (" " + "/".join(sorted(groups[name], key=lambda s: (s != first.get(name), s)))
                             if groups[name] else "") for name in names)


def machine(env: dict) -> str:
    parts = [env.get("cpu", "unknown CPU"), isa_summary(env.get("isa_flags", env.get("cpu_int8_features", []))),
             f"{env.get('threads', '?')} threads", f"torch {env.get('torch', '?')}"]
    if env.get("torchslim"):
        parts.append(f"torchslim {env['torchslim']}" + (f" ({env['git_commit']})" if env.get("git_commit") else ""))
    load = env.get("load_average")
    if load:  # the 1-minute averages: a load above the CPU count means the run shared the machine
        parts.append(f"load {load['start'][0]:g} → {load['end'][0]:g}"
                     + (f" on {env['cpus']} CPUs" if env.get("cpus") else "") + " (start → end)")
    return " · ".join(parts)


def command(payload: dict) -> str:
    words = [f"python benchmarks/{payload['benchmark']}.py"]
    for key, value in payload["args"].items():
        flag = "--" + key.replace("_", "-")
        if key in NOT_REPRODUCED or value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words.append(f"{flag} {json.dumps(text) if not text or ' ' in text else text}")
    return " ".join(words)


def table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if columns:
        keys = [k for k in columns if k in keys] or keys
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
    return lines


def section(payload: dict, source: str, columns: list[str] | None = None) -> list[str]:
    date = payload["date"].replace("T", " ")[:16] + " UTC"
    lines = [f"## {payload['benchmark']}", "", f"**{date}** · {machine(payload['environment'])}", "",
             f"`{command(payload)}` (from `{source}`)", ""]
    parts: dict = {}
    for row in payload["rows"]:
        parts.setdefault(row.get("part"), []).append({k: v for k, v in row.items() if k != "part"})
    for part, rows in parts.items():
        if part is not None and len(parts) > 1:
            lines += [f"### {payload['benchmark']}: {part}", ""]
        lines += table(rows, columns) + [""]
    if not payload["rows"]:
        lines += ["(no rows)", ""]
    if payload["goals"]:
        lines += ["| goal | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {cell(g['goal'])} | {cell(g['value'])} | {cell(g['target'])} | "
                  f"{'met' if g['met'] else '**missed**'} |" for g in payload["goals"]]
        lines.append("")
    return lines


def render(payloads: list[tuple[str, dict]], columns: list[str] | None = None) -> str:
    sources = ", ".join(f"`{source}`" for source, _ in payloads)
    lines = [f"# {TITLE}", "",
             f"<!-- Generated by benchmarks/render.py from {sources}: regenerate it, do not edit it. -->", "",
             "Generated from the benchmarks' JSON (`--json PATH`) by `python benchmarks/render.py JSON ... --out "
             "docs/benchmark-results.md`. Each section names its machine, its date and the command that produced "
             "it; latencies move with machine load, so compare ratios within one section.", ""]
    for source, payload in payloads:
        lines += section(payload, source, columns)
    return "\n".join(lines).rstrip("\n") + "\n"


def load(path: str) -> dict:
    """One benchmark JSON file, or exit 2 with one line naming the file and what is wrong."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        payload, problems = None, [str(error)]
    else:
        problems = layout_problems(payload)
        problems = ["not a benchmark JSON file (" + "; ".join(problems[:3]) + ")"] if problems else []
    if problems:
        print(f"render.py: {path}: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)
    return payload


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", metavar="JSON", help="benchmark JSON files, rendered in this order")
    p.add_argument("--out", default=None, metavar="PATH", help="write the page here (default: print it)")
    p.add_argument("--columns", type=comma_list(), default=None, metavar="A,B",
                   help="only these columns, in this order, where a table has them (default: all)")
    args = p.parse_args(argv)
    page = render([(path, load(path)) for path in args.files], args.columns)
    if args.out is None:
        sys.stdout.write(page)
        return
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page)
    os.replace(partial, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
