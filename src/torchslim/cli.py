"""The ``torchslim`` command: ``demo``, ``compress RECIPE``, ``profile SPEC``, ``auto``, ``worker``.

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
    auto, worker = _search_parsers(sub)
    for p in (demo, compress, auto):
        p.add_argument("--fresh", action="store_true",
                       help="discard training checkpoints of an interrupted earlier run instead of resuming it")
    for p in (demo, compress, profile, auto, worker):
        p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _search_parsers(sub) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    auto = sub.add_parser("auto", help="search compression plans under a budget; writes the Pareto front and best/")
    auto.add_argument("specs", nargs="+", metavar="SPEC",
                      help="MODEL_SPEC DATA_SPEC, or a recipe with a search: section")
    auto.add_argument("--out", default=None, help="output folder (default: out/auto-<model>)")
    auto.add_argument("--max-drop", type=float, default=None, help="metric drop allowed (relative for perplexity)")
    auto.add_argument("--target", choices=("latency", "size", "macs"), default=None, help="the cost --budget limits")
    auto.add_argument("--budget", type=float, default=None, help="the target's limit, a fraction of the baseline's")
    auto.add_argument("--runtime", choices=("auto", "onnxruntime", "torch"), default=None,
                      help="where latency is measured (auto: each candidate's own runtime)")
    auto.add_argument("--trials", type=int, default=None, help="full evaluations, all workers together")
    auto.add_argument("--time-budget", default=None, help="stop starting trials after this long (e.g. 30m, 2h)")
    auto.add_argument("--workers", type=int, default=None, help="local worker processes")
    auto.add_argument("--storage", default=None, help="journal file or RDB URL of the study (default: a journal "
                      "file in the output folder)")
    auto.add_argument("--study", default=None, help="the study's name (default: torchslim-<out folder name>)")
    auto.add_argument("--sampler", choices=("tpe", "random"), default=None, help="search engine (default tpe)")
    auto.add_argument("--seed", type=int, default=None, help="recipe and sampler seed")
    auto.add_argument("--batch-size", type=int, default=None, help="batched latency's batch size")
    worker = sub.add_parser("worker", help="join a torchslim auto study from this machine")
    worker.add_argument("--storage", required=True, help="the study's storage (journal file or RDB URL)")
    worker.add_argument("--study", required=True, help="the study's name")
    worker.add_argument("--workdir", default=None, help="where this worker keeps trial files (default: a temp folder)")
    worker.add_argument("--threads", type=int, default=0, help="torch threads while building (0: all cores)")
    worker.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)  # the sampler seed's offset
    worker.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # see start_local_workers
    return auto, worker


def _log(quiet: bool):
    return (lambda *a, **k: None) if quiet else (lambda msg: print(f"torchslim: {msg}", file=sys.stderr, flush=True))


def _auto(args) -> None:
    from torchslim.errors import InputError
    from torchslim.search import auto

    if len(args.specs) > 2:
        raise InputError(f"auto: expected MODEL_SPEC DATA_SPEC or one recipe file, got {len(args.specs)} arguments")
    recipe = args.specs[0] if len(args.specs) == 1 else None
    model, data = (args.specs + [None])[:2] if recipe is None else (None, None)
    for flag, value in (("--trials", args.trials), ("--workers", args.workers), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag}: must be >= 1, got {value}")
    settings = {"max_drop": args.max_drop, "target": args.target, "budget": args.budget, "runtime": args.runtime,
                "trials": args.trials, "time_budget": args.time_budget, "workers": args.workers,
                "storage": args.storage, "sampler": args.sampler}
    report = auto(model, data, args.out, recipe=recipe, seed=args.seed, batch_size=args.batch_size,
                  study=args.study, progress=not args.quiet, log=_log(args.quiet), fresh=args.fresh, **settings)
    search = report["search"]
    print(search["message"])
    chosen = search["chosen"]
    if chosen:
        print(f"chosen: trial {chosen['trial']}, drop {chosen['drop']}, latency {chosen['latency_ratio']}x, "
              f"size {chosen['size_ratio']}x -> {chosen['recipe']}")


def _worker(args) -> None:
    import tempfile

    from torchslim.search.study import open_storage
    from torchslim.search.worker import run_worker, signal_ready

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="torchslim-worker-"))
    storage = open_storage(args.storage, workdir / "journal.log")
    ran = run_worker(storage, args.study, workdir, index=args.index, compute_threads=args.threads,
                     log=_log(args.quiet), ready=signal_ready(args.ready_fd))
    print(f"worker ran {ran} trials of study {args.study}")


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
        {"demo": _demo, "compress": _compress, "profile": _profile, "auto": _auto,
         "worker": _worker}[args.command](args)
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
