"""Fuzzing record of every artifact reader: `python benchmarks/fuzz.py [--cases N] [--seed S] [--parts a,b]
[--json PATH]` (the parts are the readers).

For each reader (`torchslim._fuzz.READERS`: pruned, factorized, weight-only, compact .tslim, ONNX, training
checkpoint) it builds one small valid artifact, then loads N damaged copies (one file each: a bit flip, a
truncation, appended bytes, or a crafted JSON document / header with its framing made right), twice: with the
manifest checked (the default) and with ``verify=False`` (a user who edited files on purpose). It counts the
outcomes (rejected with ArtifactError / loaded identical / loaded different / crash) and prints a table.

Goals (issue 16): with verification, every damaged file is rejected (0 loaded-different, 0 crash); without it,
0 crashes (a flipped weight byte may then load unseen: what the manifest is for).
"""

from __future__ import annotations

import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import apply_threads, goal, parser, write_results  # noqa: E402

from torchslim._fuzz import KINDS, OUTCOMES, READERS, Pristine  # noqa: E402


def fuzz_reader(name: str, cases: int, seed: int) -> dict:
    reader = READERS[name]
    started = time.perf_counter()
    pristine = Pristine(reader)
    rng = random.Random(seed)
    result = {"reader": name, "files": list(reader.files)}
    for verify in (True, False):
        files = reader.files if verify else tuple(f for f in reader.files if f != "manifest.json")
        counts = collections.Counter()
        by_kind = {kind: collections.Counter() for kind in KINDS}
        examples = []
        for _ in range(cases):
            file, kind = rng.choice(files), rng.choice(KINDS)
            outcome, message = pristine.case(file, kind, rng, verify=verify)
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            if outcome == "crash" or (verify and outcome == "loaded-different"):
                examples.append({"file": file, "damage": kind, "outcome": outcome, "message": message})
        result["verified" if verify else "unverified"] = {
            "cases": cases, "outcomes": {o: counts[o] for o in OUTCOMES},
            "by_damage": {k: {o: c[o] for o in OUTCOMES if c[o]} for k, c in by_kind.items()},
            "failures": examples[:5]}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _table(results: list[dict]) -> None:
    header = f"{'reader':<12} {'mode':<10} {'cases':>6} " + " ".join(f"{o:>17}" for o in OUTCOMES)
    print(header)
    print("-" * len(header))
    for result in results:
        for mode in ("verified", "unverified"):
            row = result[mode]
            print(f"{result['reader']:<12} {mode:<10} {row['cases']:>6} "
                  + " ".join(f"{row['outcomes'][o]:>17}" for o in OUTCOMES))


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=None, seed=0, parts=sorted(READERS))
    p.add_argument("--cases", type=int, default=200, help="damaged copies per reader and mode (default 200)")
    args = p.parse_args()
    apply_threads(args)
    results = [fuzz_reader(name, args.cases, args.seed) for name in args.parts]
    _table(results)
    verified_bad = sum(r["verified"]["outcomes"]["loaded-different"] + r["verified"]["outcomes"]["crash"]
                       + r["verified"]["outcomes"]["loaded-identical"] for r in results)
    crashes = sum(r["unverified"]["outcomes"]["crash"] for r in results)
    goals = [goal("damaged files not rejected, with the manifest", verified_bad, "0", verified_bad == 0),
             goal("crashes (tracebacks), without the manifest", crashes, "0", crashes == 0)]
    rows = [{"reader": r["reader"], "mode": mode, "cases": r[mode]["cases"], **r[mode]["outcomes"]}
            for r in results for mode in ("verified", "unverified")]
    write_results(args, rows, goals, {"readers": results})


if __name__ == "__main__":
    main()
