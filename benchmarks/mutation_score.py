"""Mutation score per module from mutmut's results (run `make mutate` first).

    python benchmarks/mutation_score.py [--survivors]

Reads `mutmut results --all true` (one line per mutant, `<module>.<function>__mutmut_<n>:
<status>`, as mutmut 3.8.1's `results` command prints it), groups the mutants by module
and prints killed / survived and the score. A mutant that timed out or crashed the test
run counts as killed (the tests noticed it); one that no selected test reaches ("no
tests") or that mutmut calls "suspicious" counts as survived (nothing noticed it).
With --survivors it also lists every surviving mutant's name (see docs/mutation.md for why
each one is equivalent or which test now kills it).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>\S+)__mutmut_\d+:\s*(?P<status>.+?)\s*$")
# mutmut's function part of a name starts with "x_" (function) or "xǁ" (method)
FUNCTION = re.compile(r"\.(x_|xǁ)")
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}


def module_of(name: str) -> str:
    match = FUNCTION.search(name)
    return name[: match.start()] if match else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    args = parser.parse_args(argv)
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for line in out.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        module, status = module_of(match["name"]), match["status"]
        kind = "killed" if status in KILLED else "survived" if status in SURVIVED else "not run"
        counts[module][kind] += 1
        if kind == "survived":
            survivors.append(line.strip())
    total = collections.Counter()
    print(f"{'module':40s} {'killed':>7s} {'survived':>8s} {'not run':>7s} {'score':>6s}")
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        tested = c["killed"] + c["survived"]
        score = f"{100 * c['killed'] / tested:.1f}%" if tested else "–"
        print(f"{module:40s} {c['killed']:7d} {c['survived']:8d} {c['not run']:7d} {score:>6s}")
    tested = total["killed"] + total["survived"]
    if tested:
        print(f"{'all':40s} {total['killed']:7d} {total['survived']:8d} {total['not run']:7d} "
              f"{100 * total['killed'] / tested:5.1f}%")  # fmt: skip
    if args.survivors:
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
