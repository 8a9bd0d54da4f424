"""The ``torchslim`` command: ``demo``, ``compress RECIPE``, ``profile SPEC``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what and where), 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Make PyTorch models smaller and faster, "
                                     "recover their accuracy, and prove it with measured numbers.")
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
    for p in (demo, compress, profile):
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import a plugin module (or .py file) that registers prefixes or methods; runs its "
                            "code (repeatable)")
        p.add_argument("--no-plugins", action="store_true",
                       help="do not load the installed packages' torchslim.plugins entry points")
    return parser


def _run_recipe(recipe, out: str, quiet: bool, fresh: bool) -> None:
    from torchslim.pipeline import compress
    from torchslim.report import print_table

    log = (lambda *a, **k: None) if quiet else (lambda msg: print(f"torchslim: {msg}", file=sys.stderr))
    report = compress(recipe, out, progress=not quiet, log=log, fresh=fresh)
    if report is None:  # a torchrun rank other than 0: rank 0 prints and writes
        return
    print_table(report)
    print(f"wrote {out}/report.json, report.md, recipe.yaml and {report.get('artifact')}")


def _demo(args) -> None:
    import yaml

    from torchslim.defaults import DEMO_RECIPE
    from torchslim.recipe import apply_overrides, parse_recipe

    raw = apply_overrides(yaml.safe_load(DEMO_RECIPE), args.set)
    _run_recipe(parse_recipe(raw, source="demo"), args.out, args.quiet, args.fresh)


def _compress(args) -> None:
    from torchslim.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    _run_recipe(recipe, args.out or f"out/{Path(args.recipe).stem}", args.quiet, args.fresh)


def _profile(args) -> None:
    from torchslim.errors import InputError
    from torchslim.profile import profile_model

    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.threads < 0:
        raise InputError(f"--threads: must be >= 0, got {args.threads}")
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

    try:
        from torchslim.plugins import load_plugins

        load_plugins(args.imports, entry_points=not args.no_plugins)
        {"demo": _demo, "compress": _compress, "profile": _profile}[args.command](args)
    except InputError as error:
        print(f"torchslim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchslim: interrupted (training checkpoints are kept: rerun the same command to resume)",
              file=sys.stderr)
        return 130
    except Exception as error:  # an internal failure: show the traceback for the bug report
        import traceback

        traceback.print_exc()
        print(f"torchslim: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        from torchslim.recover import distributed

        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
