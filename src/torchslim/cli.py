"""The ``torchslim`` command: ``demo``, ``compress RECIPE``, ``profile SPEC``, ``auto``, ``worker``, ``report DIR``,
and the commands that run nothing: ``check RECIPE``, ``list methods|models|data``, ``schema``, ``--version``.

Exit codes: 0 success, 2 bad input (one line on stderr naming what and where; a recipe's problems one line each
under a summary line), 1 internal failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted run
removes its scratch files and keeps its training checkpoints. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    from torchslim import _cli_info

    parser.add_argument("--version", action=_cli_info.VersionAction, help="print the versions and exit")
    parser.add_argument("--no-verify", action="store_true",
                        help="load saved artifacts without checking them against their manifest.json (for files "
                             "you edited on purpose; sets TORCHSLIM_VERIFY=0)")
    _add_verbosity(parser, on_command=False)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded default: builtin:digits-cnn, prune channels -> distil -> int8")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    compress = sub.add_parser("compress", help="run a recipe (YAML)")
    compress.add_argument("recipe", help="recipe file")
    compress.add_argument("--out", default=None, help="output folder (default: out/<recipe name>)")
    compress.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe field, e.g. --set steps.0.prune.sparsity=0.6 (repeatable)")
    compress.add_argument("--dry-run", action="store_true",
                          help="validate the recipe and --out, print the resolved recipe, run nothing")
    profile = sub.add_parser("profile", help="measure one model: params, MACs, bytes, latency, memory")
    profile.add_argument("spec", help="model spec, e.g. torchvision:resnet50 or builtin:digits-cnn")
    profile.add_argument("--batch-size", type=int, default=32, help="batched latency's batch size (default 32)")
    profile.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    profile.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    auto, worker = _search_parsers(sub)
    report = sub.add_parser("report", help="rebuild report.html from report.json; several DIRs: one comparison page")
    report.add_argument("folders", nargs="+", metavar="DIR", help="output folders of torchslim runs")
    report.add_argument("--out", default=None, help="the HTML file to write (default: one DIR: DIR/report.html, "
                        "its manifest.json entry refreshed; several: comparison.html)")
    info = _cli_info.add_parsers(sub)
    for p in (demo, compress, auto):
        p.add_argument("--fresh", action="store_true",
                       help="discard training checkpoints of an interrupted earlier run instead of resuming it")
        p.add_argument("--overwrite", action="store_true",
                       help="replace --out even if no torchslim run wrote it (never the working or home folder, "
                            "a filesystem root or a folder holding the recipe)")
    for p in (demo, compress, profile, auto, worker, report, *info):
        _add_verbosity(p, on_command=True)
        p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import a plugin module (or .py file) that registers prefixes or methods; runs its "
                            "code (repeatable)")
        p.add_argument("--no-plugins", action="store_true",
                       help="do not load the installed packages' torchslim.plugins entry points")
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, on_command: bool) -> None:
    """``-v`` and ``--quiet``, accepted before the command and after it (a command's own default is SUPPRESS,
    so that it keeps what was given before the command name)."""
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if on_command else 0,
                        help="more detail: what was loaded, how long each step took")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS if on_command else False,
                        help="no progress lines or bars: warnings, errors and results only")


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
    """Progress lines: the ``torchslim`` logger's INFO level, which ``--quiet`` hides (see `_logging`)."""
    return logging.getLogger("torchslim").info


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
                  study=args.study, progress=not args.quiet, log=_log(args.quiet), fresh=args.fresh,
                  overwrite=args.overwrite, **settings)
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


def _run_recipe(recipe, out: str, args) -> None:
    from torchslim.pipeline import compress
    from torchslim.report import print_table

    report = compress(recipe, out, progress=not args.quiet, log=_log(args.quiet), fresh=args.fresh,
                      overwrite=args.overwrite)
    if report is None:  # a torchrun rank other than 0: rank 0 prints and writes
        return
    print_table(report)
    page = ", report.html" if (Path(out) / "report.html").is_file() else ""
    print(f"wrote {out}/report.json, report.md{page}, recipe.yaml and {report.get('artifact')}")


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

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from torchslim._cli_info import resolved_yaml

        sys.stdout.write(resolved_yaml(recipe))
        logging.getLogger("torchslim").info(f"dry run: {args.recipe} is valid; it would write {out} (nothing "
                                            f"was run)")
        return
    _run_recipe(recipe, out, args)


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


def _report(args) -> None:
    from torchslim.report.html import rebuild

    written = rebuild(args.folders, args.out)
    if not args.quiet:
        print(f"wrote {written}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    from torchslim import _progress
    from torchslim._logging import configure_logging
    from torchslim.errors import InputError

    configure_logging(args.verbose, args.quiet)
    _progress.set_enabled(not args.quiet)

    if args.no_verify:
        os.environ["TORCHSLIM_VERIFY"] = "0"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        from torchslim.plugins import load_plugins

        loaded = load_plugins(args.imports, entry_points=not args.no_plugins)
        logging.getLogger("torchslim").debug(f"plugins loaded: {', '.join(loaded) or 'none'}")
        from torchslim import _cli_info

        {"demo": _demo, "compress": _compress, "profile": _profile, "auto": _auto, "worker": _worker,
         "report": _report, "list": _cli_info.run_list, "check": _cli_info.run_check,
         "schema": _cli_info.run_schema}[args.command](args)
    except InputError as error:
        print(f"torchslim: error: {_error_text(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`torchslim list methods | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141
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


def _error_text(error: BaseException) -> str:
    """A recipe's problems one per line under a summary line (see `RecipeError`); any other error on one line."""
    from torchslim.errors import RecipeError

    return str(error) if isinstance(error, RecipeError) else _one_line(error)


def _one_line(error: BaseException) -> str:
    """The message on one line (an error re-raised from a worker process carries its traceback below it)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
