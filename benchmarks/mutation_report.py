"""Print the kill rate per module of the last `make mutate` run.

Reads the per-file result files mutmut leaves under mutants/ (``<path>.meta``, JSON with
``exit_code_by_key``) and classifies each exit code the way mutmut's own ``stats.py`` does.
Kill rate = (killed + timeout) / (all mutants that were run). Mutants not yet run are counted
apart, so a partial run shows what it covered. It does not run mutmut; ``make mutate`` does.
Usage: python benchmarks/mutation_report.py [--survivors] [--names FILE] [MUTANTS_DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Literal

Status = Literal["killed", "survived", "timeout", "no tests", "skipped", "not checked", "suspicious"]

# mutmut's exit-code meanings (mutmut/stats.py status_by_exit_code), reduced to what the rate needs.
_BY_CODE: dict[int | None, Status] = {
    1: "killed", 3: "killed", 37: "killed",
    0: "survived",
    5: "no tests", 33: "no tests",
    34: "skipped",
    None: "not checked",
    36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
}


def classify(code: int | None) -> Status:
    """The status mutmut gives an exit code (anything unknown is 'suspicious')."""
    return _BY_CODE.get(code, "suspicious")


def module_counts(meta: Path, only: set[str] | None = None) -> tuple[Counter[Status], list[str]]:
    """Status counts and the names of surviving mutants for one ``<path>.meta`` file (of the
    mutants named in ``only`` when given)."""
    data = json.loads(meta.read_text())
    codes: dict[str, int | None] = {k: v for k, v in data["exit_code_by_key"].items() if only is None or k in only}
    counts: Counter[Status] = Counter(classify(c) for c in codes.values())
    survivors = sorted(k for k, c in codes.items() if classify(c) in ("survived", "no tests"))
    return counts, survivors


def kill_rate(counts: Counter[Status]) -> float | None:
    """(killed + timeout) / mutants run, or None when none was run."""
    run = sum(n for s, n in counts.items() if s not in ("not checked", "skipped"))
    return None if run == 0 else (counts["killed"] + counts["timeout"]) / run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mutants", nargs="?", default="mutants", type=Path)
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants under each module")
    ap.add_argument("--names", type=Path, help="count only the mutants named in this file (one a line), e.g. a sample")
    args = ap.parse_args(argv)
    only = set(args.names.read_text().split()) if args.names else None
    metas = sorted(args.mutants.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {args.mutants}/ (run `make mutate` first)", file=sys.stderr)
        return 2
    print(f"{'module':<44} {'mutants':>7} {'killed':>6} {'surv':>5} {'notest':>6} {'unrun':>5} {'kill rate':>9}")
    total: Counter[Status] = Counter()
    for meta in metas:
        counts, survivors = module_counts(meta, only)
        total += counts
        rate = kill_rate(counts)
        name = str(meta.relative_to(args.mutants)).removesuffix(".meta")
        print(f"{name:<44} {sum(counts.values()):>7} {counts['killed'] + counts['timeout']:>6} "
              f"{counts['survived']:>5} {counts['no tests']:>6} {counts['not checked']:>5} "
              f"{'-' if rate is None else f'{rate:.1%}':>9}")
        if args.survivors:
            for s in survivors:
                print(f"    {s}")
    rate = kill_rate(total)
    print(f"{'all':<44} {sum(total.values()):>7} {total['killed'] + total['timeout']:>6} {total['survived']:>5} "
          f"{total['no tests']:>6} {total['not checked']:>5} {'-' if rate is None else f'{rate:.1%}':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
