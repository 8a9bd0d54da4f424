"""The ``torchslim`` command: ``demo``, ``compress RECIPE``, ``profile SPEC``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what and where), 1 internal failure, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); an interrupted run removes its scratch files and keeps its training checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds (and cleans up) exactly like Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Make PyTorch models smaller and faster, "
                                     "recover their accuracy, and prove it with measured numbers.")
    parser.add_argument("--no-verify", action="store_true",
                        help="load saved artifacts without checking them against their manifest.json (for files "
                             "you edited on purpose; sets TORCHSLIM_VERIFY=0)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded default: builtin:digits-cnn, prune channels -> distil -> int8")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    compress = sub.add_parser("compress", help="run a recipe (YAML)")
    compress.add_argument("recipe", help="recipe file")
    compress.add_argument("--out", default=None, help="output folder (default: out/<recipe name>)")
    compress.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe field, e.g. --set steps.0.prune.sparsity=0.6 (repeatable)")
    profile = sub.add_parser("profile", help="measure one model: params, MACs, bytes, latency, memory")
    profile.add_argument("spec", help="model spec, e.g. torchvision:resnet50 or builtin:digits-cnn")
    profile.add_argument("--batch-size", type=int, default=32, help="batched latency's batch size (default 32)")
    profile.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    profile.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    for p in (demo, compress):
        p.add_argument("--fresh", action="store_true",
                       help="discard training checkpoints of an interrupted earlier run instead of resuming it")
        p.add_argument("--overwrite", action="store_true",
                       help="replace --out even if no torchslim run wrote it (never the working or home folder, "
                            "a filesystem root or a folder holding the recipe)")
    for p in (demo, compress, profile):
        p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _run_recipe(recipe, out: str, args) -> None:
    from torchslim.pipeline import compress
    from torchslim.report import print_table

    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(f"torchslim: {msg}", file=sys.stderr))
    report = compress(recipe, out, progress=not args.quiet, log=log, fresh=args.fresh, overwrite=args.overwrite)
    if report is None:  # a torchrun rank other than 0: rank 0 prints and writes
        return
    print_table(report)
    print(f"wrote {out}/report.json, report.md, recipe.yaml and {report.get('artifact')}")


def _check_out(out: str, args, recipe: str | None = None) -> None:
    """Refuse a bad ``--out`` at once, before the recipe's imports (torch) and any work: `compress` checks again."""
    from torchslim._output import check_output_dir

    check_output_dir(out, overwrite=args.overwrite, protect=[recipe] if recipe and Path(recipe).is_file() else [])


def _demo(args) -> None:
    _check_out(args.out, args)
    from torchslim.defaults import DEMO_RECIPE
    from torchslim.recipe import apply_overrides, load_yaml, parse_recipe

    raw = apply_overrides(load_yaml(DEMO_RECIPE, "demo"), args.set)
    _run_recipe(parse_recipe(raw, source="demo"), args.out, args)


def _compress(args) -> None:
    out = args.out or f"out/{Path(args.recipe).stem}"
    _check_out(out, args, args.recipe)
    from torchslim.recipe import load_recipe

    _run_recipe(load_recipe(args.recipe, args.set), out, args)


def _profile(args) -> None:
    from torchslim._config import LIMITS
    from torchslim.errors import InputError
    from torchslim.profile import profile_model

    if not 1 <= args.batch_size <= LIMITS["batch_size"]:
        raise InputError(f"--batch-size: must be in [1, {LIMITS['batch_size']:,}], got {args.batch_size:,}")
    if not 0 <= args.threads <= LIMITS["threads"]:
        raise InputError(f"--threads: must be in [0, {LIMITS['threads']:,}], got {args.threads:,}")
    result = profile_model(args.spec, batch_size=args.batch_size, threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"torchslim profile: {args.spec}")
    table.add_column("measure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    from torchslim.errors import InputError

    if args.no_verify:
        os.environ["TORCHSLIM_VERIFY"] = "0"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        {"demo": _demo, "compress": _compress, "profile": _profile}[args.command](args)
    except InputError as error:
        print(f"torchslim: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        what = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"torchslim: {what}; scratch files removed, training checkpoints kept: rerun the same command "
              f"to resume", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except Exception as error:  # an internal failure: show the traceback for the bug report
        import traceback

        traceback.print_exc()
        print(f"torchslim: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        distributed = sys.modules.get("torchslim.recover.distributed")  # imported (with torch) by a run only
        if distributed is not None:
            distributed.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _one_line(error: BaseException) -> str:
    """The message on one line (an error re-raised from a worker process carries its traceback below it)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
