"""Mutation score per module from mutmut's results (run `make mutate` first).

    python benchmarks/mutation_score.py [--survivors]

Two scores per module: `raw` = killed / all mutants run, and `score` = killed / (all
run − equivalent), the textbook mutation score, where the equivalent mutants are the ones
docs/mutation.md lists by name, each with the reason no test can tell it from the code
(e.g. a device argument on a CPU-only machine). A listed mutant that a test now kills
counts as killed; a survivor not listed is printed as unexplained.

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

LINE = re.compile(r"^\s*(?P<mutant>(?P<name>\S+)__mutmut_\d+):\s*(?P<status>.+?)\s*$")
# mutmut's function part of a name starts with "x_" (function) or "xǁ" (method)
FUNCTION = re.compile(r"\.(x_|xǁ)")
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}


EQUIVALENTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "mutation.md"
LISTED = re.compile(r"`([\w.ǁ]+__mutmut_\d+)`")


def listed_equivalents(doc: Path = EQUIVALENTS_DOC) -> set[str]:
    """Mutant names written in backticks in docs/mutation.md."""
    return set(LISTED.findall(doc.read_text(encoding="utf-8"))) if doc.exists() else set()


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
    equivalent = listed_equivalents()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unexplained = []
    for line in out.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        module, status = module_of(match["name"]), match["status"]
        kind = "killed" if status in KILLED else "survived" if status in SURVIVED else "not run"
        if kind == "survived" and match["mutant"] in equivalent:
            kind = "equivalent"
        counts[module][kind] += 1
        if kind == "survived":
            unexplained.append(line.strip())
    total: collections.Counter = collections.Counter()
    head = ("module", "killed", "equiv.", "unexpl.", "not run", "raw", "score")
    print(f"{head[0]:36s} {head[1]:>7s} {head[2]:>7s} {head[3]:>7s} {head[4]:>7s} "
          f"{head[5]:>6s} {head[6]:>6s}")  # fmt: skip
    for module in sorted(counts) + ["all"]:
        c = total if module == "all" else counts[module]
        if module != "all":
            total.update(c)
        run = c["killed"] + c["equivalent"] + c["survived"]
        raw = f"{100 * c['killed'] / run:.1f}%" if run else "–"
        decidable = run - c["equivalent"]
        score = f"{100 * c['killed'] / decidable:.1f}%" if decidable else "–"
        print(f"{module:36s} {c['killed']:7d} {c['equivalent']:7d} {c['survived']:7d} "
              f"{c['not run']:7d} {raw:>6s} {score:>6s}")  # fmt: skip
    if args.survivors:
        print("\nsurvivors not listed as equivalent in docs/mutation.md:")
        print("\n".join(unexplained) or "(none)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
